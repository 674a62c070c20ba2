"""Every update step pinned by its effect: one real step of each script's update on a small batch, then every
parameter and every optimiser moment compared with a reference computed here, independently and plainly from the
paper's equations: per sample and per critic in Python loops, gradients by autograd on the written-out loss, Adam's
update written out (Kingma & Ba 2015, Algorithm 1). The networks are the scripts' own (their outputs depend on every
input they read: state, next state, choice, every step of a window); temperatures are far from 0 and 1; the
optimisers have taken a step before, so Adam's moments are not zero and a step's size depends on its gradient's size.

The policies' reparameterisation noise and CQL's uniform proposals come from fixed tables (torch.randn_like and
torch.rand replaced), so the reference can recompute every sample: row r of a batch of R states draws noise row r.
"""

import copy
import math

import numpy as np
import pytest
import torch

import opal_cql as oc
import opal_fewshot_il as fs
import opal_mt_transfer as mt
import opal_online_sac as osac
import opal_vae as ov
import opal_utils

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # the networks' clamp of a Gaussian head's log-std
NOISE_TABLE = torch.sin(torch.arange(20_000, dtype=torch.float32) * 0.7) * 1.3  # values in [-1.3, 1.3]
UNIFORM_TABLE = (torch.arange(20_000, dtype=torch.float32) * 0.37) % 1.0  # values in [0, 1)


def fixed_noise(monkeypatch):
    monkeypatch.setattr(torch, "randn_like", lambda x, **kwargs: NOISE_TABLE[:x.numel()].view_as(x).to(x.dtype))
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: UNIFORM_TABLE[:math.prod(shape)].view(*shape).clone())


def noise(rows: int, dim: int):
    return NOISE_TABLE[:rows * dim].view(rows, dim)


# ------------------------------------------------------------------------------------------------------------------
# Adam written out, and the comparison of a real optimiser with it
# ------------------------------------------------------------------------------------------------------------------
def adam_before(optimizer) -> list:
    """(step, m, v) of every parameter of the optimiser's first group before a step (None: no state yet)."""
    states = []
    for parameter in optimizer.param_groups[0]["params"]:
        state = optimizer.state.get(parameter)
        states.append((float(state["step"]), state["exp_avg"].clone(), state["exp_avg_sq"].clone()) if state else None)
    return states


def adam_by_hand(optimizer, parameters: list, gradients: list, before: list) -> list:
    """Adam's step on copies of the parameters (changed in place), with the hyperparameters of `optimizer`:
    m ← β1 m + (1 - β1) g, v ← β2 v + (1 - β2) g², θ ← θ - lr m̂ / (√v̂ + ε), m̂ = m / (1 - β1^t), v̂ = v / (1 - β2^t).
    A parameter without a gradient keeps its value and state. Returns the expected (step, m, v) per parameter."""
    group = optimizer.param_groups[0]
    lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
    after = []
    with torch.no_grad():
        for parameter, gradient, state in zip(parameters, gradients, before):
            if gradient is None:
                after.append(state)
                continue
            step, m, v = state if state is not None else (0.0, torch.zeros_like(parameter), torch.zeros_like(parameter))
            step, m, v = step + 1, beta1 * m + (1 - beta1) * gradient, beta2 * v + (1 - beta2) * gradient ** 2
            parameter -= lr * (m / (1 - beta1 ** step)) / ((v / (1 - beta2 ** step)).sqrt() + eps)
            after.append((step, m, v))
    return after


def assert_optimizer_took(optimizer, expected_parameters: list, expected_states: list, what: str):
    for index, (parameter, expected, state) in enumerate(zip(optimizer.param_groups[0]["params"], expected_parameters,
                                                             expected_states)):
        torch.testing.assert_close(parameter.detach(), expected.detach(), rtol=1e-4, atol=1e-6,
                                   msg=lambda m: f"{what}, parameter {index}: {m}")
        actual = optimizer.state.get(parameter)
        assert (actual is None) == (state is None), f"{what}, parameter {index}: Adam state"
        if state is not None:
            assert float(actual["step"]) == state[0], f"{what}, parameter {index}: Adam's step count"
            torch.testing.assert_close(actual["exp_avg"], state[1], rtol=1e-4, atol=1e-8,
                                       msg=lambda m: f"{what}, parameter {index}, first moment: {m}")
            torch.testing.assert_close(actual["exp_avg_sq"], state[2], rtol=1e-3, atol=1e-12,
                                       msg=lambda m: f"{what}, parameter {index}, second moment: {m}")


def step_by_hand(optimizer, parameters: list, loss) -> list:
    """Gradients of `loss` for the copies `parameters` (aligned with the optimiser's), then Adam by hand."""
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    return adam_by_hand(optimizer, parameters, list(gradients), adam_before(optimizer))


# ------------------------------------------------------------------------------------------------------------------
# The distributions, written out
# ------------------------------------------------------------------------------------------------------------------
def normal_log_density(x, mean, log_std):
    """Σ_d log N(x_d; μ_d, σ_d²)."""
    return sum(-0.5 * ((x[d] - mean[d]) / log_std[d].exp()) ** 2 - log_std[d] - 0.5 * math.log(2 * math.pi)
               for d in range(len(x)))


def head(network_output):
    mean, log_std = network_output.float().chunk(2, dim=-1)
    return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def tanh_gaussian(policy, states, noise_rows):
    """Samples of SAC's squashed Gaussian in the box [center ± half_range] and their log-densities, one row at a
    time: a = center + half_range tanh(u), u = μ(s) + σ(s) ε; log π(a|s) = log N(u) - Σ_d log(half_range_d (1 - tanh²
    u_d)) (the scripts add 10⁻⁶ inside the logarithm; so does this)."""
    means, log_stds = head(policy.net(policy.normalize(states)))
    actions, log_probs = [], []
    for mean, log_std, epsilon in zip(means, log_stds, noise_rows):
        u = mean + log_std.exp() * epsilon
        jacobian = sum(torch.log(policy.half_range[d] * (1 - torch.tanh(u[d]) ** 2 + 1e-6)) for d in range(len(u)))
        actions.append(policy.center + policy.half_range * torch.tanh(u))
        log_probs.append(normal_log_density(u, mean, log_std) - jacobian)
    return torch.stack(actions), torch.stack(log_probs)


def tanh_gaussian_log_prob(policy, states, actions):
    """log π(a|s) of given actions in the box, u = atanh((a - center) / half_range), kept inside ±0.999."""
    means, log_stds = head(policy.net(policy.normalize(states)))
    log_probs = []
    for mean, log_std, action in zip(means, log_stds, actions):
        squashed = ((action - policy.center) / policy.half_range).clamp(-0.999, 0.999)
        u = 0.5 * torch.log((1 + squashed) / (1 - squashed))
        jacobian = sum(torch.log(policy.half_range[d] * (1 - squashed[d] ** 2 + 1e-6)) for d in range(len(u)))
        log_probs.append(normal_log_density(u, mean, log_std) - jacobian)
    return torch.stack(log_probs)


def prior_log_density(prior, states, choices):
    means, log_stds = head(prior.net(prior.normalize(states)))
    return torch.stack([normal_log_density(z, m, s) for z, m, s in zip(choices, means, log_stds)])


def critic_values(critics, states, choices):
    """Q_i(s, c) for every critic i: (E, rows)."""
    return critics(states, choices)


def polyak(target, online, tau):
    with torch.no_grad():
        for t, o in zip(target.parameters(), online.parameters()):
            t.copy_(tau * o + (1 - tau) * t)


def transitions(obs_dim, choice_dim, low, high, count=5, seed=3):
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(count, obs_dim, generator=generator) * 2
    s_next = s + torch.randn(count, obs_dim, generator=generator)
    choice = low + (high - low) * torch.rand(count, choice_dim, generator=generator)
    reward = torch.randn(count, generator=generator)
    done = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0])[:count]
    discount = torch.tensor([0.9, 0.8, 0.99, 0.5, 0.7])[:count]
    return s, choice, reward, s_next, done, discount


# ------------------------------------------------------------------------------------------------------------------
# opal_cql.py: CQL.update
# ------------------------------------------------------------------------------------------------------------------
OBS, CHOICE = 3, 2
LOW, HIGH = torch.tensor([-2.0, 0.5]), torch.tensor([2.0, 1.5])


def offline_agent(method, prior: bool, settings: dict):
    """opal_cql.py's CQL or IQL with these Args, on states around 1 (spread 2), with a fitted prior or none."""
    args = oc.Args(**settings)
    prior_network = oc.Prior(OBS, CHOICE, 8).requires_grad_(False) if prior else None
    if prior:
        prior_network.normalize.fit(torch.randn(40, OBS) * 2 + 1)
    return method(OBS, LOW, HIGH, args, torch.randn(40, OBS) * 2 + 1, prior_network), args


def cql_agent(prior: bool, **overrides):
    torch.manual_seed(0)
    settings = dict(primitives="none", lagrange=not prior, hidden_dim=16, critic_layers=2, policy_layers=2,
                    bf16=False, cql_n_actions=3, cql_alpha=2.5, target_action_gap=0.4, tau=0.2, critic_lr=3e-3,
                    policy_lr=2e-3, prior_kl_weight=0.7, policy_bc_steps=2)
    agent, args = offline_agent(oc.CQL, prior, {**settings, **overrides})
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.37))  # α = 0.37
        agent.log_alpha_prime.fill_(math.log(1.7))  # α' = 1.7
    # one step first (on other transitions), so that Adam's moments and the targets are not where they started
    agent.update(*transitions(OBS, CHOICE, LOW, HIGH, seed=11), step=5)
    return agent, args


def assert_optimizers_hold(agent, expected: dict):
    """Each optimiser steps exactly these parameters at this learning rate: {name: (parameters, lr)}."""
    for name, (parameters, lr) in expected.items():
        group = agent.optimizers[name].param_groups[0]
        assert group["lr"] == lr, f"{name}: learning rate {group['lr']}, expected {lr}"
        assert [id(p) for p in group["params"]] == [id(p) for p in parameters], f"{name}: other parameters"


def assert_steps_taken(agent, expected: dict, **optimizers):
    """Each named optimiser took the reference's step ({what: optimiser name}), and the targets were averaged."""
    for what, optimizer in optimizers.items():
        assert_optimizer_took(agent.optimizers[optimizer], *expected[what], what)
    for actual, wanted in zip(agent.target_critics.parameters(), expected["targets"].parameters()):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-6)


def prior_pull(agent, args, state, sample, log_prob):
    """λ (log π(c̃|s) - log ρ(c̃|s)) of one state and its policy sample c̃; 0 without a prior."""
    if agent.prior is None:
        return 0.0
    return args.prior_kl_weight * (log_prob - prior_log_density(agent.prior, state[None], sample[None])[0])


def cql_reference(agent, args, batch, imitate: bool):
    """The expected networks, temperatures and Adam states after one CQL step, from CQL's equations (Kumar et al.
    2020, Eq. (4) with CQL(H) and App. F's importance sampling; SAC's actor and temperature; Polyak averaging)."""
    s, c, R, s_next, done, discount = batch
    B, n, E, k = len(s), args.cql_n_actions, agent.critics.ensemble, len(LOW)
    policy, critics, targets = (copy.deepcopy(m) for m in (agent.task_policy, agent.critics, agent.target_critics))
    log_alpha, log_alpha_prime = agent.log_alpha.detach().clone(), agent.log_alpha_prime.detach().clone()
    alpha, alpha_prime = log_alpha.exp(), log_alpha_prime.exp()
    s_n = torch.stack([s[b] for b in range(B) for _ in range(n)])  # copy j of state b in row b n + j
    s_next_n = torch.stack([s_next[b] for b in range(B) for _ in range(n)])
    with torch.no_grad():  # y_b = R_b + (1 - d_b) γ_b max_j min_i Q̄_i(s'_b, c'_bj),  c'_bj ~ π(·|s'_b)
        if args.max_target_backup:
            next_choices, _ = tanh_gaussian(policy, s_next_n, noise(B * n, k))
            next_q = critic_values(targets, s_next_n, next_choices)
            next_value = torch.stack([max(min(next_q[i, b * n + j] for i in range(E)) for j in range(n))
                                      for b in range(B)])
        else:
            next_choices, _ = tanh_gaussian(policy, s_next, noise(B, k))
            next_q = critic_values(targets, s_next, next_choices)
            next_value = torch.stack([min(next_q[i, b] for i in range(E)) for b in range(B)])
        y = torch.stack([R[b] + (1 - done[b]) * discount[b] * next_value[b] for b in range(B)])
        uniform = LOW + (HIGH - LOW) * UNIFORM_TABLE[:B * n * k].view(B * n, k)
        log_uniform = -sum(math.log(HIGH[d] - LOW[d]) for d in range(k))
        from_policy, log_mu_policy = tanh_gaussian(policy, s_n, noise(B * n, k))
        from_next, log_mu_next = tanh_gaussian(policy, s_next_n, noise(B * n, k))

    # the critics: Σ_i [½ E_b (Q_i(s_b, c_b) - y_b)²] + CQL(H)'s gap, weighted
    q_data = critic_values(critics, s, c)
    q_uniform, q_policy, q_next = (critic_values(critics, s_n, a) for a in (uniform, from_policy, from_next))
    td, gaps = [], []
    for i in range(E):
        td.append(sum(0.5 * (q_data[i, b] - y[b]) ** 2 for b in range(B)) / B)
        per_state = []
        for b in range(B):
            terms = [q_uniform[i, b * n + j] - log_uniform for j in range(n)]
            terms += [q_policy[i, b * n + j] - log_mu_policy[b * n + j] for j in range(n)]
            terms += [q_next[i, b * n + j] - log_mu_next[b * n + j] for j in range(n)]
            per_state.append(torch.log(sum(torch.exp(term) for term in terms)) - q_data[i, b])
        gaps.append(sum(per_state) / B)
    if args.lagrange:
        regulariser = sum(alpha_prime * args.cql_alpha * (gaps[i] - args.target_action_gap) for i in range(E))
        log_alpha_prime_copy = log_alpha_prime.clone().requires_grad_(True)
        alpha_prime_loss = -sum(log_alpha_prime_copy.exp() * args.cql_alpha * (gaps[i].detach() - args.target_action_gap)
                                for i in range(E))
        expected_alpha_prime = step_by_hand(agent.optimizers["alpha_prime_optimizer"], [log_alpha_prime_copy],
                                            alpha_prime_loss)
    else:
        regulariser = sum(args.cql_alpha * gaps[i] for i in range(E))
        log_alpha_prime_copy, expected_alpha_prime = log_alpha_prime.clone(), None
    critic_parameters = list(critics.parameters())
    expected_critics = step_by_hand(agent.optimizers["critic_optimizer"], critic_parameters, sum(td) + regulariser)

    # the task policy, with the critics after their step: E_b[α log π(c̃_b|s_b) - min_i Q_i(s_b, c̃_b)] (or, while
    # imitating, - log π(c_b|s_b)) + λ E_b[log π(c̃_b|s_b) - log ρ(c̃_b|s_b)]
    new_choice, log_prob = tanh_gaussian(policy, s, noise(B, k))
    q_new = critic_values(critics, s, new_choice)
    data_log_prob = tanh_gaussian_log_prob(policy, s, c)
    terms = []
    for b in range(B):
        value = data_log_prob[b] if imitate else min(q_new[i, b] for i in range(E))
        terms.append(alpha * log_prob[b] - value + prior_pull(agent, args, s[b], new_choice[b], log_prob[b]))
    policy_parameters = list(policy.parameters())
    expected_policy = step_by_hand(agent.optimizers["policy_optimizer"], policy_parameters, sum(terms) / B)
    # the temperature: -E_b[log α (log π(c̃_b|s_b) + H̄)], H̄ = -dim
    log_alpha_copy = log_alpha.clone().requires_grad_(True)
    alpha_loss = -sum(log_alpha_copy * (log_prob[b].detach() - k) for b in range(B)) / B
    expected_alpha = step_by_hand(agent.optimizers["alpha_optimizer"], [log_alpha_copy], alpha_loss)
    polyak(targets, critics, args.tau)
    return dict(critics=(critic_parameters, expected_critics), policy=(policy_parameters, expected_policy),
                alpha=([log_alpha_copy], expected_alpha), alpha_prime=([log_alpha_prime_copy], expected_alpha_prime),
                targets=targets, td=sum(td), gap=sum(gaps) / E)


@pytest.mark.parametrize("case", ["latent", "latent-lagrange", "raw", "raw-imitate", "raw-single-target"])
def test_cql_update_takes_the_step_of_the_equations(case, monkeypatch):
    """The latent space's defaults (a prior, a fixed CQL weight) and raw actions' (no prior, the Lagrange multiplier),
    the imitation steps at first, and the single-sample target."""
    prior = case.startswith("latent")
    overrides = {"latent-lagrange": dict(lagrange=True), "raw-single-target": dict(max_target_backup=False)}.get(case, {})
    agent, args = cql_agent(prior, **overrides)
    assert_optimizers_hold(agent, {  # CORL's: the temperature at the policy's rate, the multiplier at the critics'
        "policy_optimizer": (list(agent.task_policy.parameters()), args.policy_lr),
        "critic_optimizer": (list(agent.critics.parameters()), args.critic_lr),
        "alpha_optimizer": ([agent.log_alpha], args.policy_lr),
        "alpha_prime_optimizer": ([agent.log_alpha_prime], args.critic_lr)})
    fixed_noise(monkeypatch)
    batch = transitions(OBS, CHOICE, LOW, HIGH)
    imitate = case.endswith("imitate")
    expected = cql_reference(agent, args, batch, imitate)
    losses = agent.update(*batch, step=args.policy_bc_steps if imitate else args.policy_bc_steps + 1)

    assert losses["td_loss"].item() == pytest.approx(expected["td"].item(), rel=1e-5)
    assert losses["cql_gap"].item() == pytest.approx(expected["gap"].item(), rel=1e-5)
    for name, optimizer in (("critics", "critic_optimizer"), ("policy", "policy_optimizer"),
                            ("alpha", "alpha_optimizer")):
        assert_optimizer_took(agent.optimizers[optimizer], *expected[name], name)
    if args.lagrange:
        assert_optimizer_took(agent.optimizers["alpha_prime_optimizer"], *expected["alpha_prime"], "alpha_prime")
    else:
        assert agent.log_alpha_prime.item() == pytest.approx(math.log(1.7))  # untouched without the multiplier
    for actual, wanted in zip(agent.target_critics.parameters(), expected["targets"].parameters()):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# opal_cql.py --algorithm iql: IQL.update
# ------------------------------------------------------------------------------------------------------------------
def iql_agent(prior: bool, **overrides):
    torch.manual_seed(0)
    settings = dict(primitives="none", algorithm="iql", hidden_dim=16, critic_layers=2, policy_layers=2, bf16=False,
                    tau=0.2, critic_lr=3e-3, policy_lr=2e-3, prior_kl_weight=0.7, policy_bc_steps=2,
                    iql_expectile=0.7, iql_temperature=3.0, iql_max_weight=4.0, critic_layer_norm=True)
    agent, args = offline_agent(oc.IQL, prior, {**settings, **overrides})
    agent.update(*transitions(OBS, CHOICE, LOW, HIGH, seed=11), step=5)  # Adam's moments and targets moved
    return agent, args


def iql_reference(agent, args, batch, imitate: bool):
    """The expected networks and Adam states after one IQL step, from IQL's equations (Kostrikov et al. 2022, Eqs. (5),
    (6) and (7), clipped weights, in the order of its code: V, then Q and π with the new V; Polyak averaging)."""
    s, c, R, s_next, done, discount = batch
    B, E, k = len(s), agent.critics.ensemble, len(LOW)
    policy, critics, targets, value = (copy.deepcopy(m) for m in (agent.task_policy, agent.critics,
                                                                   agent.target_critics, agent.value))
    with torch.no_grad():
        q_bar = critic_values(targets, s, c)
        q_bar = torch.stack([min(q_bar[i, b] for i in range(E)) for b in range(B)])  # min_i Q̄_i(s_b, c_b)
    # V: E_b[|τ - 1(u_b < 0)| u_b²], u_b = Q̄(s_b, c_b) - V(s_b)
    terms, signs = [], []
    with torch.no_grad():
        v_before = sum(value(s[b:b + 1])[0] for b in range(B)) / B
    for b in range(B):
        u = q_bar[b] - value(s[b:b + 1])[0]
        terms.append((args.iql_expectile if u.item() >= 0 else 1 - args.iql_expectile) * u ** 2)
        signs.append(u.item() >= 0)
    value_parameters = list(value.parameters())
    expected_value = step_by_hand(agent.optimizers["value_optimizer"], value_parameters, sum(terms) / B)
    with torch.no_grad():  # the new V from here on
        y = torch.stack([R[b] + (1 - done[b]) * discount[b] * value(s_next[b:b + 1])[0] for b in range(B)])
        advantage = torch.stack([q_bar[b] - value(s[b:b + 1])[0] for b in range(B)])
    # Q: Σ_i ½ E_b (Q_i(s_b, c_b) - y_b)²
    q_data = critic_values(critics, s, c)
    td = sum(sum(0.5 * (q_data[i, b] - y[b]) ** 2 for b in range(B)) / B for i in range(E))
    critic_parameters = list(critics.parameters())
    expected_critics = step_by_hand(agent.optimizers["critic_optimizer"], critic_parameters, td)
    # π: -E_b[w_b log π(c_b|s_b)], w_b = min(exp(β A_b), w_max) (1 while imitating), + λ E_b[log π(c̃_b|s_b) -
    # log ρ(c̃_b|s_b)]
    unclipped = sorted(math.exp(args.iql_temperature * a.item()) for a in advantage)
    args.iql_max_weight = (unclipped[1] + unclipped[2]) / 2  # (the agent's too): the clip acts on 3 of the 5 rows
    data_log_prob = tanh_gaussian_log_prob(policy, s, c)
    new_choice, log_prob = tanh_gaussian(policy, s, noise(B, k))
    terms = []
    for b in range(B):
        weight = 1.0 if imitate else min(math.exp(args.iql_temperature * advantage[b].item()), args.iql_max_weight)
        terms.append(-weight * data_log_prob[b] + prior_pull(agent, args, s[b], new_choice[b], log_prob[b]))
    policy_parameters = list(policy.parameters())
    expected_policy = step_by_hand(agent.optimizers["policy_optimizer"], policy_parameters, sum(terms) / B)
    polyak(targets, critics, args.tau)
    weights = [min(math.exp(args.iql_temperature * a.item()), args.iql_max_weight) for a in advantage]
    logged = dict(q_data=sum(q_data[i, b] for i in range(E) for b in range(B)) / (E * B), v_data=v_before,
                  advantage=sum(advantage) / B)  # what the step reports: means before each network's step
    return dict(value=(value_parameters, expected_value), critics=(critic_parameters, expected_critics),
                policy=(policy_parameters, expected_policy), targets=targets, td=td, weights=weights, signs=signs,
                logged=logged)


@pytest.mark.parametrize("case", ["latent", "raw", "raw-imitate", "raw-plain-critics"])
def test_iql_update_takes_the_step_of_the_equations(case, monkeypatch):
    """The latent space (a prior's pull), raw actions, the imitation steps at first, critics without layer norm."""
    overrides = {"raw-plain-critics": dict(critic_layer_norm=False)}.get(case, {})
    agent, args = iql_agent(case == "latent", **overrides)
    assert_optimizers_hold(agent, {  # IQL's: the critics and V at one rate, the policy at its own
        "policy_optimizer": (list(agent.task_policy.parameters()), args.policy_lr),
        "critic_optimizer": (list(agent.critics.parameters()), args.critic_lr),
        "value_optimizer": (list(agent.value.parameters()), args.critic_lr)})
    fixed_noise(monkeypatch)
    batch = transitions(OBS, CHOICE, LOW, HIGH)
    with torch.no_grad():  # V moved among the batch's Q̄ values: the expectile's two sides are both reached
        gaps = (agent.target_critics(batch[0], batch[1]).min(0).values - agent.value(batch[0])).sort().values
        agent.value.net[-1].bias += (gaps[1] + gaps[2]) / 2
    imitate = case.endswith("imitate")
    expected = iql_reference(agent, args, batch, imitate)
    assert min(expected["weights"]) < args.iql_max_weight <= max(expected["weights"]), expected["weights"]
    assert len(set(expected["signs"])) == 2, "the batch must reach both sides of the expectile"
    losses = agent.update(*batch, step=args.policy_bc_steps if imitate else args.policy_bc_steps + 1)

    assert losses["td_loss"].item() == pytest.approx(expected["td"].item(), rel=1e-5)
    for name, value in expected["logged"].items():
        assert losses[name].item() == pytest.approx(float(value.detach()), rel=1e-5, abs=1e-6), name
    assert_steps_taken(agent, expected, value="value_optimizer", critics="critic_optimizer",
                       policy="policy_optimizer")


def test_layer_norm_critics_normalise_each_hidden_layer():
    """--critic-layer-norm: each hidden layer's pre-activation has mean 0 and variance 1 over its units, per critic;
    without it the same weights give other numbers."""
    torch.manual_seed(0)
    normed, plain = oc.Critics(3, 2, 8, layers=2, layer_norm=True), oc.Critics(3, 2, 8, layers=2)
    linear = lambda critics: [module for module in critics.net if isinstance(module, oc.VectorizedLinear)]
    with torch.no_grad():  # the same weights (the normalisation has no parameters of its own)
        for source, target in zip(linear(normed), linear(plain)):
            target.weight.copy_(source.weight), target.bias.copy_(source.bias)
    plain.normalize.load_state_dict(normed.normalize.state_dict())
    states, choices = torch.randn(4, 3), torch.randn(4, 2)
    x = torch.cat([normed.normalize(states), choices], -1)
    for member in range(2):
        hidden = x
        for index in (0, 3):  # the two VectorizedLinear layers before the output; ReLU after each normalisation
            layer = normed.net[index]
            pre = hidden @ layer.weight[member] + layer.bias[member, 0]
            hidden = torch.relu((pre - pre.mean(-1, keepdim=True)) / (pre.var(-1, unbiased=False, keepdim=True)
                                                                       + 1e-5).sqrt())
        last = normed.net[-1]
        expected = (hidden @ last.weight[member] + last.bias[member, 0]).squeeze(-1)
        torch.testing.assert_close(normed(states, choices)[member], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(normed(states, choices), plain(states, choices))


# ------------------------------------------------------------------------------------------------------------------
# opal_online_sac.py: SAC's update and the start from the prior
# ------------------------------------------------------------------------------------------------------------------
def sac_agent(prior: bool):
    torch.manual_seed(0)
    args = osac.Args(primitives="none", hidden_dim=16, layers=2, bf16=False, tau=0.2, critic_lr=3e-3, policy_lr=2e-3)
    args.prior_kl_target = 1.3  # (Args refuses it without a VAE checkpoint; the agent only reads it with a prior)
    prior_network = osac.Prior(OBS, CHOICE, 8).requires_grad_(False) if prior else None
    if prior:
        prior_network.normalize.fit(torch.randn(40, OBS) * 2 + 1)
    agent = osac.SAC(OBS, LOW, HIGH, args, torch.randn(40, OBS) * 2 + 1, prior_network)
    with torch.no_grad():
        agent.log_alpha.fill_(math.log(0.37))
    agent.update(*transitions(OBS, CHOICE, LOW, HIGH, seed=11))
    return agent, args


def sac_reference(agent, args, batch):
    """SAC (Haarnoja et al. 2018, Eqs. (5)-(7), (18); CleanRL's shape): the critics regress
    y = R + γ (1 - d) (min_i Q̄_i(s', c') - α P(c'|s')), c' ~ π(·|s'), P = log π (or log π - log ρ toward the
    prior); the actor minimises E[α P(c̃|s) - min_i Q_i(s, c̃)] with the critics after their step; the temperature
    minimises -E[log α (P(c̃|s) - target)], target = dim of the choice (SAC's H̄ = -dim) or the KL target δ."""
    s, c, R, s_next, done, discount = batch
    B, E, k = len(s), agent.critics.ensemble, len(LOW)
    policy, critics, targets = (copy.deepcopy(m) for m in (agent.task_policy, agent.critics, agent.target_critics))
    log_alpha = agent.log_alpha.detach().clone()
    alpha = log_alpha.exp()

    def paid(states, choices, log_probs):
        if agent.prior is None:
            return log_probs
        return log_probs - prior_log_density(agent.prior, states, choices)

    with torch.no_grad():
        next_choice, next_log_prob = tanh_gaussian(policy, s_next, noise(B, k))
        next_q = critic_values(targets, s_next, next_choice)
        next_paid = paid(s_next, next_choice, next_log_prob)
        y = torch.stack([R[b] + discount[b] * (1 - done[b]) * (min(next_q[i, b] for i in range(E))
                                                               - alpha * next_paid[b]) for b in range(B)])
    q = critic_values(critics, s, c)
    critic_loss = sum(sum((q[i, b] - y[b]) ** 2 for b in range(B)) / B for i in range(E))
    critic_parameters = list(critics.parameters())
    expected_critics = step_by_hand(agent.optimizers["critic_optimizer"], critic_parameters, critic_loss)

    new_choice, log_prob = tanh_gaussian(policy, s, noise(B, k))
    q_new = critic_values(critics, s, new_choice)
    penalty = paid(s, new_choice, log_prob)
    policy_loss = sum(alpha * penalty[b] - min(q_new[i, b] for i in range(E)) for b in range(B)) / B
    policy_parameters = list(policy.parameters())
    expected_policy = step_by_hand(agent.optimizers["policy_optimizer"], policy_parameters, policy_loss)
    target = float(k) if agent.prior is None else args.prior_kl_target
    log_alpha_copy = log_alpha.clone().requires_grad_(True)
    alpha_loss = -sum(log_alpha_copy * (penalty[b].detach() - target) for b in range(B)) / B
    expected_alpha = step_by_hand(agent.optimizers["alpha_optimizer"], [log_alpha_copy], alpha_loss)
    polyak(targets, critics, args.tau)
    return dict(critics=(critic_parameters, expected_critics), policy=(policy_parameters, expected_policy),
                alpha=([log_alpha_copy], expected_alpha), targets=targets, critic_loss=critic_loss)


@pytest.mark.parametrize("prior", [False, True], ids=["raw", "latent-prior"])
def test_sac_update_takes_the_step_of_the_equations(prior, monkeypatch):
    agent, args = sac_agent(prior)
    assert_optimizers_hold(agent, {  # CleanRL's: the temperature at the critics' rate
        "policy_optimizer": (list(agent.task_policy.parameters()), args.policy_lr),
        "critic_optimizer": (list(agent.critics.parameters()), args.critic_lr),
        "alpha_optimizer": ([agent.log_alpha], args.critic_lr)})
    fixed_noise(monkeypatch)
    batch = transitions(OBS, CHOICE, LOW, HIGH)
    expected = sac_reference(agent, args, batch)
    losses = agent.update(*batch)
    assert losses["critic_loss"].item() == pytest.approx(expected["critic_loss"].item(), rel=1e-5)
    assert_steps_taken(agent, expected, critics="critic_optimizer", policy="policy_optimizer",
                       alpha="alpha_optimizer")


def test_start_from_prior_takes_maximum_likelihood_steps_on_the_priors_samples():
    """One step of the warm-up: B dataset states, z = clip(μ_ρ(s) + σ_ρ(s) ε, box), loss -E log π(z|s)."""
    torch.manual_seed(0)
    states = torch.randn(30, OBS) * 2
    prior = osac.Prior(OBS, CHOICE, 8).requires_grad_(False)
    prior.normalize.fit(states)
    policy = osac.TanhGaussianPolicy(OBS, CHOICE, LOW, HIGH, 16, 2)
    policy.normalize.fit(states)
    reference = copy.deepcopy(policy)
    seed, batch_size, lr = 5, 6, 1e-2
    generator = torch.Generator().manual_seed(seed)  # the warm-up's draws, in its order: rows, then ε
    rows = torch.randint(len(states), (batch_size,), generator=generator)
    s = states[rows]
    means, log_stds = head(prior.net(prior.normalize(s)))
    epsilon = torch.randn(means.shape, generator=generator)
    z = torch.max(torch.min(means + log_stds.exp() * epsilon, HIGH), LOW)
    loss = -sum(tanh_gaussian_log_prob(reference, s[b:b + 1], z[b:b + 1])[0] for b in range(batch_size)) / batch_size
    optimizer = torch.optim.Adam(reference.parameters(), lr=lr)
    gradients = torch.autograd.grad(loss, list(reference.parameters()))
    expected = adam_by_hand(optimizer, list(reference.parameters()), list(gradients), [None] * len(gradients))
    first, last = osac.start_from_prior(policy, prior, states, steps=1, batch_size=batch_size, lr=lr, seed=seed)
    assert first == pytest.approx(-loss.item(), rel=1e-5) and last == first  # one step: the first batch is the last
    for actual, wanted, state in zip(policy.parameters(), reference.parameters(), expected):
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-6)


def test_replay_buffer_samples_only_rows_it_has_filled():
    buffer = opal_utils.ReplayBuffer(100, 2, 1, "cpu")
    rows = lambda values: dict(states=values[:, None].expand(-1, 2), choices=values[:, None], returns=values,
                               next_states=values[:, None].expand(-1, 2) + 1, dones=torch.zeros(len(values)),
                               steps=torch.ones(len(values)))
    buffer.add(**rows(torch.arange(1.0, 6.0)))  # 5 of 100 rows
    sample = buffer.sample(2000, torch.Generator().manual_seed(0))
    assert set(sample["returns"].tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}  # each filled row, and no empty one
    torch.testing.assert_close(sample["next_states"][:, 0], sample["states"][:, 0] + 1)  # rows stay whole
    buffer.add(**rows(torch.arange(6.0, 106.0)))  # full after a wrap: every row may be drawn
    assert len(set(buffer.sample(5000, torch.Generator().manual_seed(1))["returns"].tolist())) == 100


# ------------------------------------------------------------------------------------------------------------------
# Test-time execution: the task policy acts with tanh of its mean, the primitive with its mean
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [oc, fs, osac], ids=["opal_cql", "opal_fewshot_il", "opal_online_sac"])
def test_execution_acts_with_the_means(script):
    torch.manual_seed(0)
    task_policy = script.TanhGaussianPolicy(OBS, CHOICE, LOW, HIGH, 16, 2)
    with torch.no_grad():
        task_policy.net[-1].bias[CHOICE:].fill_(1.5)  # σ ≈ e^1.5: a sample would be far from the mean
    primitive_policy = script.PrimitivePolicy(OBS, 2, CHOICE, 8)
    policy = script.HierarchicalPolicy(task_policy, primitive_policy, c=3)
    states = np.random.default_rng(0).normal(size=(4, OBS)).astype(np.float32)
    acted = policy(states, t=0)
    mean, _ = head(task_policy.net(task_policy.normalize(torch.as_tensor(states))))
    choice = task_policy.center + task_policy.half_range * torch.tanh(mean)
    expected, _ = head(primitive_policy.net(torch.cat([primitive_policy.normalize(torch.as_tensor(states)), choice], -1)))
    np.testing.assert_allclose(acted, expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(policy.choice, choice.detach())
    raw = script.HierarchicalPolicy(task_policy, None, c=1)  # without primitives the choice is the action
    np.testing.assert_allclose(raw(states, t=0), choice.detach().numpy(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# opal_mt_transfer.py: ppo_update, the learning-rate schedule, what a rollout stores
# ------------------------------------------------------------------------------------------------------------------
def ppo_batch(agent, size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    states = torch.randn(size, 4, generator=generator)
    with torch.no_grad():
        choices, log_probs, _, values = agent.choice_and_value(states)
    returns = values + torch.randn(size, generator=generator)
    advantages = torch.randn(size, generator=generator) * 2 + 0.5
    return {"states": states, "choices": choices, "log_probs": log_probs + 0.3 * torch.randn(size, generator=generator),
            "values": values, "returns": returns, "advantages": advantages}


def ppo_reference(agent, optimizer, batch, args, orders):
    """PPO (Schulman et al. 2017, Eq. (9)) as CleanRL runs it, one minibatch (a list of rows) at a time: advantages
    standardised in the minibatch, ρ_b = π(c_b|s_b) / π_old(c_b|s_b), L = mean_b max(-A_b ρ_b, -A_b clip(ρ_b, 1 ± ε))
    - c_ent mean_b H_b + c_v ½ mean_b max((V_b - G_b)², (V_old,b + clip(V_b - V_old,b, ±ε) - G_b)²), the gradient's
    global norm clipped, then Adam. Returns the expected parameters and Adam states, and the last minibatch's
    losses and diagnostics: KL(π_old || π) ≈ mean_b[(ρ_b - 1) - log ρ_b] and the fraction with |ρ_b - 1| > ε."""
    reference = copy.deepcopy(agent)
    parameters = list(reference.parameters())
    states = adam_before(optimizer)
    for index in orders:
        advantages = batch["advantages"][index]
        mean_advantage = sum(advantages) / len(advantages)
        std_advantage = torch.sqrt(sum((a - mean_advantage) ** 2 for a in advantages) / (len(advantages) - 1))
        observations, choices = batch["states"][index], batch["choices"][index]
        means, values = reference.actor_mean(observations), reference.critic(observations).squeeze(-1)
        log_std = reference.actor_logstd[0]
        terms, ratios, entropies = [], [], []
        for b in range(len(index)):
            a = (advantages[b] - mean_advantage) / (std_advantage + 1e-8)
            ratio = torch.exp(normal_log_density(choices[b], means[b], log_std) - batch["log_probs"][index][b])
            ratios.append(ratio.item())
            surrogate = torch.max(-a * ratio, -a * ratio.clamp(1 - args.clip_coef, 1 + args.clip_coef))
            entropy = sum(0.5 + 0.5 * math.log(2 * math.pi) + log_std[d] for d in range(len(log_std)))
            entropies.append(entropy.item())
            old, target = batch["values"][index][b], batch["returns"][index][b]
            clipped = old + (values[b] - old).clamp(-args.clip_coef, args.clip_coef)
            value_loss = 0.5 * torch.max((values[b] - target) ** 2, (clipped - target) ** 2)
            terms.append(surrogate - args.ent_coef * entropy + args.vf_coef * value_loss)
        gradients = torch.autograd.grad(sum(terms) / len(index), parameters)
        norm = math.sqrt(sum((g ** 2).sum().item() for g in gradients))
        scale = min(1.0, args.max_grad_norm / (norm + 1e-6))
        states = adam_by_hand(optimizer, parameters, [g * scale for g in gradients], states)
    last = {"approx_kl": sum((r - 1) - math.log(r) for r in ratios) / len(ratios),
            "clip_fraction": sum(abs(r - 1) > args.clip_coef for r in ratios) / len(ratios),
            "entropy": sum(entropies) / len(entropies)}
    return parameters, states, last


@pytest.mark.parametrize("size, minibatches, sizes", [(12, 1, [12]), (12, 2, [6, 6]), (14, 4, [3, 3, 3, 3, 2]),
                                                     (13, 4, [3, 3, 3, 4])])
def test_ppo_update_takes_the_steps_of_the_equations(size, minibatches, sizes):
    """--num-minibatches of size // n rows each, the rest in one more (13 rows in 4: a last one of 1 row, whose
    advantages have no standard deviation, joins the one before)."""
    torch.manual_seed(0)
    agent = mt.ActorCritic(4, 2, 16, torch.zeros(2))
    with torch.no_grad():
        agent.actor_logstd.fill_(-0.4)
    args = mt.Args(primitives="none", update_epochs=2, num_minibatches=minibatches, clip_coef=0.15, ent_coef=0.05, vf_coef=0.7,
                   max_grad_norm=0.3, target_kl=None)
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-3, eps=1e-5)
    mt.ppo_update(agent, optimizer, ppo_batch(agent, size, seed=5), args)  # an earlier iteration: Adam has moments
    batch = ppo_batch(agent, size)
    torch.manual_seed(7)  # the update's shuffles: a permutation of the rows per epoch, cut into minibatches
    orders = [part for _ in range(args.update_epochs) for part in torch.randperm(size).split(sizes)]
    *expected, last = ppo_reference(agent, optimizer, batch, args, orders)
    torch.manual_seed(7)
    losses = mt.ppo_update(agent, optimizer, batch, args)
    assert_optimizer_took(optimizer, *expected, "actor-critic")
    assert 0 < last["clip_fraction"] < 1  # (so that a count, or a sum, would differ)
    for name, value in last.items():
        assert losses[name].item() == pytest.approx(value, rel=1e-4, abs=1e-7), name


def test_ppo_minibatches_never_hold_a_single_row():
    """100 high-level steps in 32 minibatches (--episode-length 50 --total-steps 1000 with c = 5): minibatches of
    3 rows would leave one of 1, whose advantages' standard deviation is NaN; it joins the one before."""
    torch.manual_seed(0)
    agent = mt.ActorCritic(4, 2, 16, torch.zeros(2))
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-3, eps=1e-5)
    args = mt.Args(primitives="none", update_epochs=2, num_minibatches=32, target_kl=None)
    losses = mt.ppo_update(agent, optimizer, ppo_batch(agent, 100), args)
    assert all(torch.isfinite(value) for value in losses.values())
    assert all(torch.isfinite(parameter).all() for parameter in agent.parameters())


def test_learning_rate_anneals_linearly_over_the_iterations():
    # I = 4 iterations at lr 0.2: 0.2, 0.15, 0.1, 0.05 (CleanRL's schedule: never 0 while training)
    rates = [mt.annealed_learning_rate(i, 4, 0.2) for i in range(1, 5)]
    assert rates == pytest.approx([0.2, 0.15, 0.1, 0.05])


class ScriptedEnvs:
    """Two environments with 3-d states: after step t the state is t (1, 2, 3) + the env's index, the reward t for
    env 0 and 10 t for env 1; both end after `length` steps; env 1 succeeds at step 2 only."""

    def __init__(self, length):
        self.length, self.t, self.actions = length, 0, []

    def observation(self):
        return np.stack([self.t * np.array([1.0, 2.0, 3.0]) + e for e in range(2)]).astype(np.float32)

    def reset(self):
        self.t = 0
        return self.observation(), {}

    def step(self, actions):
        self.actions.append(np.array(actions))
        self.t += 1
        rewards = np.array([self.t, 10.0 * self.t])
        ended = np.full(2, self.t >= self.length)
        return self.observation(), rewards, ended, np.zeros(2, bool), {"success": np.array([0.0, self.t == 2])}


def test_rollout_stores_decision_states_window_rewards_and_the_policys_own_numbers():
    """c = 2, γ = 0.5, episodes of 4 steps: two high-level steps per environment, R_k = r_2k + γ r_2k+1."""
    torch.manual_seed(0)
    agent = mt.ActorCritic(3, 2, 8, torch.zeros(2))
    envs, normalizer = ScriptedEnvs(4), mt.RunningNormalizer(3)
    scaled_with = []  # the reward scaler has its own test; here: what it is given

    def unscaled(rewards, discount, dones):
        scaled_with.append((float(discount), dones.tolist()))
        return rewards
    space = mt.ChoiceSpace(-torch.ones(2), torch.ones(2))
    rollout, episode_return, success = mt.collect_rollout(envs, agent, normalizer, unscaled, None, 2, space, 0.5,
                                                          torch.tensor(0.5), "cpu")
    assert rollout["rewards"].tolist() == [[1 + 0.5 * 2, 10 + 0.5 * 20], [3 + 0.5 * 4, 30 + 0.5 * 40]]
    assert rollout["dones"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert scaled_with == [(0.5, [0.0, 0.0]), (0.5, [1.0, 1.0])]
    assert episode_return.tolist() == [10.0, 100.0] and success.tolist() == [False, True]
    # the decision states are those at t = 0 and t = 2, standardised with the statistics of all decision states so far
    statistics = mt.RunningNormalizer(3)
    for k, t in enumerate((0, 2)):
        states = torch.tensor([[t * 1.0, t * 2.0, t * 3.0]]) + torch.arange(2.0)[:, None]
        statistics.update(states)
        torch.testing.assert_close(rollout["states"][k], statistics(states))
        with torch.no_grad():
            _, log_probs, _, values = agent.choice_and_value(statistics(states), rollout["choices"][k])
        torch.testing.assert_close(rollout["log_probs"][k], log_probs)
        torch.testing.assert_close(rollout["values"][k], values)
    # each choice acts for its c = 2 steps (raw actions: the choice, clipped to [-1, 1])
    acted = np.stack(envs.actions)
    for k in range(2):
        for t in (2 * k, 2 * k + 1):
            np.testing.assert_allclose(acted[t], rollout["choices"][k].clamp(-1, 1).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# opal_vae.py: the β-VAE step and the BC fine-tuning step (shared with opal_fewshot_il.py); the relabelled batches
# ------------------------------------------------------------------------------------------------------------------
def vae_networks(obs_dim=3, act_dim=2, latent_dim=2):
    torch.manual_seed(0)
    states = torch.randn(60, obs_dim) * 2 + 1
    encoder = ov.Encoder(obs_dim, act_dim, latent_dim, 8, 1, gru=ov.BidirectionalGRU)
    prior, primitive_policy = ov.Prior(obs_dim, latent_dim, 8), ov.PrimitivePolicy(obs_dim, act_dim, latent_dim, 8)
    for module in (encoder, prior, primitive_policy):
        module.normalize.fit(states)
    return encoder, prior, primitive_policy


def windows(count=4, c=4, obs_dim=3, act_dim=2, seed=0):  # (c ≠ obs_dim: a window's axes cannot be confused)
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(count, c, obs_dim, generator=generator) * 2,
            torch.randn(count, c, act_dim, generator=generator).clamp(-1, 1))


def primitive_log_likelihood(primitive_policy, states, actions, z):
    """Σ_t log π_θ(a_t|s_t, z) of one window, the primitive policy read at every step's own state."""
    total = 0.0
    for t in range(len(states)):
        inputs = torch.cat([primitive_policy.normalize(states[t:t + 1]), z[None]], -1)
        mean, log_std = head(primitive_policy.net(inputs))
        total = total + normal_log_density(actions[t], mean[0], log_std[0])
    return total


def test_beta_vae_step_takes_the_step_of_equation_1(monkeypatch):
    """Eq. (1), negated: 1/B Σ_b [-Σ_t log π_θ(a_t|s_t, z_b) + β KL(q_φ(z|τ_b) || ρ_ω(z|s_0,b))], z_b = μ + σ ε_b,
    one Adam step of the encoder, prior and primitive policy together."""
    encoder, prior, primitive_policy = vae_networks()
    optimizer = torch.optim.Adam([*encoder.parameters(), *prior.parameters(), *primitive_policy.parameters()], lr=3e-3)
    ov.vae_update(encoder, prior, primitive_policy, optimizer, *windows(seed=9), beta=0.3, bf16=False)
    fixed_noise(monkeypatch)
    states, actions = windows()
    copies = [copy.deepcopy(m) for m in (encoder, prior, primitive_policy)]
    enc, pri, pol = copies
    beta, B, latent_dim = 0.3, len(states), 2
    terms = []
    for b in range(B):
        mean_q, log_std_q = (x[0] for x in enc(states[b:b + 1], actions[b:b + 1]))
        z = mean_q + log_std_q.exp() * noise(B, latent_dim)[b]
        mean_p, log_std_p = (x[0] for x in head(pri.net(pri.normalize(states[b, :1]))))
        kl = sum(log_std_p[d] - log_std_q[d] + ((2 * log_std_q[d]).exp() + (mean_q[d] - mean_p[d]) ** 2)
                 / (2 * (2 * log_std_p[d]).exp()) - 0.5 for d in range(latent_dim))
        terms.append(-primitive_log_likelihood(pol, states[b], actions[b], z) + beta * kl)
    parameters = [p for module in copies for p in module.parameters()]
    expected = step_by_hand(optimizer, parameters, sum(terms) / B)
    losses = ov.vae_update(encoder, prior, primitive_policy, optimizer, states, actions, beta=beta, bf16=False)
    assert losses["vae_loss"].item() == pytest.approx((sum(terms) / B).item(), rel=1e-5)
    assert_optimizer_took(optimizer, parameters, expected, "β-VAE")


@pytest.mark.parametrize("script", [ov, fs], ids=["opal_vae", "opal_fewshot_il"])
def test_primitive_finetune_step_is_behaviour_cloning_with_z_fixed(script):
    """1/B Σ_b -Σ_t log π_θ(a_t|s_t, z_b), one Adam step of the primitive policy alone."""
    _, _, primitive_policy = vae_networks()
    optimizer = torch.optim.Adam(primitive_policy.parameters(), lr=2e-3)
    latents = torch.randn(4, 2)
    script.primitive_finetune_update(primitive_policy, optimizer, *windows(seed=9), latents * 0.5, bf16=False)
    states, actions = windows()
    reference = copy.deepcopy(primitive_policy)
    loss = -sum(primitive_log_likelihood(reference, states[b], actions[b], latents[b]) for b in range(4)) / 4
    parameters = list(reference.parameters())
    expected = step_by_hand(optimizer, parameters, loss)
    losses = script.primitive_finetune_update(primitive_policy, optimizer, states, actions, latents, bf16=False)
    assert losses["nll"].item() == pytest.approx(loss.item(), rel=1e-5)
    assert_optimizer_took(optimizer, parameters, expected, "primitive policy")


@pytest.mark.parametrize("script", [ov, fs], ids=["opal_vae", "opal_fewshot_il"])
def test_relabelled_batches_pair_each_window_with_its_own_z(script):
    """Two episodes of 7 and 5 steps, windows of c = 3 at stride 3 (the relabelled set): each drawn window is one of
    them, read at its own rows, with the encoder's mean of that window as its z; every window is drawn."""
    encoder, _, _ = vae_networks()
    lengths = torch.tensor([7, 5])
    rows = int((lengths + 1).sum())
    data = {"observations": torch.randn(rows, 3), "actions": torch.randn(rows, 2), "episode_lengths": lengths}
    starts = script.window_starts(lengths, 3, stride=3)
    assert starts.tolist() == [0, 3, 8]  # rows 0-2, 3-5 of episode 0 (rows 0-7); 8-10 of episode 1 (rows 8-13)
    latents = script.encode_windows(encoder, data["observations"], data["actions"], starts, 3)
    states, actions, z = script.relabelled_batch(data, starts, latents, 3, 40, torch.Generator().manual_seed(0))
    assert states.shape == (40, 3, 3) and actions.shape == (40, 3, 2) and z.shape == (40, 2)
    seen = set()
    for b in range(40):
        start = [s for s in starts.tolist() if torch.equal(states[b], data["observations"][s:s + 3])]
        assert len(start) == 1, "each window is one of the relabelled windows, read at its own rows"
        seen.add(start[0])
        torch.testing.assert_close(actions[b], data["actions"][start[0]:start[0] + 3])
        with torch.no_grad():
            torch.testing.assert_close(z[b], encoder(states[b:b + 1], actions[b:b + 1])[0][0])
    assert seen == set(starts.tolist())


# ------------------------------------------------------------------------------------------------------------------
# opal_fewshot_il.py: the task policy's imitation step and the latent box of the demonstrations
# ------------------------------------------------------------------------------------------------------------------
def test_imitation_step_is_maximum_likelihood_of_the_relabelled_choices():
    torch.manual_seed(0)
    policy = fs.TanhGaussianPolicy(OBS, CHOICE, LOW, HIGH, 16, 2)
    policy.normalize.fit(torch.randn(30, OBS) * 2)
    optimizer = torch.optim.Adam(policy.parameters(), lr=2e-3)
    s, choice, *_ = transitions(OBS, CHOICE, LOW, HIGH)
    fs.imitation_update(policy, optimizer, s + 1, choice.flip(0), bf16=False)
    reference = copy.deepcopy(policy)
    loss = -sum(tanh_gaussian_log_prob(reference, s[b:b + 1], choice[b:b + 1])[0] for b in range(len(s))) / len(s)
    parameters = list(reference.parameters())
    expected = step_by_hand(optimizer, parameters, loss)
    policy_nll = fs.imitation_update(policy, optimizer, s, choice, bf16=False)
    assert policy_nll.item() == pytest.approx(loss.item(), rel=1e-5)
    assert_optimizer_took(optimizer, parameters, expected, "task policy")


def test_demonstration_box_by_hand():
    latents = torch.tensor([[0.0, -1.0], [2.0, 1.0], [1.0, 3.0]])  # ranges [0, 2] and [-1, 3]
    low, high = fs.demonstration_box(latents, margin=0.25)
    torch.testing.assert_close(low, torch.tensor([0.0 - 0.5 - 1e-3, -1.0 - 1.0 - 1e-3]))
    torch.testing.assert_close(high, torch.tensor([2.0 + 0.5 + 1e-3, 3.0 + 1.0 + 1e-3]))


# ------------------------------------------------------------------------------------------------------------------
# opal_utils.py: D4RL's normalised score outside the mazes (kitchen: tasks completed of 4)
# ------------------------------------------------------------------------------------------------------------------
def test_normalized_score_off_the_mazes_is_the_return_between_the_reference_scores(monkeypatch):
    asked = []

    def get_normalized_score(dataset, returns):  # kitchen's reference scores, as collect_data.py stores them
        asked.append(returns.tolist())
        return (returns - 0.0) / (4.0 - 0.0)

    monkeypatch.setattr(opal_utils.minari, "get_normalized_score", get_normalized_score)
    kitchen = type("Env", (), {"unwrapped": object()})()  # an evaluation env without a maze
    assert opal_utils.normalized_score(None, kitchen, success_rate=0.25, mean_return=3.0) == pytest.approx(75.0)
    assert asked == [[3.0]]  # the mean return, not the success rate


def test_ppo_update_on_non_finite_parameters_reports_non_finite_losses_instead_of_raising():
    """The training loop stops with a message on non-finite losses; the update must get there, not raise first."""
    torch.manual_seed(0)
    agent = mt.ActorCritic(4, 2, 16, torch.zeros(2))
    optimizer = torch.optim.Adam(agent.parameters(), lr=3e-3, eps=1e-5)
    batch = ppo_batch(agent, 12)
    with torch.no_grad():
        agent.actor_mean[-1].bias.fill_(math.nan)
    losses = mt.ppo_update(agent, optimizer, batch, mt.Args(primitives="none", num_minibatches=2, target_kl=None))
    assert not torch.isfinite(losses["policy_loss"])

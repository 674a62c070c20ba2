"""opal_cql.py's CQL update, every loss and every parameter update computed by hand on a tiny problem.

The task policy is replaced by a deterministic stand-in (every row of a batch gets its own offset, so the n copies of a
state get different choices) and the uniform proposals by a fixed table, so each quantity of `CQL.update` can be
recomputed here from the networks' values: the TD target (discount, not-done, min over critics, max over sampled next
choices), the importance-sampled logsumexp of CQL(H), the Lagrange multiplier, SAC's actor and temperature, the
prior's KL, the imitation branch and Polyak averaging.
"""

import copy
import math

import pytest
import torch

import opal_cql as oc

B, N, OBS, CHOICE = 4, 3, 3, 2
LOW, HIGH = torch.tensor([-2.0, 0.5]), torch.tensor([2.0, 1.0])  # widths 4 and 0.5: log-volume log 2


class StubPolicy(torch.nn.Module):
    """Deterministic stand-in for the tanh-Gaussian task policy: row r of a batch chooses
    center + half_range * tanh(W s + b + r / 5), with 'log-probability' -½|pre-tanh|² - 1."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(OBS, CHOICE)
        self.center, self.half_range = (HIGH + LOW) / 2, (HIGH - LOW) / 2

    def forward(self, states, deterministic=False):
        pre_tanh = self.linear(states) + torch.arange(len(states), dtype=torch.float32)[:, None] / 5
        return self.center + self.half_range * torch.tanh(pre_tanh), -0.5 * (pre_tanh ** 2).sum(-1) - 1.0

    def log_prob(self, states, actions):
        return -((self.linear(states) - actions) ** 2).sum(-1)


def min_q(critics, states, choices):
    return critics(states, choices).min(0).values


def make_agent(**overrides):
    torch.manual_seed(0)
    settings = dict(primitives="none", hidden_dim=8, critic_layers=2, policy_layers=2, bf16=False, cql_n_actions=N,
                    cql_alpha=2.0, target_action_gap=0.8, tau=0.1, critic_lr=1e-2, policy_lr=1e-3, prior_kl_weight=0.7)
    settings.update(overrides)
    args = oc.Args(**settings)
    prior = oc.Prior(OBS, CHOICE, 8)
    agent = oc.CQL(OBS, LOW, HIGH, args, torch.randn(50, OBS) * 3 + 1, prior)
    agent.task_policy = StubPolicy()
    agent.optimizers["policy_optimizer"] = torch.optim.Adam(agent.task_policy.parameters(), lr=args.policy_lr)
    with torch.no_grad():
        for parameter in agent.target_critics.parameters():  # targets that differ from the critics
            parameter.add_(0.3 * torch.randn_like(parameter))
        agent.log_alpha.fill_(math.log(0.3))
    return agent, args, prior


@pytest.mark.parametrize("case", ["default", "alpha-prime-falls", "no-lagrange", "single-target", "imitate"])
def test_cql_update_by_hand(case, monkeypatch):
    overrides = {"alpha-prime-falls": dict(target_action_gap=1e3), "no-lagrange": dict(lagrange=False),
                 "single-target": dict(max_target_backup=False)}.get(case, {})
    agent, args, prior = make_agent(policy_bc_steps=3, **overrides)  # steps 1-3 imitate, from step 4 on maximise Q
    torch.manual_seed(1)
    s, s_next = torch.randn(B, OBS) * 2, torch.randn(B, OBS) * 2
    choice = LOW + (HIGH - LOW) * torch.rand(B, CHOICE)
    reward, done, discount = torch.tensor([1.0, -2.0, 0.5, 3.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]), \
        torch.tensor([0.9, 0.9, 0.5, 0.99])
    uniform_table = (torch.arange(B * N * CHOICE, dtype=torch.float32) % 7 / 7 + 0.05).view(B * N, CHOICE)
    monkeypatch.setattr(torch, "rand", lambda *shape, **kwargs: uniform_table.clone())
    policy, critics, targets = (copy.deepcopy(m) for m in (agent.task_policy, agent.critics, agent.target_critics))

    losses = agent.update(s, choice, reward, s_next, done, discount, step=3 if case == "imitate" else 4)

    with torch.no_grad():
        # n copies of each state, copy j of state b in row b n + j
        s_n = torch.stack([s[b] for b in range(B) for _ in range(N)])
        s_next_n = torch.stack([s_next[b] for b in range(B) for _ in range(N)])
        # y = R + (1 - done) γ_hl max_j min_i Q̄_i(s', c'_j), c'_j ~ π(·|s')  (or one sample without the max)
        if case == "single-target":
            next_value = min_q(targets, s_next, policy(s_next)[0])
        else:
            next_q = min_q(targets, s_next_n, policy(s_next_n)[0])
            next_value = torch.stack([max(next_q[b * N + j] for j in range(N)) for b in range(B)])
        y = reward + torch.tensor([1.0, 0.0, 1.0, 1.0]) * discount * next_value  # the second transition is done
        q_data = critics(s, choice)  # (2, B)
        td_loss = sum(0.5 * ((q_data[i] - y) ** 2).mean() for i in range(2))
        assert losses["td_loss"].item() == pytest.approx(td_loss.item(), rel=1e-5)
        assert losses["q_data"].item() == pytest.approx(q_data.mean().item(), rel=1e-5)

        # CQL(H): logsumexp over 3n proposals, each Q(s, c_j) minus its log-density under the proposal
        uniform = LOW + (HIGH - LOW) * uniform_table
        log_uniform = -math.log(4.0 * 0.5)
        from_policy, log_mu_policy = policy(s_n)
        from_next, log_mu_next = policy(s_next_n)
        gaps = []
        for i in range(2):
            terms = torch.stack([critics(s_n, uniform)[i] - log_uniform, critics(s_n, from_policy)[i] - log_mu_policy,
                                 critics(s_n, from_next)[i] - log_mu_next])  # (3, B n)
            per_state = [torch.log(sum(torch.exp(terms[k, b * N + j]) for k in range(3) for j in range(N)))
                         for b in range(B)]
            gaps.append(sum(per_state[b] - q_data[i, b] for b in range(B)) / B)
        assert losses["cql_gap"].item() == pytest.approx(((gaps[0] + gaps[1]) / 2).item(), rel=1e-5)
        if case == "no-lagrange":  # fixed weight: α' = 1, L_CQL = Σ_i α gap_i
            assert losses["alpha_prime"].item() == 1.0
            assert losses["cql_loss"].item() == pytest.approx((2.0 * (gaps[0] + gaps[1])).item(), rel=1e-5)
            assert agent.log_alpha_prime.item() == 0.0
        else:  # α' = exp(log α') = 1 before the step; L_CQL = Σ_i α' α (gap_i - target)
            excess = (gaps[0] - args.target_action_gap) + (gaps[1] - args.target_action_gap)
            assert losses["cql_loss"].item() == pytest.approx((2.0 * excess).item(), rel=1e-5)
            # Adam's first step moves log α' by lr against its gradient's sign: up while the gap exceeds the target
            assert (excess > 0) == (case != "alpha-prime-falls")
            assert agent.log_alpha_prime.item() == pytest.approx(args.critic_lr * math.copysign(1, excess), rel=1e-4)

        # the task policy's loss, with the critics after their step: E[α log π(c̃|s) - min_i Q_i(s, c̃)]
        # (imitation: - log π(c_data|s)) + λ E[log π(c̃|s) - log ρ(c̃|s)]
        new_choice, log_prob = policy(s)
        value = policy.log_prob(s, choice) if case == "imitate" else min_q(agent.critics, s, new_choice)
        prior_mean, prior_log_std = prior(s)
        log_rho = torch.distributions.Normal(prior_mean, prior_log_std.exp()).log_prob(new_choice).sum(-1)
        policy_loss = (0.3 * log_prob - value).mean() + 0.7 * (log_prob - log_rho).mean()
        assert losses["policy_loss"].item() == pytest.approx(policy_loss.item(), rel=1e-5)
        assert losses["alpha"].item() == pytest.approx(0.3, rel=1e-6)
        # the temperature rises when the policy's log-density is above -|target entropy| = -dim
        assert agent.log_alpha.item() == pytest.approx(
            math.log(0.3) + args.policy_lr * math.copysign(1, (log_prob.mean() - CHOICE).item()), rel=1e-4)

        # Polyak: Q̄ ← τ Q + (1 - τ) Q̄, with Q after its step
        for before, after, online in zip(targets.parameters(), agent.target_critics.parameters(),
                                         agent.critics.parameters()):
            assert torch.allclose(after, 0.9 * before + 0.1 * online, atol=1e-6)
        assert any(not torch.equal(a, b) for a, b in zip(critics.parameters(), agent.critics.parameters()))


def test_the_temperature_follows_the_entropy_target():
    # SAC: α rises while the policy's entropy E[-log π] is below the target entropy H̄, and falls while it is above.
    # This stand-in's log π is about -1 to -3, so H̄ = 10 makes α rise and H̄ = -10 makes it fall
    for target, direction in ((-CHOICE, None), (10.0, 1), (-10.0, -1)):
        agent, args, _ = make_agent()
        agent.target_entropy = target
        torch.manual_seed(1)
        s = torch.randn(B, OBS)
        log_prob = agent.task_policy(s)[1]
        agent.update(s, LOW + (HIGH - LOW) * torch.rand(B, CHOICE), torch.zeros(B), torch.randn(B, OBS),
                     torch.zeros(B), torch.full((B,), 0.9), step=1)
        expected = math.copysign(1, (log_prob.mean() + target).item())
        if direction is not None:
            assert expected == direction
        assert agent.log_alpha.item() == pytest.approx(math.log(0.3) + args.policy_lr * expected, rel=1e-4)


def test_cql_starts_as_sac_and_cql_prescribe():
    """α = α' = 1 at the start, H̄ = -dim, log μ = -log volume of the box, targets a copy of the critics with the
    same (fitted) normaliser, the policy's normaliser fitted too, and each optimiser at its own learning rate."""
    states = torch.randn(50, OBS) * 3 + 1
    agent = oc.CQL(OBS, LOW, HIGH, oc.Args(primitives="none", hidden_dim=8, critic_layers=2, policy_layers=2,
                                           bf16=False, policy_lr=1e-3, critic_lr=2e-2), states)
    assert agent.log_alpha.item() == 0.0 and agent.log_alpha_prime.item() == 0.0
    assert agent.target_entropy == -CHOICE
    assert agent.log_uniform_density.item() == pytest.approx(-math.log(4.0 * 0.5))
    assert all(torch.equal(a, b) for a, b in zip(agent.critics.state_dict().values(),
                                                 agent.target_critics.state_dict().values()))
    for module in (agent.critics, agent.task_policy):
        assert torch.allclose(module.normalize.mean, states.mean(0)) and torch.allclose(module.normalize.std, states.std(0))
    rates = {name: optimizer.param_groups[0]["lr"] for name, optimizer in agent.optimizers.items()}
    assert rates == {"policy_optimizer": 1e-3, "critic_optimizer": 2e-2, "alpha_optimizer": 1e-3,
                     "alpha_prime_optimizer": 2e-2}


@pytest.mark.learning
def test_cql_learns_a_one_step_task():
    """Learning, not just running: one-step episodes whose reward -(a - 0.8 s_0)² peaks at a state-dependent action,
    with uniformly random actions in the data. After 300 updates the deterministic policy acts near the best action
    and far better than it did untrained."""
    torch.manual_seed(0)
    # CQL(H) with a small fixed weight: with 3 n = 6 proposals the gap cannot fall below ~log 6, so a Lagrange
    # multiplier aiming at 0.8 would only grow here
    args = oc.Args(primitives="none", hidden_dim=32, critic_layers=2, policy_layers=2, bf16=False, cql_n_actions=2,
                   batch_size=64, policy_lr=3e-3, critic_lr=3e-3, lagrange=False, cql_alpha=0.1)
    states = torch.rand(2000, 2) * 2 - 1
    actions = torch.rand(2000, 1) * 2 - 1
    rewards = -(actions[:, 0] - 0.8 * states[:, 0]) ** 2
    agent = oc.CQL(2, -torch.ones(1), torch.ones(1), args, states)
    test_states = torch.rand(500, 2) * 2 - 1

    def error():
        with torch.no_grad():
            return (agent.task_policy(test_states, deterministic=True)[0][:, 0] - 0.8 * test_states[:, 0]).abs().mean()

    untrained = error()
    for _ in range(300):
        batch = torch.randint(2000, (64,))
        agent.update(states[batch], actions[batch], rewards[batch], states[batch], torch.ones(64), torch.full((64,), 0.99),
                     step=1)  # every transition ends its episode
    assert error() < 0.12 and error() < 0.3 * untrained

"""Mutation check: does the test suite catch a wrong algorithm?

Each mutant below is one small, plausible bug in the scripts' math (a sign, a sum that became a mean, a forgotten
mask). The check applies one mutant at a time to a copy of the repository, runs the in-process unit tests
(`pytest -m "not script and not learning"`, ~15 s; the two learning tests take longer and are left out) and
counts the mutant killed when a test fails. A mutant of a shared block is applied to every script that carries
the block, and the drift test is left out, so only tests of the math count.

    python tests/mutation_check.py                 # all mutants; prints the survivors and the score
    python tests/mutation_check.py --only cql-     # the mutants whose name starts with cql-
    python tests/mutation_check.py --list          # check that every mutant still applies, run nothing
    python tests/mutation_check.py --in-process --jobs 2   # minutes instead of half an hour: each mutant runs in an
                                                   # already loaded Python against the in-process tests of the
                                                   # scripts it changes (tests/mutation_mechanical.py's workers)

A mutant whose text no longer occurs in the scripts is reported as stale (the code moved on; update the list).
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("opal_utils.py", "opal_vae.py", "opal_cql.py", "opal_fewshot_il.py", "opal_online_sac.py", "opal_mt_transfer.py",
           "collect_data.py")

# (name, original text, mutated text): the original must occur once in each script it occurs in
MUTANTS = [
    # --- shared: networks ---
    ("net-logprob-no-log-std", "** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)",
     "** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)"),
    ("net-logprob-mean-over-dims", "- 0.5 * math.log(2 * math.pi)).sum(-1)", "- 0.5 * math.log(2 * math.pi)).mean(-1)"),
    ("net-logprob-variance-not-std", "-0.5 * ((x - mean) / log_std.exp()) ** 2", "-0.5 * ((x - mean) / (2 * log_std).exp()) ** 2"),
    ("net-no-log-std-clamp", "return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)", "return mean, log_std"),
    ("net-log-std-min-20", "LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0", "LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0"),
    ("net-head-halves-swapped", "mean, log_std = output.float().chunk(2, dim=-1)",
     "log_std, mean = output.float().chunk(2, dim=-1)"),
    ("net-normalizer-no-std-floor", "self.std.copy_(states.std(0).clamp_min(1e-3))", "self.std.copy_(states.std(0))"),
    ("net-normalizer-variance", "self.std.copy_(states.std(0).clamp_min(1e-3))", "self.std.copy_(states.var(0).clamp_min(1e-3))"),
    ("net-normalizer-no-division", "return (states - self.mean) / self.std", "return states - self.mean"),
    ("net-mlp-one-hidden-layer-less", "    for _ in range(hidden_layers):\n        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]",
     "    for _ in range(hidden_layers - 1):\n        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]"),
    ("net-mlp-tanh", "layers += [nn.Linear(width, hidden_dim), nn.ReLU()]", "layers += [nn.Linear(width, hidden_dim), nn.Tanh()]"),
    # --- shared: encoder, prior, primitive policy ---
    ("enc-first-layer-states", "torch.cat([final_states[-2], final_states[-1]], -1)",
     "torch.cat([final_states[0], final_states[1]], -1)"),
    ("enc-forward-state-twice", "torch.cat([final_states[-2], final_states[-1]], -1)",
     "torch.cat([final_states[-2], final_states[-2]], -1)"),
    ("enc-no-state-normalisation", "self.embed(torch.cat([self.normalize(states), actions], -1))",
     "self.embed(torch.cat([states, actions], -1))"),
    ("enc-relabel-with-log-std", "torch.cat([encoder(observations[r], actions[r])[0] for r in window_rows(",
     "torch.cat([encoder(observations[r], actions[r])[1] for r in window_rows("),
    ("enc-relabel-window-shifted", "for r in window_rows(starts, c).split(4096)])", "for r in window_rows(starts + 1, c).split(4096)])"),
    ("prior-no-state-normalisation", "return gaussian_head(self.net(self.normalize(first_states)))",
     "return gaussian_head(self.net(first_states))"),
    ("primitive-no-state-normalisation", "return gaussian_head(self.net(torch.cat([self.normalize(states), latents], -1)))",
     "return gaussian_head(self.net(torch.cat([states, latents], -1)))"),
    # --- shared: offline_data ---
    ("slicer-ignores-stride", "return offsets[episode] + rank * stride", "return offsets[episode] + rank"),
    ("slicer-drops-last-window", "(lengths - c) // stride + 1, torch.zeros_like(lengths)",
     "(lengths - c) // stride, torch.zeros_like(lengths)"),
    ("slicer-no-padding-row", "offsets = torch.cumsum(lengths + 1, 0) - (lengths + 1)",
     "offsets = torch.cumsum(lengths, 0) - lengths"),
    ("slicer-needs-longer-episode", "torch.where(lengths >= c,", "torch.where(lengths > c,"),
    # --- shared: run (the bf16 choice) ---
    ("run-bf16-on-at-a-near-tie", "faster = bf16 <= 0.8 * fp32", "faster = bf16 <= fp32"),
    ("run-bf16-probed-again-on-resume", "if not requested or resumed:", "if not requested:"),
    ("run-bf16-probe-draws-the-runs-random-numbers",
     "    with torch.random.fork_rng(devices=[device] if cuda else []):\n        if graphed:",
     "    if True:\n        if graphed:"),
    # --- opal_vae.py: the β-VAE loss (Eq. 1) and BC fine-tuning ---
    ("vae-kl-mean-over-dims", "(var_q + (mean_q - mean_p) ** 2) / (2 * var_p) - 0.5).sum(-1)",
     "(var_q + (mean_q - mean_p) ** 2) / (2 * var_p) - 0.5).mean(-1)"),
    ("vae-kl-std-for-variance", "var_q, var_p = (2 * log_std_q).exp(), (2 * log_std_p).exp()",
     "var_q, var_p = log_std_q.exp(), log_std_p.exp()"),
    ("vae-kl-log-ratio-sign", "return (log_std_p - log_std_q + (var_q", "return (log_std_q - log_std_p + (var_q"),
    ("vae-kl-direction", "kl = gaussian_kl(mean_q, log_std_q, *prior(states[:, 0]))",
     "kl = gaussian_kl(*prior(states[:, 0]), mean_q, log_std_q)"),
    ("vae-prior-on-last-state", "kl = gaussian_kl(mean_q, log_std_q, *prior(states[:, 0]))",
     "kl = gaussian_kl(mean_q, log_std_q, *prior(states[:, -1]))"),
    ("vae-no-sampling", "latents = mean_q + log_std_q.exp() * noise", "latents = mean_q + 0 * noise"),
    ("vae-sample-with-variance", "latents = mean_q + log_std_q.exp() * noise", "latents = mean_q + (2 * log_std_q).exp() * noise"),
    ("vae-beta-sign", "return (reconstruction_nll + beta * kl).mean()", "return (reconstruction_nll - beta * kl).mean()"),
    ("vae-beta-ignored", "return (reconstruction_nll + beta * kl).mean()", "return (reconstruction_nll + kl).mean()"),
    ("vae-nll-mean-over-window", "reconstruction_nll = -gaussian_log_prob(actions, mean_a, log_std_a).sum(1)",
     "reconstruction_nll = -gaussian_log_prob(actions, mean_a, log_std_a).mean(1)"),
    ("vae-decoder-reads-posterior-mean",
     "mean_a, log_std_a = primitive_policy(states, latents.unsqueeze(1).expand(-1, states.shape[1], -1))\n    reconstruction_nll",
     "mean_a, log_std_a = primitive_policy(states, mean_q.unsqueeze(1).expand(-1, states.shape[1], -1))\n    reconstruction_nll"),
    ("vae-bc-mean-over-window", "return -gaussian_log_prob(actions, mean_a, log_std_a).sum(1).mean()",
     "return -gaussian_log_prob(actions, mean_a, log_std_a).mean(1).mean()"),
    ("vae-bc-first-state-only",
     "mean_a, log_std_a = primitive_policy(states, latents.unsqueeze(1).expand(-1, states.shape[1], -1))\n    return",
     "mean_a, log_std_a = primitive_policy(states[:, :1].expand_as(states), latents.unsqueeze(1).expand(-1, states.shape[1], -1))\n    return"),
    ("vae-action-mse-from-log-std", "    mean_a, _ = primitive_policy(states, encoder(states, actions)[0]",
     "    _, mean_a = primitive_policy(states, encoder(states, actions)[0]"),
    ("vae-action-mse-z-from-log-std", "primitive_policy(states, encoder(states, actions)[0].unsqueeze(1)",
     "primitive_policy(states, encoder(states, actions)[1].unsqueeze(1)"),
    ("vae-action-mse-root", "    return F.mse_loss(mean_a, actions)\n", "    return F.mse_loss(mean_a, actions).sqrt()\n"),
    ("window-rows-one-late", "    return starts[:, None] + torch.arange(c, device=starts.device)",
     "    return starts[:, None] + torch.arange(1, c + 1, device=starts.device)"),
    ("window-rows-one-more", "    return starts[:, None] + torch.arange(c, device=starts.device)",
     "    return starts[:, None] + torch.arange(c + 1, device=starts.device)"),
    ("rollout-compares-one-step-early", 'obs["achieved_goal"] - goal[row + c].cpu().numpy()',
     'obs["achieved_goal"] - goal[row + c - 1].cpu().numpy()'),
    ("rollout-one-step-less", "            for _ in range(c):\n                action, _ = primitive_policy(state[None]",
     "            for _ in range(c - 1):\n                action, _ = primitive_policy(state[None]"),
    ("rollout-moved-one-step-less", "moved = (goal[chosen + c] - goal[chosen])", "moved = (goal[chosen + c - 1] - goal[chosen])"),
    # --- opal_cql.py: the task's reward and OPAL's relabelling ---
    ("reward-radius-2", "SUCCESS_RADIUS = 0.45", "SUCCESS_RADIUS = 2.0"),
    ("reward-on-current-state", "rewards[:-1] = reached[1:].float()", "rewards[:] = reached.float()"),
    ("reward-padding-row-kept", "rewards[last_rows.to(rewards.device)] = 0.0", "rewards[last_rows.to(rewards.device)] += 0.0"),
    ("reward-shaping-bias-sign", "return scale * rewards + bias, rewards", "return scale * rewards - bias, rewards"),
    ("reward-shaping-on-termination", "return scale * rewards + bias, rewards", "return scale * rewards + bias, scale * rewards + bias"),
    ("reward-shaping-skipped-off-mazes", 'return scale * data["rewards"] + bias, data["terminations"]',
     'return data["rewards"], data["terminations"]'),
    ("relabel-discount-from-1", "discounts = gamma ** torch.arange(c, dtype=torch.float32",
     "discounts = gamma ** torch.arange(1, c + 1, dtype=torch.float32"),
    ("relabel-drops-the-goal-reward",
     "alive = torch.cumprod(torch.cat([torch.ones_like(window_dones[:, :1]), ~window_dones[:, :-1]], 1), 1)",
     "alive = torch.cumprod(~window_dones, 1)"),
    ("relabel-no-mask-after-goal", "returns = (rewards[rows] * alive * discounts).sum(1)",
     "returns = (rewards[rows] * discounts).sum(1)"),
    ("relabel-steps-off-by-one", "window_dones.float().argmax(1) + 1, torch.full_like(starts, c)",
     "window_dones.float().argmax(1), torch.full_like(starts, c)"),
    ("relabel-done-only-at-window-end", "done = window_dones.any(1)", "done = window_dones[:, -1]"),
    ("backup-rules-swapped", 'steps.float() if rule == "window" else', 'steps.float() if rule == "decision" else'),
    ("box-std-ignores-k", "low, high = latents.mean(0) - stds * latents.std(0), latents.mean(0) + stds * latents.std(0)",
     "low, high = latents.mean(0) - latents.std(0), latents.mean(0) + latents.std(0)"),
    ("box-margin-of-high", "return low - margin * (high - low), high + margin * (high - low)",
     "return low - margin * high, high + margin * high"),
    # --- shared: task_policy (tanh-Gaussian in a box) ---
    ("tanh-no-half-range-jacobian",
     "log_prob = log_prob - (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)\n        return self.center",
     "log_prob = log_prob - torch.log1p(-squashed.pow(2) + 1e-6).sum(-1)\n        return self.center"),
    ("tanh-jacobian-sign",
     "log_prob = log_prob - (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)\n        return self.center",
     "log_prob = log_prob + (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)\n        return self.center"),
    ("tanh-log-prob-no-half-range-jacobian",
     "return log_prob - (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)",
     "return log_prob - torch.log1p(-squashed.pow(2) + 1e-6).sum(-1)"),
    ("tanh-no-center", "return self.center + self.half_range * squashed, log_prob", "return self.half_range * squashed, log_prob"),
    ("tanh-full-range", '"half_range", (torch.as_tensor(high) - torch.as_tensor(low)).float() / 2)',
     '"half_range", (torch.as_tensor(high) - torch.as_tensor(low)).float())'),
    ("tanh-deterministic-samples", "pre_tanh = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)",
     "pre_tanh = mean + log_std.exp() * torch.randn_like(mean)"),
    ("tanh-log-prob-ignores-center", "squashed = ((actions - self.center) / self.half_range).clamp(-0.999, 0.999)",
     "squashed = (actions / self.half_range).clamp(-0.999, 0.999)"),
    # --- shared: critics ---
    ("critics-identical-init", "            for member in range(ensemble):\n                layer = nn.Linear(in_dim, out_dim)\n",
     "            layer = nn.Linear(in_dim, out_dim)\n            for member in range(ensemble):\n"),
    ("critics-no-bias", "return torch.baddbmm(self.bias, x, self.weight)", "return torch.bmm(x, self.weight)"),
    ("critics-no-state-normalisation", "x = torch.cat([self.normalize(states), actions], -1).unsqueeze(0)",
     "x = torch.cat([states, actions], -1).unsqueeze(0)"),
    ("critics-one-layer-less", "widths = [obs_dim + act_dim] + [hidden_dim] * layers",
     "widths = [obs_dim + act_dim] + [hidden_dim] * (layers - 1)"),
    # --- opal_cql.py: the CQL update ---
    ("cql-normalisers-not-fitted", "            module.normalize.fit(all_states)\n        self.target_critics = copy.deepcopy(self.critics)",
     "            pass\n        self.target_critics = copy.deepcopy(self.critics)"),
    ("cql-alpha-starts-at-0.1", "self.log_alpha = torch.zeros((), device=device, requires_grad=True)",
     "self.log_alpha = torch.full((), -2.3, device=device, requires_grad=True)"),
    ("cql-critic-at-policy-lr", "torch.optim.Adam(self.critics.parameters(), lr=args.critic_lr, fused=True)",
     "torch.optim.Adam(self.critics.parameters(), lr=args.policy_lr, fused=True)"),
    ("cql-target-max-over-critics", "next_q = self.target_critics(s_next_n, self.task_policy(s_next_n)[0]).min(0).values",
     "next_q = self.target_critics(s_next_n, self.task_policy(s_next_n)[0]).max(0).values"),
    ("cql-target-mean-over-samples", "next_q = next_q.view(B, n).max(1).values", "next_q = next_q.view(B, n).mean(1)"),
    ("cql-target-from-online-critics", "next_q = self.target_critics(s_next_n,", "next_q = self.critics(s_next_n,"),
    ("cql-target-ignores-done", "target = reward + (1 - done) * discount * next_q", "target = reward + discount * next_q"),
    ("cql-target-done-not-negated", "target = reward + (1 - done) * discount * next_q", "target = reward + done * discount * next_q"),
    ("cql-target-ignores-discount", "target = reward + (1 - done) * discount * next_q", "target = reward + (1 - done) * next_q"),
    ("cql-single-target-max-over-critics", "next_q = self.target_critics(s_next, self.task_policy(s_next)[0]).min(0).values",
     "next_q = self.target_critics(s_next, self.task_policy(s_next)[0]).max(0).values"),
    ("cql-copies-tiled-not-interleaved", "s_n, s_next_n = s.repeat_interleave(n, 0), s_next.repeat_interleave(n, 0)",
     "s_n, s_next_n = s.repeat(n, 1), s_next.repeat(n, 1)"),
    ("cql-uniform-outside-box", "uniform = self.low + (self.high - self.low) * torch.rand(",
     "uniform = self.low + torch.rand("),
    ("cql-next-proposals-at-s", "from_next, log_mu_next = self.task_policy(s_next_n)", "from_next, log_mu_next = self.task_policy(s_n)"),
    ("cql-uniform-density-sign", "self.log_uniform_density = -(choice_high - choice_low).log().sum()",
     "self.log_uniform_density = (choice_high - choice_low).log().sum()"),
    ("cql-no-uniform-importance", "(q_uniform - self.log_uniform_density).view(E, B, n)", "q_uniform.view(E, B, n)"),
    ("cql-no-policy-importance", "(q_policy - log_mu_policy).view(E, B, n)", "q_policy.view(E, B, n)"),
    ("cql-no-next-importance", "(q_next - log_mu_next).view(E, B, n)", "q_next.view(E, B, n)"),
    ("cql-max-not-logsumexp", "gap = (torch.logsumexp(weighted, -1) - q_data).mean(1)", "gap = (weighted.max(-1).values - q_data).mean(1)"),
    ("cql-gap-without-data-q", "gap = (torch.logsumexp(weighted, -1) - q_data).mean(1)", "gap = torch.logsumexp(weighted, -1).mean(1)"),
    ("cql-td-without-half", "td_loss = 0.5 * ((q_data - target) ** 2).mean(1).sum()", "td_loss = ((q_data - target) ** 2).mean(1).sum()"),
    ("cql-td-mean-over-critics", "td_loss = 0.5 * ((q_data - target) ** 2).mean(1).sum()",
     "td_loss = 0.5 * ((q_data - target) ** 2).mean(1).mean()"),
    ("cql-lagrange-sign", "-(alpha_prime * args.cql_alpha * (gap.detach() - args.target_action_gap)).sum())",
     "(alpha_prime * args.cql_alpha * (gap.detach() - args.target_action_gap)).sum())"),
    ("cql-lagrange-target-sign", "cql_loss = (alpha_prime.detach() * args.cql_alpha * (gap - args.target_action_gap)).sum()",
     "cql_loss = (alpha_prime.detach() * args.cql_alpha * (gap + args.target_action_gap)).sum()"),
    ("cql-no-lagrange-mean", "cql_loss = (args.cql_alpha * gap).sum()", "cql_loss = (args.cql_alpha * gap).mean()"),
    ("cql-lagrange-default-inverted", 'self.lagrange = self.primitives == "none"', 'self.lagrange = self.primitives == "opal"'),
    ("cql-lagrange-default-always", 'self.lagrange = self.primitives == "none"', "self.lagrange = True"),
    ("cql-actor-sign", "policy_loss = (alpha * log_prob - value).mean()", "policy_loss = (alpha * log_prob + value).mean()"),
    ("cql-actor-max-over-critics", "else self.critics(s, new_choice).min(0).values", "else self.critics(s, new_choice).max(0).values"),
    ("cql-imitation-one-step-short", "imitate = step <= self.args.policy_bc_steps", "imitate = step < self.args.policy_bc_steps"),
    ("cql-imitation-one-step-long", "imitate = step <= self.args.policy_bc_steps", "imitate = step <= self.args.policy_bc_steps + 1"),
    ("cql-imitation-inverted", "value = self.task_policy.log_prob(s, choice) if imitate else",
     "value = self.task_policy.log_prob(s, choice) if not imitate else"),
    ("cql-alpha-not-exponentiated", "alpha = self.log_alpha.exp().detach()", "alpha = self.log_alpha.detach()"),
    ("cql-alpha-loss-sign", '"alpha_optimizer", -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()',
     '"alpha_optimizer", (self.log_alpha * (log_prob.detach() + self.target_entropy)).mean()'),
    ("cql-target-entropy-sign", "self.target_entropy = -float(choice_dim)", "self.target_entropy = float(choice_dim)"),
    ("cql-polyak-tau-1", "list(self.critics.parameters()), args.tau)", "list(self.critics.parameters()), 1.0)"),
    ("cql-polyak-reversed", "torch._foreach_lerp_(list(self.target_critics.parameters()), list(self.critics.parameters()), args.tau)",
     "torch._foreach_lerp_(list(self.critics.parameters()), list(self.target_critics.parameters()), args.tau)"),
    ("cql-prior-kl-sign", "log_prob - gaussian_log_prob(new_choice, *self.prior(s))).mean()",
     "gaussian_log_prob(new_choice, *self.prior(s)) - log_prob).mean()"),
    ("cql-prior-kl-unweighted", "policy_loss = policy_loss + args.prior_kl_weight * (", "policy_loss = policy_loss + ("),
    # --- shared: evaluation ---
    ("eval-return-after-the-end", "episode_return += reward * running", "episode_return += reward"),
    ("eval-success-after-the-end", 'dtype=bool) & running\n', 'dtype=bool)\n'),
    ("eval-closest-after-the-end", "closest = np.where(running, np.fmin(closest, distance), closest)",
     "closest = np.fmin(closest, distance)"),
    ("eval-choice-every-step", "        if t % self.c == 0:  # a new high-level decision", "        if True:"),
    ("eval-stale-state-for-primitive",  # the primitive reads the state of the decision, not the current one
     "deterministic=True)\n        action = self.choice if self.primitive_policy is None else self.primitive_policy(states,",
     "deterministic=True)\n            self.decided_at = states\n"
     "        action = self.choice if self.primitive_policy is None else self.primitive_policy(self.decided_at,"),
    ("eval-no-action-clip", "envs.step(np.clip(action, act_low, act_high))", "envs.step(action)"),
    ("eval-extra-episodes-counted", "return (float(np.mean(successes[:episodes])), float(np.mean(returns[:episodes])),",
     "return (float(np.mean(successes)), float(np.mean(returns)),"),
    ("eval-score-not-percent", "return 100.0 * success_rate", "return success_rate"),
    # --- opal_fewshot_il.py: relabelling, choice of demonstrations, the task policy's likelihood ---
    ("fs-relabel-stride-c", 'starts = window_starts(demos["episode_lengths"], c, stride=1)',
     'starts = window_starts(demos["episode_lengths"], c, stride=c)'),
    ("fs-relabel-next-action", 'return starts, demos["actions"][starts]', 'return starts, demos["actions"][starts + 1]'),
    ("fs-nll-sum-over-batch", "return -task_policy.log_prob(first_states, choices).mean()",
     "return -task_policy.log_prob(first_states, choices).sum()"),
    ("fs-nll-sign", "return -task_policy.log_prob(first_states, choices).mean()",
     "return task_policy.log_prob(first_states, choices).mean()"),
    ("fs-pick-with-replacement", "choice(len(lengths), num_demos, replace=False)",
     "choice(len(lengths), num_demos, replace=True)"),
    ("fs-pick-unsorted", "chosen = np.sort(np.random.default_rng(seed).choice(",
     "chosen = np.asarray(np.random.default_rng(seed).choice("),
    ("fs-pick-drops-last-row", "torch.arange(first_rows[e], first_rows[e] + lengths[e] + 1)",
     "torch.arange(first_rows[e], first_rows[e] + lengths[e])"),
    ("fs-pick-refuses-all", "if num_demos > len(lengths):", "if num_demos >= len(lengths):"),
    # --- opal_online_sac.py ---
    ("sac-smdp-undiscounted", "returns = returns + gamma ** steps.float() * rewards", "returns = returns + rewards"),
    ("sac-smdp-discount-one-late", "returns = returns + gamma ** steps.float() * rewards",
     "returns = returns + gamma ** (steps.float() + 1) * rewards"),
    ("sac-smdp-ignores-episode-end", "return returns, steps, ended | (steps == c)", "return returns, steps, steps == c"),
    ("sac-buffer-no-wrap", "index = (self.position + torch.arange(rows_added, device=rows[\"states\"].device)) % self.capacity",
     "index = (self.position + torch.arange(rows_added, device=rows[\"states\"].device)).clamp_max(self.capacity - 1)"),
    ("sac-target-bootstraps-at-done", "target = reward + (1 - done) * discount * next_value",
     "target = reward + discount * next_value"),
    ("sac-target-max-of-critics", "next_value = self.target_critics(s_next, next_choice).min(0).values",
     "next_value = self.target_critics(s_next, next_choice).max(0).values"),
    ("sac-critic-loss-mean-over-critics", "critic_loss = ((q - target) ** 2).mean(1).sum()",
     "critic_loss = ((q - target) ** 2).mean()"),
    ("sac-prior-penalty-sign", "log_prob - gaussian_log_prob(choice, *self.prior(s))",
     "log_prob + gaussian_log_prob(choice, *self.prior(s))"),
    ("sac-alpha-sign", "-(self.log_alpha * (penalty.detach() - self.penalty_target)).mean()",
     "(self.log_alpha * (penalty.detach() - self.penalty_target)).mean()"),
    ("sac-entropy-target-sign", "self.penalty_target = float(choice_dim) if prior is None",
     "self.penalty_target = -float(choice_dim) if prior is None"),
    ("sac-prior-start-ignores-spread", "z = (mean + log_std.exp() * noise).clamp(low, high)",
     "z = mean.clamp(low, high)"),
    # --- opal_mt_transfer.py ---
    ("ppo-gae-no-lambda", "next_advantage = delta + discount * lam * not_done * next_advantage",
     "next_advantage = delta + discount * not_done * next_advantage"),
    ("ppo-gae-advantage-crosses-episodes", "next_advantage = delta + discount * lam * not_done * next_advantage",
     "next_advantage = delta + discount * lam * next_advantage"),
    ("ppo-gae-bootstraps-episode-end", "delta = rewards[k] + discount * not_done * next_values - values[k]",
     "delta = rewards[k] + discount * next_values - values[k]"),
    ("ppo-targets-are-advantages", "return advantages, advantages + values", "return advantages, advantages"),
    ("ppo-surrogate-optimistic", "return torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))",
     "return torch.min(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))"),
    ("ppo-surrogate-unclipped", "-advantages * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()", "-advantages * ratio).mean()"),
    ("ppo-value-loss-no-half", "return 0.5 * torch.max((values - targets) ** 2", "return torch.max((values - targets) ** 2"),
    ("ppo-value-clip-not-around-old", "clipped = old_values + (values - old_values).clamp(-clip, clip)",
     "clipped = values.clamp(-clip, clip)"),
    ("ppo-normalizer-mean-ignores-count", "self.mean.add_(delta * batch_count / total)", "self.mean.add_(delta / total)"),
    ("ppo-normalizer-unclipped", "return ((x - self.mean) / (self.var + 1e-8).sqrt()).clamp(-10.0, 10.0)",
     "return (x - self.mean) / (self.var + 1e-8).sqrt()"),
    ("ppo-reward-return-never-restarts", "self.returns.mul_(1.0 - dones)", "self.returns.mul_(1.0)"),
    ("ppo-reward-scaled-by-variance", "return (rewards / (self.stats.var[0] + 1e-8).sqrt()).clamp(-10.0, 10.0)",
     "return (rewards / (self.stats.var[0] + 1e-8)).clamp(-10.0, 10.0)"),
    ("ppo-held-choice-one-step-too-long", "due = self.held_for >= self.c", "due = self.held_for > self.c"),
    ("ppo-prior-choice-variance", "            choices = mean + log_std.exp() * choices\n",
     "            choices = mean + (2 * log_std).exp() * choices\n"),
    ("ppo-prior-choice-unclipped", "        return choices.clamp(self.low, self.high)\n", "        return choices\n"),
    ("ppo-held-choice-reset-ignored", "        self.held_for[mask] = self.c\n", "        self.held_for[mask] = 1\n"),
    # --- the five a reviewer's mutants showed uncaught (issue 35) ---
    ("review-cql-regulariser-not-stepped", 'self.step("critic_optimizer", td_loss + cql_loss)',
     'self.step("critic_optimizer", td_loss)'),
    ("review-sac-next-choice-at-s", "next_choice, next_log_prob = self.task_policy(s_next)",
     "next_choice, next_log_prob = self.task_policy(s)"),
    ("review-eval-samples-the-choice", "self.choice, _ = self.task_policy(states, deterministic=True)",
     "self.choice, _ = self.task_policy(states, deterministic=False)"),
    ("review-buffer-samples-unfilled-rows", "index = torch.randint(self.size, (batch_size,)",
     "index = torch.randint(self.capacity, (batch_size,)"),
    ("review-ppo-ratio-inverted", 'log_ratio = log_probs - batch["log_probs"][index]',
     'log_ratio = batch["log_probs"][index] - log_probs'),
]


def apply(tree: Path, old: str, new: str) -> list:
    """Writes the mutant into every script of `tree` that contains `old`; returns their names."""
    changed = []
    for name in SCRIPTS:
        path = tree / name
        text = path.read_text()
        count = text.count(old)
        if count > 1:
            raise SystemExit(f"mutant text occurs {count} times in {name}; make it unique:\n{old}")
        if count == 1:
            path.write_text(text.replace(old, new))
            changed.append(name)
    return changed


def run_in_process_check(args):
    """--in-process: every mutant as {file: mutated text} for the scripts it changes, run by mutation_mechanical's
    workers against the in-process tests that can see those scripts."""
    sys.path.insert(0, str(ROOT / "tests"))
    import json

    from mutation_mechanical import TESTS, run_in_process

    originals = {name: (ROOT / name).read_text() for name in SCRIPTS}
    mutants, stale, elsewhere = [], [], []
    for name, old, new in (m for m in MUTANTS if m[0].startswith(args.only)):
        sources = {script: text.replace(old, new) for script, text in originals.items() if text.count(old) == 1}
        if not sources:
            stale.append(name)
        elif not set(sources) <= set(TESTS):
            elsewhere.append(name)
        else:
            mutants.append({"key": name, "target": f"{next(iter(sources))}:{name}", "line": 0, "kind": "hand",
                            "original": old, "mutated": new, "sources": sources})
    out = Path(tempfile.mkdtemp()) / "results.jsonl"
    started = time.time()
    run_in_process(mutants, args.jobs, out, args.timeout)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    survivors = sorted(r["key"] for r in records if not r["killed"])
    lost = sorted({m["key"] for m in mutants} - {r["key"] for r in records})
    print(f"\nmutation score: {len(records) - len(survivors)} of {len(records)} mutants killed in-process "
          f"({time.time() - started:.0f} s)" + (f"; not run in-process (a file without in-process tests): "
                                               f"{', '.join(elsewhere)}" if elsewhere else ""))
    for label, names in (("survivors", survivors), ("stale", stale), ("lost (a worker died)", lost)):
        if names:
            print(f"{label}: {', '.join(names)}")
    sys.exit(1 if survivors or stale or lost else 0)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="run only the mutants whose name starts with this")
    parser.add_argument("--list", action="store_true", help="check that every mutant applies; run no tests")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per mutant's test run (a hang counts killed)")
    parser.add_argument("--in-process", action="store_true", help="run the mutants in loaded Python workers")
    parser.add_argument("--jobs", type=int, default=2, help="--in-process: worker processes")
    args = parser.parse_args()
    if args.in_process and not args.list:
        return run_in_process_check(args)
    mutants = [m for m in MUTANTS if m[0].startswith(args.only)]
    names = [m[0] for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"

    with tempfile.TemporaryDirectory() as temporary:
        tree = Path(temporary) / "opal"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "__pycache__", "*.pt"))
        originals = {name: (tree / name).read_text() for name in SCRIPTS}
        stale, survivors, killed = [], [], 0
        started = time.time()
        for index, (name, old, new) in enumerate(mutants, 1):
            for script, text in originals.items():
                (tree / script).write_text(text)
            if not apply(tree, old, new):
                stale.append(name)
                continue
            if args.list:
                continue
            command = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not script and not learning", "-p", "no:cacheprovider",
                       "--ignore", "tests/test_shared_blocks.py"]
            try:
                result = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=args.timeout)
                caught = result.returncode != 0
            except subprocess.TimeoutExpired:
                caught = True
            killed += caught
            if not caught:
                survivors.append(name)
            print(f"[{index}/{len(mutants)}] {'killed  ' if caught else 'SURVIVED'} {name}", flush=True)
    if stale:
        print(f"stale (text not found in any script): {', '.join(stale)}")
    if args.list:
        print(f"{len(mutants) - len(stale)} of {len(mutants)} mutants apply")
        sys.exit(1 if stale else 0)
    tested = len(mutants) - len(stale)
    print(f"\nmutation score: {killed} of {tested} mutants killed ({time.time() - started:.0f} s)")
    if survivors:
        print("survivors: " + ", ".join(survivors))
    sys.exit(1 if stale or survivors else 0)


if __name__ == "__main__":
    main()

"""Speed of opal_cql.py on this machine: CQL gradient steps/s in both modes (latent z of dim 8 with OPAL, raw
actions without) at our pointmaze table's size and at CORL's antmaze size, and evaluation env-steps/s with one
environment versus a vector of them.

Run:  python benchmarks/bench_cql.py
      python benchmarks/bench_cql.py --threads 1 --seconds 10
Timing only: nothing here is asserted, and the tests never time anything.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_cql as oc  # noqa: E402


@dataclass
class Args:
    seconds: float = 10.0
    """time budget of each measurement"""
    threads: int = 0
    """torch threads (0: torch's default)"""
    bf16: bool = True
    """also time the update under torch.autocast(bfloat16)"""


def cql_update(obs_dim, choice_dim, hidden, critic_layers, policy_layers, n, batch_size, bf16):
    """One CQL step with the same operations as opal_cql.py's loop, on random data of the given shapes."""
    torch.manual_seed(0)
    low, high = -torch.ones(choice_dim), torch.ones(choice_dim)
    policy = oc.TanhGaussianPolicy(obs_dim, choice_dim, low, high, hidden, policy_layers)
    critics = oc.Critics(obs_dim, choice_dim, hidden, critic_layers)
    targets = oc.Critics(obs_dim, choice_dim, hidden, critic_layers).requires_grad_(False)
    policy_optimizer = torch.optim.Adam(policy.parameters(), 1e-4, fused=True)
    critic_optimizer = torch.optim.Adam(critics.parameters(), 3e-4, fused=True)
    s, z, s_next = torch.randn(batch_size, obs_dim), torch.rand(batch_size, choice_dim) * 2 - 1, torch.randn(batch_size, obs_dim)
    reward = torch.randn(batch_size)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            with torch.no_grad():
                next_choice, _ = policy(s_next.repeat_interleave(n, 0))
                target = reward + 0.9 * targets(s_next.repeat_interleave(n, 0), next_choice).min(0).values.view(-1, n).max(1).values
            q = critics(s, z)
            s_rep = s.repeat_interleave(n, 0)
            with torch.no_grad():
                pi, log_pi = policy(s_rep)
                pi_next, log_pi_next = policy(s_next.repeat_interleave(n, 0))
            sampled = torch.cat([critics(s_rep, torch.rand(len(s_rep), choice_dim) * 2 - 1).view(2, -1, n),
                                 (critics(s_rep, pi) - log_pi).view(2, -1, n),
                                 (critics(s_rep, pi_next) - log_pi_next).view(2, -1, n)], -1)
            critic_loss = 0.5 * ((q - target) ** 2).mean(1).sum() + 5 * (torch.logsumexp(sampled, -1) - q).mean(1).sum()
        critic_optimizer.zero_grad(set_to_none=True)
        critic_loss.float().backward()
        critic_optimizer.step()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            new_choice, log_prob = policy(s)
            policy_loss = (0.1 * log_prob - critics(s, new_choice).min(0).values).mean()
        policy_optimizer.zero_grad(set_to_none=True)
        policy_loss.float().backward()
        policy_optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(targets.parameters()), list(critics.parameters()), 0.005)

    return step


def rate(function, seconds, warmup=3):
    for _ in range(warmup):
        function()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        function()
        count += 1
    return count / (time.perf_counter() - start)


def evaluation_rate(num_envs, episodes=10, env_id="PointMaze_Large-v3"):
    """env-steps/s of oc.evaluate (policy included) on `episodes` full episodes of 800 steps, raw-action mode."""
    make = lambda: gym.make(env_id, continuing_task=True, reset_target=False)
    envs = gym.vector.SyncVectorEnv([make for _ in range(num_envs)])
    policy = oc.TanhGaussianPolicy(4, 2, -torch.ones(2), torch.ones(2), 256, 3)
    start = time.perf_counter()
    oc.evaluate(envs, ["observation"], policy, None, 1, episodes, 0, -np.ones(2), np.ones(2))  # (success, return, distance)
    seconds = time.perf_counter() - start
    envs.close()
    return episodes * 800 / seconds


if __name__ == "__main__":
    args = tyro.cli(Args)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; CQL at batch 256, 10 sampled choices")
    print(f"{'setting':<46} {'mode':<12} {'fp32 steps/s':>12} {'bf16 steps/s':>12}")
    for label, hidden, critic_layers, policy_layers, obs_dim, act_dim in [
        ("pointmaze table (critics 3x128, policy 3x128)", 128, 3, 3, 4, 2),
        ("CORL antmaze (critics 5x256, policy 3x256)", 256, 5, 3, 29, 8),
    ]:
        for mode, choice_dim in (("OPAL (z 8)", 8), (f"raw (a {act_dim})", act_dim)):
            fp32 = rate(cql_update(obs_dim, choice_dim, hidden, critic_layers, policy_layers, 10, 256, False), args.seconds)
            bf16 = rate(cql_update(obs_dim, choice_dim, hidden, critic_layers, policy_layers, 10, 256, True), args.seconds) if args.bf16 else float("nan")
            print(f"{label:<46} {mode:<12} {fp32:>12.1f} {bf16:>12.1f}")
    print("evaluation (opal_cql.evaluate, policy 3x256 on raw actions), PointMaze_Large-v3, 10 episodes of 800 steps:")
    for num_envs in (1, 10):
        print(f"  {num_envs:>2} env{'s' if num_envs > 1 else ' '} in the vector: {evaluation_rate(num_envs):,.0f} env-steps/s")

"""Speed of opal_mt_transfer.py's two halves on this machine: the rollout and the PPO update.

Prints
  1. the time to make Meta-World's MT10 (and MT50 with --mt50) as a vector environment, sync and async;
  2. rollout: environment steps/s of `collect_rollout` (one episode of every task, the script's own function) with
     `--vector-strategy sync` against `async`, in both modes (with primitives the primitive policy's forward pass
     runs every step, the task policy's every c steps), with untrained networks;
  3. the PPO update (`ppo_update`, 10 epochs of 32 minibatches over one iteration's high-level steps) in both modes
     at the script's default width, in updates (minibatches) per second.

Run:  python benchmarks/bench_mt_transfer.py            # ~2 min; MT50 adds ~1 min
      python benchmarks/bench_mt_transfer.py --device cuda   # the PPO update on a GPU (rollouts stay on the CPU)
Timing only: nothing here is asserted, and the tests never time anything. Run it on an idle machine.
"""

import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gymnasium as gym
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_mt_transfer as mt  # noqa: E402


@dataclass
class Args:
    threads: int = 1
    """torch threads (1: as the grids run)"""
    episode_length: int = 100
    """steps per episode of the measured rollouts (Meta-World: 500; shorter keeps the benchmark short)"""
    mt50: bool = False
    """also time making MT50 (about 40 s or more)"""
    device: str = "cpu"
    """torch device of the PPO update: cpu, cuda, ... (the rollouts act on the CPU, as the script's do)"""


def main(args: Args):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch threads {args.threads}; rollouts of one {args.episode_length}-step episode of every task")
    for benchmark in ["MT10"] + (["MT50"] if args.mt50 else []):
        for strategy in ("sync", "async"):
            start = time.perf_counter()
            envs = mt.make_benchmark(benchmark, 0, args.episode_length, strategy, gym.vector.AutoresetMode.DISABLED)
            made = time.perf_counter() - start
            print(f"\n{benchmark} {strategy}: made in {made:.1f} s, {envs.num_envs} environments")
            if benchmark != "MT10":
                envs.close()
                continue
            obs_dim = envs.single_observation_space.shape[0]
            for mode, c, choice_dim in (("none", 1, mt.ACTION_DIM), ("opal", 5, 8)):
                agent = mt.ActorCritic(obs_dim, choice_dim, 256, torch.zeros(choice_dim))
                primitive_policy = mt.PrimitivePolicy(mt.STATE_DIM, mt.ACTION_DIM, 8) if c > 1 else None
                normalizer, scaler = mt.RunningNormalizer(obs_dim), mt.RewardScaler(envs.num_envs)
                low, high = -torch.ones(choice_dim), torch.ones(choice_dim)
                start = time.perf_counter()
                rollout, _, _ = mt.collect_rollout(envs, agent, normalizer, scaler, primitive_policy, c,
                                                   mt.ChoiceSpace(low, high), 0.99, torch.tensor(0.99), "cpu")
                seconds = time.perf_counter() - start
                print(f"  rollout ({mode}, c = {c}): {envs.num_envs * args.episode_length / seconds:,.0f} env steps/s")
                if strategy != "sync":
                    continue
                steps = len(rollout["states"]) * envs.num_envs * (mt.EPISODE_LENGTH // args.episode_length)
                batch = {name: torch.randn(steps, *value.shape[2:], device=args.device)
                         for name, value in rollout.items()}
                batch.update(advantages=torch.randn(steps, device=args.device),
                             returns=torch.randn(steps, device=args.device))
                learner = copy.deepcopy(agent).to(args.device)
                optimizer = torch.optim.Adam(learner.parameters(), lr=3e-4, eps=1e-5, fused=True)
                settings = mt.Args(primitives="none")
                start = time.perf_counter()
                mt.ppo_update(learner, optimizer, batch, settings)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize(args.device)
                seconds = time.perf_counter() - start
                updates = settings.update_epochs * -(-steps // max(2, steps // settings.num_minibatches))
                print(f"  PPO update ({mode}): one iteration's {steps} high-level steps of a 500-step episode, "
                      f"{updates} minibatches in {seconds:.2f} s = {updates / seconds:,.0f} updates/s")
            envs.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Speed of opal_online_sac.py's two halves on this machine: collecting experience and updating.

Prints
  1. collection: environment steps/s of the training environments (TrainingEnvs: step, reset of ended episodes,
     the semi-MDP bookkeeping) with one environment against a vector of them, in both modes (with primitives the
     primitive policy's forward pass runs every step, the task policy's every c steps);
  2. the SAC update in both modes (latent z of dim 8, raw actions) at our pointmaze size (2 x 128) and CleanRL's
     (2 x 256), in updates/s, with host syncs out of the update (the losses stay on the device); on CUDA eager and
     replayed as a CUDA graph (opal_online_sac.py --cudagraph, its default there).

Run:  python benchmarks/bench_online_sac.py            # ~1 min; needs opal/pointmaze-large-diverse-v0
      python benchmarks/bench_online_sac.py --device cuda --no-collection     # the update on a GPU
Timing only: nothing here is asserted, and the tests never time anything. Run it on an idle machine.
"""

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_online_sac as osac  # noqa: E402
from opal_utils import load_minari_dataset, observation_layout  # noqa: E402


@dataclass
class Args:
    seconds: float = 5.0
    """time budget of each measurement, after a warm-up"""
    threads: int = 1
    """torch threads (1: as the grids run)"""
    dataset_id: str = "opal/pointmaze-large-diverse-v0"
    """the dataset whose evaluation task the training environments copy"""
    device: str = "cpu"
    """torch device of the networks and the update: cpu, cuda, ..."""
    collection: bool = True
    """time the collection half (the environments step on the CPU whatever --device is)"""


def timed(step, seconds: float, device="cpu") -> float:
    """Calls of `step` per second over `seconds` (after three warm-up calls), to the end of the device's work."""
    finish = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(3):
        step()
    finish()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        calls += 1
    finish()
    return calls / (time.perf_counter() - start)


def collection_rate(dataset, layout, num_envs: int, latent_dim: int, c: int, seconds: float) -> float:
    """Environment steps/s of the collection half of the script's loop, acting with untrained networks."""
    envs = osac.TrainingEnvs(dataset, layout, num_envs, 0, "cpu")
    obs_dim, act_dim = envs.reset(np.ones(num_envs, dtype=bool)).shape[1], len(envs.act_low)
    choice_dim = latent_dim if c > 1 else act_dim
    task_policy = osac.TanhGaussianPolicy(obs_dim, choice_dim, -torch.ones(choice_dim), torch.ones(choice_dim), 128, 2)
    primitive_policy = osac.PrimitivePolicy(obs_dim, act_dim, latent_dim) if c > 1 else None
    state = {"states": envs.reset(np.ones(num_envs, dtype=bool)), "steps": torch.zeros(num_envs, dtype=torch.long),
             "returns": torch.zeros(num_envs), "choices": torch.zeros(num_envs, choice_dim),
             "needs_choice": torch.ones(num_envs, dtype=torch.bool)}

    @torch.no_grad()
    def step():
        if state["needs_choice"].any():
            fresh = task_policy(state["states"])[0]
            state["choices"] = torch.where(state["needs_choice"][:, None], fresh, state["choices"])
            state["steps"] = state["steps"].masked_fill(state["needs_choice"], 0)
        choices = state["choices"]
        actions = choices if primitive_policy is None else primitive_policy(state["states"], choices)[0]
        next_states, rewards, _, ended = envs.step(actions)
        state["returns"], state["steps"], closed = osac.smdp_step(state["returns"], state["steps"], rewards,
                                                                  torch.as_tensor(ended), 0.99, c)
        state["states"] = envs.reset(ended) if ended.any() else next_states
        state["needs_choice"] = closed

    rate = timed(step, seconds) * num_envs
    envs.close()
    return rate


def update_rate(mode: str, hidden_dim: int, seconds: float, device="cpu", graphed=False) -> float:
    obs_dim, choice_dim, batch = 4, (8 if mode == "opal" else 2), 256
    args = osac.Args(primitives="none", hidden_dim=hidden_dim, cudagraph=graphed)
    ones = torch.ones(choice_dim, device=device)
    agent = osac.SAC(obs_dim, -ones, ones, args, torch.randn(1000, obs_dim, device=device))
    sample = tuple(x.to(device) for x in (
        torch.randn(batch, obs_dim), torch.rand(batch, choice_dim) * 2 - 1, torch.zeros(batch),
        torch.randn(batch, obs_dim), torch.zeros(batch), torch.full((batch,), 0.99)))
    return timed(lambda: agent.update(*sample), seconds, device)


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_num_threads(args.threads)
    with open("/proc/cpuinfo") as cpuinfo:
        flags = set(next((line for line in cpuinfo if line.startswith("flags")), "").split())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); CPU flags: "
          f"{' '.join(sorted(flags & {'avx512f', 'avx512_bf16', 'amx_bf16', 'amx_tile'})) or 'none of avx512/amx'}")
    if args.device.startswith("cuda"):
        print(torch.cuda.get_device_name(args.device))
    if args.collection:
        dataset = load_minari_dataset(args.dataset_id)
        layout = observation_layout(dataset)
        print("\ncollection, environment steps/s (untrained networks acting; no updates)")
        print("| mode | 1 env | 4 envs | 10 envs |\n|---|---|---|---|")
        for mode, c in (("SAC+OPAL (c = 10, z of dim 8)", 10), ("SAC (raw actions)", 1)):
            rates = [collection_rate(dataset, layout, n, 8, c, args.seconds) for n in (1, 4, 10)]
            print(f"| {mode} | " + " | ".join(f"{rate:.0f}" for rate in rates) + " |")
    print(f"\nSAC update, batch 256, updates/s on {args.device}")
    print("| choice | 2 x 128 (pointmaze default) | 2 x 256 (CleanRL, D4RL default) |\n|---|---|---|")
    for graphed in (False, True) if args.device.startswith("cuda") else (False,):
        for mode, name in (("opal", "latent z, dim 8"), ("none", "raw action, dim 2")):
            rates = [update_rate(mode, width, args.seconds, args.device, graphed) for width in (128, 256)]
            print(f"| {name}{', CUDA graph' if graphed else ''} | {rates[0]:.0f} | {rates[1]:.0f} |")

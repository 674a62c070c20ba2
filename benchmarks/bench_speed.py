"""Speed of OPAL's two hot loops on this machine, in one run, against the plain fp32 eager form of each update.

Prints, for
  1. this CPU's matmul peak (fp32 and bf16), the yardstick of the other rows;
  2. the β-VAE update of opal_vae.py (the paper's model: 4-layer bidirectional GRU, hidden 200, c = 10, z 8)
     at batch 50 / 256 / 1024;
  3. the CQL update of opal_cql.py in both modes (latent z of dim 8, raw actions) at CORL's antmaze size and
     at our pointmaze default size;
  4. evaluation env-steps/s with one environment versus a vector of them,
steps/s, windows (or transitions)/s, FLOP per step (counted by torch.utils.flop_counter on one update,
forward and backward), the FLOP rate reached as a share of the measured peak of its precision, and the
ratio to the fp32 eager row of the same update.

Run:  python benchmarks/bench_speed.py                          # ~4 min; needs opal/pointmaze-large-diverse-v0
      python benchmarks/bench_speed.py --compile               # adds compiled rows (30-60 s of compiling each)
      python benchmarks/bench_speed.py --device cuda --vae-grus written-out cudnn --vae-batch-sizes 256
                                                               # a GPU: adds the rows replayed as CUDA graphs
Timing only: nothing here is asserted, and the tests never time anything. Run it on an idle machine.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_cql as oc  # noqa: E402
import opal_vae as ov  # noqa: E402
from opal_utils import (  # noqa: E402
    GraphedUpdate, evaluate, load_flat_dataset, load_minari_dataset, observation_layout, resolve_dataset_id
)


@dataclass
class Args:
    seconds: float = 8.0
    """time budget of each measurement, after three warm-up steps"""
    threads: int = 0
    """torch threads (0: torch's default, here one per core)"""
    vae_batch_sizes: list = field(default_factory=lambda: [50, 256, 1024])
    """batch sizes of the β-VAE rows"""
    compile: bool = False
    """also time torch.compile of each update (slow to compile; off by default)"""
    env: str = "pointmaze-large"
    """dataset the β-VAE batches are gathered from (made by collect_data.py if missing)"""
    device: str = "cpu"
    """torch device of the updates: cpu, cuda, cuda:1, ...; on CUDA each update is also timed as a CUDA graph"""
    vae_grus: list = field(default_factory=lambda: ["written-out"])
    """the encoder's GRUs to time: written-out (opal_vae.py's default on a CPU), cudnn (nn.GRU, its default on CUDA)"""
    evaluation: bool = True
    """time evaluation episodes (CPU work whatever --device is)"""


def finish(device):
    """Wait for the device: a GPU runs what it is given asynchronously."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def rate(function, seconds, warmup=3, device="cpu"):
    for _ in range(warmup):
        function()
    finish(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        function()
        count += 1
    finish(device)
    return count / (time.perf_counter() - start)


def matmul_peak(dtype, size=2048, seconds=3.0, device="cpu"):
    a, b = torch.randn(size, size, dtype=dtype, device=device), torch.randn(size, size, dtype=dtype, device=device)
    return 2 * size ** 3 * rate(lambda: torch.mm(a, b), seconds, device=device)


def flops_of(function):
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def vae_update(data, starts, obs_dim, act_dim, batch_size, fused, bf16, compiled=False, gru="written-out",
               graphed=False):
    """One β-VAE step as opal_vae.py's loop does it (gather, loss, backward, Adam), on the data's device;
    `compiled` compiles the loss as opal_vae.py --compile does, `graphed` replays the step as a CUDA graph as
    opal_vae.py does on CUDA, `gru` picks the encoder's GRU as its --gru does."""
    torch.manual_seed(0)
    device = data["observations"].device
    encoder = ov.Encoder(obs_dim, act_dim, 8, gru=nn.GRU if gru == "cudnn" else ov.BidirectionalGRU)
    prior, policy = ov.Prior(obs_dim, 8), ov.PrimitivePolicy(obs_dim, act_dim, 8)
    for module in (encoder, prior, policy):
        module.to(device).normalize.fit(data["observations"])
    parameters = [*encoder.parameters(), *prior.parameters(), *policy.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=fused)
    offsets, generator = torch.arange(10, device=device), torch.Generator(device).manual_seed(0)
    vae_loss = torch.compile(ov.beta_vae_loss) if compiled else ov.beta_vae_loss

    def gradient_step(states, actions):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = vae_loss(encoder, prior, policy, states, actions, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    gradient_step = GraphedUpdate(gradient_step, [encoder, prior, policy], [], [optimizer], graphed)

    def step():
        rows = starts[torch.randint(len(starts), (batch_size,), generator=generator, device=device)][:, None] + offsets
        gradient_step(data["observations"][rows], data["actions"][rows])

    return step


def cql_update(obs_dim, choice_dim, hidden, critic_layers, policy_layers, bf16, compiled=False, n=10, batch_size=256,
               graphed=False, device="cpu"):
    """One step of opal_cql.py's own update (`opal_cql.CQL.update`, the object the script trains with) on random
    data of the given shapes; `compiled` compiles the policy and the critics in place as opal_cql.py --compile does,
    `graphed` replays the update as a CUDA graph as opal_cql.py does on CUDA (--cudagraph)."""
    torch.manual_seed(0)
    args = oc.Args(primitives="none", hidden_dim=hidden, critic_layers=critic_layers, policy_layers=policy_layers,
                   bf16=bf16, compile=compiled, cql_n_actions=n, batch_size=batch_size, cudagraph=graphed)
    states = torch.randn(100_000, obs_dim, device=device)
    choices = torch.rand(100_000, choice_dim, device=device) * 2 - 1
    rewards, generator = torch.randn(100_000, device=device), torch.Generator(device).manual_seed(0)
    ones = torch.ones(choice_dim, device=device)
    agent = oc.CQL(obs_dim, -ones, ones, args, states)
    done, discount = torch.zeros(batch_size, device=device), torch.full((batch_size,), 0.99, device=device)

    def step():
        batch = torch.randint(len(states) - 1, (batch_size,), generator=generator, device=device)
        agent.update(states[batch], choices[batch], rewards[batch], states[batch + 1], done, discount, step=1)

    return step


def evaluation_rate(num_envs, episodes=10, env_id="PointMaze_Large-v3"):
    """env-steps/s of opal_utils.evaluate (policy included) over `episodes` episodes of 800 steps, raw actions."""
    make = lambda: gym.make(env_id, continuing_task=True, reset_target=False)
    envs = gym.vector.SyncVectorEnv([make for _ in range(num_envs)])
    policy = oc.TanhGaussianPolicy(4, 2, -torch.ones(2), torch.ones(2), 128, 3)
    start = time.perf_counter()
    evaluate(envs, ["observation"], oc.HierarchicalPolicy(policy, None, 1), episodes, 0, -np.ones(2), np.ones(2))
    seconds = time.perf_counter() - start
    envs.close()
    return episodes * 800 / seconds


def report(label, variants, items_per_step, peaks, seconds, device="cpu"):
    """Time each (name, make_step, bf16, compiled, graphed) variant; the first one is the fp32 eager baseline of the
    ratios. `make_step(compiled, graphed)` builds the update."""
    baseline = None
    for name, make_step, bf16, compiled, graphed in variants:
        try:
            step = make_step(compiled, graphed)
            if compiled or graphed:
                start = time.perf_counter()
                step()
                finish(device)
                print(f"    ({'compiling' if compiled else 'recording the CUDA graph'} took "
                      f"{time.perf_counter() - start:.1f} s)")
            flops = flops_of(make_step(False, False))  # counted on an eager copy: the same math
            steps_per_second = rate(step, seconds, device=device)
        except Exception as error:  # one variant that cannot run does not hide the others
            print(f"{label:<40} {name:<26} failed: {type(error).__name__}: {str(error)[:200]}")
            continue
        baseline = baseline or steps_per_second
        peak = peaks["bf16" if bf16 else "fp32"]
        print(f"{label:<40} {name:<26} {steps_per_second:>8.1f} {steps_per_second * items_per_step:>10,.0f} "
              f"{flops / 1e9:>8.2f} {steps_per_second * flops / peak:>10.1%} {steps_per_second / baseline:>7.2f}x")


if __name__ == "__main__":
    args = tyro.cli(Args)
    # every row builds new modules from the same classes; past dynamo's default of 8 recompilations per function
    # it silently falls back to eager, and the later compiled rows would time eager code
    torch._dynamo.config.recompile_limit = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as the scripts do
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    peaks = {"fp32": matmul_peak(torch.float32, device=device), "bf16": matmul_peak(torch.bfloat16, device=device)}
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {where}; matmul peak (2048x2048): "
          f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    header = (f"{'update':<40} {'variant':<26} {'steps/s':>8} {'samples/s':>10} {'GFLOP':>8} {'of peak':>10} "
              f"{'vs fp32':>8}")

    dataset = load_minari_dataset(resolve_dataset_id(args.env, None))
    data = load_flat_dataset(dataset, observation_layout(dataset), device)
    starts = ov.window_starts(data["episode_lengths"], 10).to(device)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    print("\nβ-VAE update (paper model), samples = windows of c = 10 steps; GFLOP per step, forward + backward")
    print(header)
    for gru in args.vae_grus:
        for batch_size in args.vae_batch_sizes:
            kinds = [("fp32 eager, Adam", False, False, False, False),
                     ("fp32 eager, fused Adam", True, False, False, False),
                     ("bf16 autocast, fused Adam", True, True, False, False)]
            if args.compile:
                kinds += [("fp32 compiled, fused Adam", True, False, True, False),
                          ("bf16 compiled, fused Adam", True, True, True, False)]
            if cuda:
                kinds += [("fp32 CUDA graph, fused Adam", True, False, False, True),
                          ("bf16 CUDA graph, fused Adam", True, True, False, True)]
            variants = [(name, lambda compiled, graphed, fused=fused, bf16=bf16: vae_update(
                data, starts, obs_dim, act_dim, batch_size, fused, bf16, compiled, gru, graphed), bf16, compiled,
                graphed) for name, fused, bf16, compiled, graphed in kinds]
            report(f"{gru} GRU, batch {batch_size}", variants, batch_size, peaks, args.seconds, device)

    print("\nCQL update, batch 256, 10 sampled choices; samples = transitions")
    print(header)
    for size, hidden, critic_layers, obs, act in [("CORL antmaze (critics 5x256)", 256, 5, 29, 8),
                                                  ("our default (critics 3x128)", 128, 3, 4, 2)]:
        for mode, choice_dim in (("OPAL z 8", 8), (f"raw a {act}", act)):
            kinds = [("fp32 eager", False, False, False), ("bf16 autocast", True, False, False)]
            if args.compile:
                kinds += [("fp32 compiled", False, True, False), ("bf16 compiled", True, True, False)]
            if cuda:
                kinds += [("fp32 CUDA graph", False, False, True), ("bf16 CUDA graph", True, False, True)]
            variants = [(name, lambda compiled, graphed, bf16=bf16: cql_update(
                obs, choice_dim, hidden, critic_layers, 3, bf16, compiled, graphed=graphed, device=device), bf16,
                compiled, graphed) for name, bf16, compiled, graphed in kinds]
            report(f"{size}, {mode}", variants, 256, peaks, args.seconds, device)

    if not args.evaluation:
        sys.exit(0)
    print("\nevaluation (opal_utils.evaluate, policy 3x128), PointMaze_Large-v3, 10 episodes of 800 steps:")
    single = evaluation_rate(1)
    vectorised = evaluation_rate(10)
    print(f"   1 env:               {single:>8,.0f} env-steps/s")
    print(f"  10 envs in a vector:  {vectorised:>8,.0f} env-steps/s ({vectorised / single:.1f}x)")

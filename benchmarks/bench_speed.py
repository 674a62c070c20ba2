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
Timing only: nothing here is asserted, and the tests never time anything. Run it on an idle machine.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_cql as oc  # noqa: E402
import opal_vae as ov  # noqa: E402


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


def rate(function, seconds, warmup=3):
    for _ in range(warmup):
        function()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        function()
        count += 1
    return count / (time.perf_counter() - start)


def matmul_peak(dtype, size=2048, seconds=3.0):
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    return 2 * size ** 3 * rate(lambda: torch.mm(a, b), seconds)


def flops_of(function):
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def vae_update(data, starts, obs_dim, act_dim, batch_size, fused, bf16, compiled=False):
    """One β-VAE step exactly as opal_vae.py's loop does it (gather, loss, backward, Adam); `compiled` compiles the
    loss as opal_vae.py --compile does."""
    torch.manual_seed(0)
    encoder = ov.Encoder(obs_dim, act_dim, 8, gru=ov.BidirectionalGRU)  # as opal_vae.py trains it
    prior, policy = ov.Prior(obs_dim, 8), ov.PrimitivePolicy(obs_dim, act_dim, 8)
    for module in (encoder, prior, policy):
        module.normalize.fit(data["observations"])
    parameters = [*encoder.parameters(), *prior.parameters(), *policy.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=1e-3, fused=fused)
    offsets, generator = torch.arange(10), torch.Generator().manual_seed(0)
    vae_loss = torch.compile(ov.beta_vae_loss) if compiled else ov.beta_vae_loss

    def step():
        rows = starts[torch.randint(len(starts), (batch_size,), generator=generator)][:, None] + offsets
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, _, _ = vae_loss(encoder, prior, policy, data["observations"][rows], data["actions"][rows], 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def cql_update(obs_dim, choice_dim, hidden, critic_layers, policy_layers, bf16, compiled=False, n=10, batch_size=256):
    """One step of opal_cql.py's own update (`opal_cql.CQL.update`, the object the script trains with) on random
    data of the given shapes; `compiled` compiles the policy and the critics in place as opal_cql.py --compile does."""
    torch.manual_seed(0)
    args = oc.Args(primitives="none", hidden_dim=hidden, critic_layers=critic_layers, policy_layers=policy_layers,
                   bf16=bf16, compile=compiled, cql_n_actions=n, batch_size=batch_size)
    states, choices = torch.randn(100_000, obs_dim), torch.rand(100_000, choice_dim) * 2 - 1
    rewards, generator = torch.randn(100_000), torch.Generator().manual_seed(0)
    agent = oc.CQL(obs_dim, -torch.ones(choice_dim), torch.ones(choice_dim), args, states)
    done, discount = torch.zeros(batch_size), torch.full((batch_size,), 0.99)

    def step():
        batch = torch.randint(len(states) - 1, (batch_size,), generator=generator)
        agent.update(states[batch], choices[batch], rewards[batch], states[batch + 1], done, discount, step=1)

    return step


def evaluation_rate(num_envs, episodes=10, env_id="PointMaze_Large-v3"):
    """env-steps/s of opal_cql.evaluate (policy included) over `episodes` episodes of 800 steps, raw actions."""
    make = lambda: gym.make(env_id, continuing_task=True, reset_target=False)
    envs = gym.vector.SyncVectorEnv([make for _ in range(num_envs)])
    policy = oc.TanhGaussianPolicy(4, 2, -torch.ones(2), torch.ones(2), 128, 3)
    start = time.perf_counter()
    oc.evaluate(envs, ["observation"], policy, None, 1, episodes, 0, -np.ones(2), np.ones(2))
    seconds = time.perf_counter() - start
    envs.close()
    return episodes * 800 / seconds


def report(label, variants, items_per_step, peaks, seconds):
    """Time each (name, make_step, bf16, compiled) variant; the first one is the fp32 eager baseline of the ratios."""
    baseline = None
    for name, make_step, bf16, compiled in variants:
        step = make_step(compiled)
        if compiled:
            start = time.perf_counter()
            step()
            print(f"    (compiling took {time.perf_counter() - start:.0f} s)")
        flops = flops_of(make_step(False))  # counted on an eager copy: the same math
        steps_per_second = rate(step, seconds)
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
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak (2048x2048): "
          f"fp32 {peaks['fp32'] / 1e9:,.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:,.0f} GFLOP/s")
    header = (f"{'update':<40} {'variant':<26} {'steps/s':>8} {'samples/s':>10} {'GFLOP':>8} {'of peak':>10} "
              f"{'vs fp32':>8}")

    dataset = ov.load_minari_dataset(ov.resolve_dataset_id(args.env, None))
    data = ov.load_flat_dataset(dataset, ov.observation_layout(dataset), torch.device("cpu"))
    starts = ov.window_starts(data["episode_lengths"], 10)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    print("\nβ-VAE update (paper model), samples = windows of c = 10 steps; GFLOP per step, forward + backward")
    print(header)
    for batch_size in args.vae_batch_sizes:
        kinds = [("fp32 eager, Adam", False, False, False), ("fp32 eager, fused Adam", True, False, False),
                 ("bf16 autocast, fused Adam", True, True, False)]
        if args.compile:
            kinds += [("fp32 compiled, fused Adam", True, False, True), ("bf16 compiled, fused Adam", True, True, True)]
        variants = [(name, lambda compiled, fused=fused, bf16=bf16: vae_update(data, starts, obs_dim, act_dim,
                                                                              batch_size, fused, bf16, compiled),
                     bf16, compiled) for name, fused, bf16, compiled in kinds]
        report(f"batch {batch_size}", variants, batch_size, peaks, args.seconds)

    print("\nCQL update, batch 256, 10 sampled choices; samples = transitions")
    print(header)
    for size, hidden, critic_layers, obs, act in [("CORL antmaze (critics 5x256)", 256, 5, 29, 8),
                                                  ("our default (critics 3x128)", 128, 3, 4, 2)]:
        for mode, choice_dim in (("OPAL z 8", 8), (f"raw a {act}", act)):
            kinds = [("fp32 eager", False, False), ("bf16 autocast", True, False)]
            if args.compile:
                kinds += [("fp32 compiled", False, True), ("bf16 compiled", True, True)]
            variants = [(name, lambda compiled, bf16=bf16: cql_update(obs, choice_dim, hidden, critic_layers, 3, bf16,
                                                                       compiled), bf16, compiled)
                        for name, bf16, compiled in kinds]
            report(f"{size}, {mode}", variants, 256, peaks, args.seconds)

    print("\nevaluation (opal_cql.evaluate, policy 3x128), PointMaze_Large-v3, 10 episodes of 800 steps:")
    single = evaluation_rate(1)
    vectorised = evaluation_rate(10)
    print(f"   1 env:               {single:>8,.0f} env-steps/s")
    print(f"  10 envs in a vector:  {vectorised:>8,.0f} env-steps/s ({vectorised / single:.1f}x)")

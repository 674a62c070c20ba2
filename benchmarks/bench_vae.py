"""Speed of opal_vae.py's β-VAE update on this machine: gradient steps/s, windows/s and the share of a step
spent gathering the batch, for plain Adam versus fused Adam, fp32 versus bf16 autocast, eager versus
torch.compile. The model is the paper's (4-layer bidirectional GRU, hidden 200, c = 10, latent 8).

Run:  python benchmarks/bench_vae.py                       # needs opal/pointmaze-large-diverse-v0 (made if missing)
      python benchmarks/bench_vae.py --batch-sizes 50 256 --seconds 20 --compile
Timing only: nothing here is asserted, and the tests never time anything.
"""

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_vae as ov  # noqa: E402


@dataclass
class Args:
    env: str = "pointmaze-large"
    """dataset alias to load (its load time is reported too)"""
    batch_sizes: list = field(default_factory=lambda: [50, 256, 1024])
    """batch sizes to time"""
    seconds: float = 15.0
    """time budget of each measurement (after warm-up)"""
    compile: bool = False
    """also time torch.compile of the whole update (about 30 s of compilation per batch size)"""
    bf16: bool = True
    """also time the update under torch.autocast(bfloat16)"""


def build(obs_dim, act_dim, data, fused):
    torch.manual_seed(0)
    encoder, prior, policy = ov.Encoder(obs_dim, act_dim, 8), ov.Prior(obs_dim, 8), ov.PrimitivePolicy(obs_dim, act_dim, 8)
    for module in (encoder, prior, policy):
        module.normalize.fit(data["observations"])
    parameters = [*encoder.parameters(), *prior.parameters(), *policy.parameters()]
    return encoder, prior, policy, torch.optim.Adam(parameters, lr=1e-3, fused=fused)


def measure(step, seconds, warmup=3):
    for _ in range(warmup):
        step()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


if __name__ == "__main__":
    args = tyro.cli(Args)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    start = time.perf_counter()
    dataset = ov.load_minari_dataset(ov.resolve_dataset_id(args.env, None))
    layout = ov.observation_layout(dataset)
    data = ov.load_flat_dataset(dataset, layout, torch.device("cpu"))
    starts = ov.window_starts(data["episode_lengths"], 10)
    print(f"loading {dataset.total_steps:,} steps into flat tensors: {time.perf_counter() - start:.1f} s")
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    offsets = torch.arange(10)
    generator = torch.Generator().manual_seed(0)

    def sample(batch_size):
        rows = starts[torch.randint(len(starts), (batch_size,), generator=generator)][:, None] + offsets
        return data["observations"][rows], data["actions"][rows]

    print(f"{'variant':<28} {'batch':>5} {'steps/s':>8} {'windows/s':>10} {'gather share':>12}")
    for batch_size in args.batch_sizes:
        gather_rate = measure(lambda: sample(batch_size), 2.0)
        variants = [("fp32 eager, Adam", False, False, False), ("fp32 eager, fused Adam", True, False, False)]
        if args.bf16:
            variants.append(("bf16 autocast, fused Adam", True, True, False))
        if args.compile:
            variants.append(("fp32 compiled, fused Adam", True, False, True))
        baseline = None
        for name, fused, bf16, compiled in variants:
            encoder, prior, policy, optimizer = build(obs_dim, act_dim, data, fused)

            def update(states, actions):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    loss, _, _ = ov.beta_vae_loss(encoder, prior, policy, states, actions, 0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            run = torch.compile(update) if compiled else update
            if compiled:
                compile_start = time.perf_counter()
                run(*sample(batch_size))
                print(f"  (compilation took {time.perf_counter() - compile_start:.0f} s)")
            rate = measure(lambda: run(*sample(batch_size)), args.seconds)
            baseline = baseline or rate
            share = rate / gather_rate
            print(f"{name:<28} {batch_size:>5} {rate:>8.1f} {rate * batch_size:>10.0f} {share:>11.1%}"
                  f"   ({rate / baseline:.2f}x)")

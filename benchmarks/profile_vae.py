"""Where the time of one β-VAE update goes: torch.profiler over the bf16 compiled update of bench_speed.py (the
paper's model), split into matmuls, the compiled graphs' own code (the fused gate arithmetic) and the rest.

Run:  python benchmarks/profile_vae.py --batch-size 1024      # on an idle machine; needs opal/pointmaze-large-diverse-v0
"""

import collections
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench_speed  # noqa: E402
import opal_vae as ov  # noqa: E402
from opal_utils import load_flat_dataset, load_minari_dataset, observation_layout, resolve_dataset_id  # noqa: E402

MATMULS = ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm")


@dataclass
class Args:
    batch_size: int = 1024
    """windows per update"""
    steps: int = 3
    """profiled updates"""
    seconds: float = 3.0
    """time budget of the unprofiled measurement before the profile (after three warm-up updates)"""
    bf16: bool = True
    """autocast to bf16"""
    compile: bool = True
    """compile the loss as opal_vae.py --compile does"""


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.set_flush_denormal(True)
    dataset = load_minari_dataset(resolve_dataset_id("pointmaze-large", None))
    data = load_flat_dataset(dataset, observation_layout(dataset), torch.device("cpu"))
    starts = ov.window_starts(data["episode_lengths"], 10)
    step = bench_speed.vae_update(data, starts, data["observations"].shape[1], data["actions"].shape[1],
                                  args.batch_size, True, args.bf16, args.compile)
    print(f"unprofiled: {bench_speed.rate(step, args.seconds) * args.batch_size:,.0f} windows/s")  # warms up too
    with profile() as profiler:
        for _ in range(args.steps):
            step()
    groups = collections.Counter()
    for event in profiler.key_averages():
        if event.key in MATMULS:
            groups["matmuls"] += event.self_cpu_time_total
        elif event.key.startswith("## Call CompiledFxGraph"):
            groups["compiled graphs' own code (fused elementwise)"] += event.self_cpu_time_total
        elif event.key == "aten::copy_":
            groups["copies"] += event.self_cpu_time_total
        else:
            groups["everything else"] += event.self_cpu_time_total
    total = sum(groups.values())
    for name, microseconds in groups.most_common():
        print(f"{name:<48} {microseconds / args.steps / 1000:8.1f} ms a step {microseconds / total:7.1%}")

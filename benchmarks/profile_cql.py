"""Where the time of one CQL update goes on a GPU: torch.profiler over opal_cql.py's update (`CQL.update`, built as
bench_speed.py builds it), eager or replayed as a CUDA graph, with the GPU's kernel time summed by kind.

Prints the wall time per update, the GPU's busy time per update (the kernels' durations summed) and the kernels
that take it, so that one can tell whether the update waits on the host (launches) or on the GPU (arithmetic).

Run:  python benchmarks/profile_cql.py --device cuda                   # CORL's antmaze size, CUDA graph, fp32
      python benchmarks/profile_cql.py --device cuda --no-graphed      # the eager update
"""

import collections
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import tyro
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_speed  # noqa: E402


@dataclass
class Args:
    device: str = "cuda"
    """torch device (a CUDA GPU: the kernels' times come from CUPTI)"""
    graphed: bool = True
    """replay the update as a CUDA graph (opal_cql.py's default on CUDA)"""
    bf16: bool = False
    """bf16 autocast"""
    hidden: int = 256
    """critics' and policy's width (CORL antmaze: 256)"""
    critic_layers: int = 5
    """critics' hidden layers (CORL antmaze: 5)"""
    steps: int = 50
    """profiled updates, after a warm-up"""
    top: int = 15
    """kernels listed"""


def kind(name: str) -> str:
    """A kernel's kind from its name: matrix products, Adam, reductions, or elementwise and the rest."""
    lowered = name.lower()
    if any(word in lowered for word in ("gemm", "matmul", "cutlass", "sm90_", "sm80_", "ampere", "cublas")):
        return "matrix products"
    if "adam" in lowered:
        return "Adam"
    if "reduce" in lowered or "logsumexp" in lowered:
        return "reductions"
    return "elementwise and other"


if __name__ == "__main__":
    args = tyro.cli(Args)
    device = torch.device(args.device)
    step = bench_speed.cql_update(29, 8, args.hidden, args.critic_layers, 3, args.bf16, graphed=args.graphed,
                                  device=device)
    for _ in range(5):
        step()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize(device)
    wall = (time.perf_counter() - start) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize(device)
    kernels = [event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CUDA
               and not event.name.startswith("Optimizer.")]  # the profiler's own ranges around Adam's steps
    busy = sum(event.time_range.elapsed_us() for event in kernels) / args.steps  # µs per update
    by_kind, by_name = collections.Counter(), collections.Counter()
    for event in kernels:
        by_kind[kind(event.name)] += event.time_range.elapsed_us() / args.steps
        by_name[event.name[:90]] += event.time_range.elapsed_us() / args.steps
    print(f"CQL update (critics {args.critic_layers} x {args.hidden}, batch 256, 10 sampled choices), "
          f"{'CUDA graph' if args.graphed else 'eager'}, {'bf16' if args.bf16 else 'fp32'}, "
          f"{torch.cuda.get_device_name(device)}")
    print(f"wall {wall * 1e3:.3f} ms per update ({1 / wall:,.0f} updates/s); GPU busy {busy / 1e3:.3f} ms per update "
          f"({busy / 1e3 / (wall * 1e3):.0%} of the wall time); {len(kernels) / args.steps:.0f} kernels per update")
    for name, microseconds in by_kind.most_common():
        print(f"  {name:<24} {microseconds:>9.1f} µs per update")
    print("top kernels, µs per update:")
    for name, microseconds in by_name.most_common(args.top):
        print(f"  {microseconds:>8.1f}  {name}")

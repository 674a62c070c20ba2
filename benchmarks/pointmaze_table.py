"""The README's pointmaze-large table: CQL+OPAL versus plain CQL over several seeds, at a CPU-sized budget.

Runs `opal_cql.py` once per (mode, seed), `--parallel` at a time with one torch thread each, then reads the
final evaluation of every run from its opal_cql.pt and prints a markdown table (mean ± std over seeds).

Run:  python benchmarks/pointmaze_table.py --vae-ckpt runs/<opal_vae run>/opal_vae.pt
      python benchmarks/pointmaze_table.py --summarize-only --runs-dir runs/table   # table of finished runs
      python benchmarks/pointmaze_table.py --vae-ckpt … --modes opal --seeds 1 --runs-dir runs/ablations
          "--cql-args=--env pointmaze-large --total-steps 15000 --exp-name stride1 --relabel-stride 1"   # one variant
(the `=` form is needed because the value itself starts with `--`)
"""

import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    vae_ckpt: Optional[str] = None
    """opal_vae.pt for the OPAL rows (required unless --summarize-only)"""
    seeds: list = field(default_factory=lambda: [1, 2, 3])
    """CQL seeds per mode"""
    modes: list = field(default_factory=lambda: ["opal", "none"])
    """--primitives values to run"""
    runs_dir: str = "runs/table"
    """where the runs go"""
    parallel: int = 2
    """runs at a time (each with one torch thread)"""
    summarize_only: bool = False
    """only print the table of the runs already in --runs-dir"""
    cql_args: str = ("--env pointmaze-large --total-steps 15000 --hidden-dim 128 --critic-layers 3 --policy-layers 3 "
                     "--eval-every 2500 --eval-episodes 100 --eval-episodes-during 20 --no-bf16")
    """flags passed to every opal_cql.py run (one quoted string)"""


def closest_goal_distance(path: Path, episodes: int = 100) -> float:
    """Re-run the final evaluation of a finished run from its checkpoint alone (same seeds as the run's own final
    evaluation) and return the mean over episodes of the closest xy distance to the goal."""
    sys.path.insert(0, str(ROOT))
    import minari
    import numpy as np
    import opal_cql as oc

    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved = payload["args"]
    policy, primitive_policy = oc.policies_from_checkpoint(payload)
    envs = oc.make_eval_envs(minari.load_dataset(payload["dataset_id"]), 10)
    success, _, distance = oc.evaluate(envs, payload["obs_layout"], policy, primitive_policy, payload["c"], episodes,
                                       saved["seed"] + 10_000, np.array(payload["act_low"]), np.array(payload["act_high"]))
    assert abs(100 * success - payload["summary"]["last_normalized_score"]) < 1e-6, "re-evaluation differs from the run"
    return distance


def summarize(runs_dir: Path):
    """One row per (--exp-name, mode) among the finished runs in runs_dir: the table's two rows use the default
    exp name; runs given another --exp-name (the ablations) get a row of their own, labelled by it."""
    rows = {}
    for path in sorted(runs_dir.glob("*/opal_cql.pt")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not payload.get("finished"):
            continue
        key = (payload["args"]["exp_name"], payload["primitives"])
        rows.setdefault(key, []).append({**payload["summary"], "distance": closest_goal_distance(path)})
    spread = lambda values, digits=1: (f"{statistics.mean(values):.{digits}f} ± "
                                       f"{statistics.stdev(values) if len(values) > 1 else 0:.{digits}f}")
    print("| method | seeds | normalized score, last (100 episodes) | best of all evaluations "
          "| closest distance to goal, last | steps/s (1 thread) |")
    print("|---|---|---|---|---|---|")
    ordered = sorted(rows, key=lambda key: (key[0] != "opal_cql", key[0], key[1] == "opal"))
    for exp_name, mode in ordered:
        summaries = rows[(exp_name, mode)]
        label = "CQL" if mode == "none" else "CQL+OPAL"
        label += "" if exp_name == "opal_cql" else f", {exp_name}"
        column = lambda key: [summary[key] for summary in summaries]
        print(f"| {label} | {len(summaries)} | {spread(column('last_normalized_score'))} | "
              f"{spread(column('best_normalized_score'))} | {spread(column('distance'), 2)} | "
              f"{statistics.mean(column('sps')):.0f} |")


if __name__ == "__main__":
    args = tyro.cli(Args)
    runs_dir = Path(args.runs_dir)
    if not args.summarize_only:
        if "opal" in args.modes and not args.vae_ckpt:
            raise SystemExit("error: --vae-ckpt is needed for the opal rows")
        commands = []
        for seed in args.seeds:
            for mode in args.modes:
                extra = ["--vae-ckpt", args.vae_ckpt] if mode == "opal" else []
                commands.append([sys.executable, str(ROOT / "opal_cql.py"), *shlex.split(args.cql_args), "--primitives", mode,
                                 "--seed", str(seed), "--runs-dir", str(runs_dir), *extra])
        runs_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        running, start = [], time.time()
        while commands or running:
            while commands and len(running) < args.parallel:
                command = commands.pop(0)
                flag = lambda name, default=None: command[command.index(name) + 1] if name in command else default
                log = open(runs_dir / f"{flag('--exp-name', 'opal_cql')}-{flag('--primitives')}-seed{flag('--seed')}.log", "w")
                print("running:", " ".join(command[1:]), flush=True)
                running.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
            time.sleep(5)
            for process in [p for p in running if p.poll() is not None]:
                running.remove(process)
                if process.returncode != 0:
                    print(f"a run failed (exit {process.returncode}): {' '.join(process.args[1:])}", flush=True)
        print(f"all runs done in {(time.time() - start) / 60:.0f} min")
    summarize(runs_dir)

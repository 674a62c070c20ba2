"""The README's pointmaze-large table: CQL+OPAL versus plain CQL over several seeds, at a CPU-sized budget.

Runs `opal_cql.py` once per (mode, seed), `--parallel` at a time with one torch thread each, then reads the
final and best evaluations of every run from its opal_cql.pt and prints a markdown table: IQM and mean with 95%
stratified-bootstrap confidence intervals over runs (rliable).

Run:  python analysis/pointmaze_table.py --vae-ckpt runs/<opal_vae run>/opal_vae.pt
      python analysis/pointmaze_table.py --summarize-only --runs-dir runs/table   # table of finished runs
      python analysis/pointmaze_table.py --vae-ckpt … --modes opal --seeds 1 --runs-dir runs/ablations
          "--cql-args=--env pointmaze-large --total-steps 15000 --exp-name stride1 --relabel-stride 1"   # one variant
(the `=` form is needed because the value itself starts with `--`)
"""

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
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
    """only print the table of the runs already in --runs-dir (and --records)"""
    records: Optional[str] = None
    """a JSON-lines file of finished runs to include in the table (results/*.jsonl)"""
    save_records: bool = False
    """write every finished run in the table to --records (one JSON line per run), so the table survives the runs"""
    cql_args: str = ("--env pointmaze-large --total-steps 15000 --hidden-dim 128 --critic-layers 3 --policy-layers 3 "
                     "--eval-every 2500 --eval-episodes 100 --eval-episodes-during 20")
    """flags passed to every opal_cql.py run (one quoted string)"""


def interval_estimates(runs: list) -> dict:
    """IQM and mean with 95% stratified-bootstrap confidence intervals over runs (Agarwal et al., NeurIPS 2021; the
    rliable package), for a list of per-run scores; {name: (point, low, high)}."""
    from rliable import library as rly, metrics

    scores = {"runs": np.asarray(runs, dtype=float)[:, None]}  # (runs, 1 task)
    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])
    points, intervals = rly.get_interval_estimates(scores, aggregate, reps=2000, confidence_interval_size=0.95)
    return {name: (points["runs"][i], intervals["runs"][0, i], intervals["runs"][1, i])
            for i, name in enumerate(("iqm", "mean"))}


def finished_runs(runs_dir: Path, records: Optional[Path]) -> dict:
    """{run name: record} of the finished runs: opal_cql.pt files under runs_dir, and the lines of a records file
    (JSON lines written by --save-records), so that results outlive the checkpoints they came from."""
    runs = {}
    if records is not None and records.exists():
        runs.update({record["run"]: record for record in map(json.loads, records.read_text().splitlines())})
    for path in sorted(runs_dir.glob("*/opal_cql.pt")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload.get("finished"):
            runs[path.parent.name] = {"run": path.parent.name, "dataset_id": payload["dataset_id"],
                                      "primitives": payload["primitives"], "seed": payload.get("seed"),
                                      "args": payload["args"], "summary": payload["summary"],
                                      "versions": payload.get("versions")}
    return runs


def summarize(runs: dict):
    """One row per (dataset, --exp-name, mode) among the finished runs: IQM [95% CI] and mean [95% CI] of the final
    normalised score (the last evaluation, --eval-episodes episodes) and of the best evaluation during training,
    the per-run final scores, the mean closest approach to the goal and steps/s."""
    rows = {}
    for record in runs.values():
        key = (record["dataset_id"], record["args"]["exp_name"], record["primitives"])
        rows.setdefault(key, []).append(record["summary"])
    np.random.seed(0)  # the bootstrap's resampling: the same table every time
    print("| dataset | method | runs | final score, IQM [95% CI] | final, mean [95% CI] | best during training, "
          "IQM [95% CI] | final score per run | closest distance to goal, final | steps/s (1 thread) |")
    print("|---|---|---|---|---|---|---|---|---|")
    cell = lambda estimate: f"{estimate[0]:.1f} [{estimate[1]:.1f}, {estimate[2]:.1f}]"
    for dataset_id, exp_name, mode in sorted(rows, key=lambda key: (key[0], key[1] != "opal_cql", key[1], key[2] == "opal")):
        summaries = rows[(dataset_id, exp_name, mode)]
        final = [summary["last_normalized_score"] for summary in summaries]
        best = [summary["best_normalized_score"] for summary in summaries]
        final_estimates, best_estimates = interval_estimates(final), interval_estimates(best)
        label = ("CQL" if mode == "none" else "CQL+OPAL") + ("" if exp_name == "opal_cql" else f", {exp_name}")
        distance = np.mean([summary.get("last_closest_goal_distance", np.nan) for summary in summaries])
        print(f"| {dataset_id} | {label} | {len(summaries)} | {cell(final_estimates['iqm'])} | "
              f"{cell(final_estimates['mean'])} | {cell(best_estimates['iqm'])} | "
              f"{', '.join(f'{score:.0f}' for score in final)} | {distance:.2f} | "
              f"{np.mean([summary['sps'] for summary in summaries]):.0f} |")


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
    records = Path(args.records) if args.records else None
    runs = finished_runs(runs_dir, records)
    if args.save_records:
        if records is None:
            raise SystemExit("error: --save-records needs --records FILE")
        records.parent.mkdir(parents=True, exist_ok=True)
        records.write_text("".join(json.dumps(record) + "\n" for _, record in sorted(runs.items())))
    summarize(runs)

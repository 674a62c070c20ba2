"""Plots of chosen rows of a grid's report, with short labels (the grid's own plots carry every experiment).

    python analysis/plot_rows.py <records.jsonl> <output prefix> [dataset=<id>] <experiment>="<label>" ...
    e.g. python analysis/plot_rows.py results/online_sac_runs.jsonl docs/online_sac_pointmaze_large
             dataset=opal/pointmaze-large-diverse-v0 sac_opal_from_prior_bias1="SAC+OPAL (defaults)" ...

writes <prefix>_curves.png and <prefix>_intervals.png with the report's own plotting (IQM, 95% bootstrap CIs)
from the finished runs in a records file (`analysis/grid.py` writes them), one row per experiment name, only the
runs on `dataset` if given (a records file may hold several grids).
"""
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import grid  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) < 4:
        raise SystemExit(__doc__)
    records = [json.loads(line) for line in Path(sys.argv[1]).read_text().splitlines() if line.strip()]
    scores, rows = {}, dict(row.split("=", 1) for row in sys.argv[3:])
    if "dataset" in rows:
        dataset = rows.pop("dataset")
        records = [record for record in records if record["dataset_id"] == dataset]
    for experiment, label in rows.items():
        runs = sorted((r for r in records if r["args"].get("exp_name") == experiment), key=lambda r: r["seed"])
        if not runs:
            raise SystemExit(f"error: no finished run of {experiment} in {sys.argv[1]}")
        scores[label] = (grid.interval_estimates([r["summary"]["last_normalized_score"] for r in runs]), runs)
        print(f"{label}: {len(runs)} runs, final IQM {scores[label][0]['iqm'][0]:.1f}")
    with tempfile.TemporaryDirectory() as folder:
        grid.plot(scores, Path(folder))
        for name in ("curves", "intervals"):
            Path(f"{sys.argv[2]}_{name}.png").write_bytes((Path(folder) / f"{name}.png").read_bytes())

"""The tools in analysis/ read finished runs correctly (the timing scripts in benchmarks/ are never run in tests)."""

import torch

from conftest import run_script


def test_vae_table_groups_runs_by_changed_flags(sandbox, vae_checkpoints):
    result = run_script(sandbox, "analysis/vae_table.py", "--runs-dir", sandbox["base"] / "vae-runs")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 3  # one row per dataset: the three fixture runs changed the same flags
    for family, path in vae_checkpoints.items():
        payload = torch.load(path, map_location="cpu", weights_only=True)
        row = next(row for row in rows if f"| {payload['dataset_id']} |" in row)
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert "--gru-layers 1" in cells[1] and "--hidden-dim 32" in cells[1] and "--seed" not in cells[1]
        assert cells[2] == "1"  # the seed
        assert cells[5] == f"{payload['summary']['bc_nll']:.3f} ± 0.000"
        has_rollouts = payload["summary"].get("rollout_xy_error") is not None
        assert (cells[7] != "–") == has_rollouts == (family != "kitchen")  # kitchen has no maze to roll out in


def test_pointmaze_table_reports_iqm_and_intervals_by_hand(sandbox, tmp_path):
    import opal_cql as oc

    finals, bests = [0.0, 10.0, 20.0, 30.0, 100.0], [50.0, 60.0, 70.0, 80.0, 100.0]
    for seed, (final, best) in enumerate(zip(finals, bests), 1):
        run_dir = tmp_path / f"opal_cql__pointmaze-large__{seed}__0"
        run_dir.mkdir()
        summary = {"last_normalized_score": final, "best_normalized_score": best, "sps": 10.0,
                   "last_closest_goal_distance": 1.0}
        oc.save_checkpoint(run_dir / "opal_cql.pt", {"script": "opal_cql", "finished": True, "primitives": "opal",
                                                     "dataset_id": "opal/pointmaze-large-diverse-v0",
                                                     "args": {"exp_name": "opal_cql"}, "summary": summary})
    unfinished = tmp_path / "opal_cql__pointmaze-large__9__0"
    unfinished.mkdir()
    oc.save_checkpoint(unfinished / "opal_cql.pt", {"script": "opal_cql", "finished": False})
    result = run_script(sandbox, "analysis/pointmaze_table.py", "--summarize-only", "--runs-dir", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    row = [line for line in result.stdout.splitlines() if line.startswith("| opal/")]
    assert len(row) == 1  # the unfinished run is left out
    cells = [cell.strip() for cell in row[0].strip("|").split("|")]
    assert cells[1] == "CQL+OPAL" and cells[2] == "5"
    # IQM of 5 runs: the mean of the middle three (0 and 100 trimmed); the mean of all five is 32
    iqm, low, high = (float(x) for x in cells[3].replace("[", "").replace("]", "").replace(",", "").split())
    assert iqm == 20.0 and 0.0 <= low <= iqm <= high <= 100.0 and high > low
    assert cells[4].startswith("32.0 [") and cells[5].startswith("70.0 [")
    assert cells[6] == "0, 10, 20, 30, 100"
    # the records file keeps the table when the checkpoints are gone
    records = tmp_path / "records.jsonl"
    saved = run_script(sandbox, "analysis/pointmaze_table.py", "--summarize-only", "--runs-dir", tmp_path,
                       "--records", records, "--save-records")
    assert saved.returncode == 0 and len(records.read_text().splitlines()) == 5
    for path in tmp_path.glob("*/opal_cql.pt"):
        path.unlink()
    again = run_script(sandbox, "analysis/pointmaze_table.py", "--summarize-only", "--runs-dir", tmp_path,
                       "--records", records)
    assert [l for l in again.stdout.splitlines() if l.startswith("| opal/")] == row

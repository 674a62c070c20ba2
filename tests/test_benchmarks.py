"""The table scripts in benchmarks/ read finished runs correctly (the timing scripts are never run in tests)."""

import torch

from conftest import run_script


def test_vae_table_groups_runs_by_changed_flags(sandbox, vae_checkpoints):
    result = run_script(sandbox, "benchmarks/vae_table.py", "--runs-dir", sandbox["base"] / "vae-runs")
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

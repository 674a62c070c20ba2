"""analysis/grid.py: a tiny grid really runs on a local Ray cluster of 2 CPUs (a VAE, CQL and CQL+OPAL on two seeds,
and a run that fails), reports, skips finished runs the second time; the aggregate equals a hand computation."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import grid as gr  # noqa: E402
import opal_cql as oc  # noqa: E402
from opal_utils import save_checkpoint  # noqa: E402
from conftest import run_script  # noqa: E402

TINY_VAE = "--num-steps 20 --bc-steps 5 --hidden-dim 32 --gru-layers 1 --batch-size 16 --picture-latents 1"
TINY_CQL = ("--algorithm cql --hidden-dim 32 --critic-layers 2 --policy-layers 2 --batch-size 32 --cql-n-actions 3 "
            "--total-steps 30 --log-every 10 --eval-every 10 --eval-episodes 2 --eval-episodes-during 2 --num-envs 2")


def write_grid(folder: Path, dataset_id: str, broken: bool = True) -> Path:
    text = f'''
name = "tiny"
runs_dir = "{folder / 'runs'}"
records = "{folder / 'kept.jsonl'}"
[defaults]
"opal_cql.py" = "--dataset-id {dataset_id} {TINY_CQL}"
[experiments.vae]
script = "opal_vae.py"
seeds = [1]
args = "--dataset-id {dataset_id} {TINY_VAE}"
[experiments.cql]
script = "opal_cql.py"
label = "CQL"
seeds = [1, 2]
args = "--primitives none"
[experiments.opal]
script = "opal_cql.py"
label = "CQL+OPAL"
seeds = [1, 2]
vae = "vae"
vae_seed = 1
'''
    if broken:  # a run that fails: its log's end is reported and the other runs finish
        text += '[experiments.broken]\nscript = "opal_cql.py"\nseeds = [1]\nargs = "--primitives none --cql-n-actions 0"\n'
    path = folder / "tiny.toml"
    path.write_text(text)
    return path


def test_a_tiny_grid_runs_on_ray_reports_and_skips_finished_runs(sandbox, datasets, tmp_path):
    grid_file = write_grid(tmp_path, datasets["pointmaze"])
    first = run_script(sandbox, "analysis/grid.py", "--grid", grid_file, "--num-cpus", 2, "--poll", 5, timeout=900)
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]  # one run failed
    assert "1 run(s) failed" in first.stderr
    out = first.stdout
    assert "Ray: 2 CPUs, 6 runs to do, 2 at a time" in out
    for key in ("vae/seed1", "cql/seed1", "cql/seed2", "opal/seed1", "opal/seed2"):
        assert f"finished  {key}" in out
    assert "failed    broken/seed1: exit 1" in out and "--cql-n-actions must be at least 1, got 0" in out
    assert "5 finished, 1 failed, 0 skipped" in out
    assert not list((tmp_path / "runs").glob("*/seed*/run.pid"))  # each run's process id is gone with it
    # the CQL+OPAL runs were given the VAE run's checkpoint
    vae_ckpt = next((tmp_path / "runs" / "vae" / "seed1").glob("*/opal_vae.pt"))
    for seed in (1, 2):
        saved = torch.load(next((tmp_path / "runs" / "opal" / f"seed{seed}").glob("*/opal_cql.pt")), weights_only=True)
        assert saved["finished"] and saved["args"]["vae_ckpt"] == str(vae_ckpt) and saved["seed"] == seed
    # the table: one row per policy experiment with its 2 runs, the VAE's row, and the failed experiment has none
    table = (tmp_path / "runs" / "tiny" / "table.md").read_text()  # runs_dir set: the report in a folder "tiny"
    assert table in out
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| opal/")}
    assert set(rows) == {"CQL", "CQL+OPAL", "vae"}
    for label in ("CQL", "CQL+OPAL"):
        assert rows[label].split("|")[3].strip() == "2"
    for picture in ("intervals.png", "curves.png"):
        assert (tmp_path / "runs" / "tiny" / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kept = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert len(kept) == 5 and all(record["curve"] for record in kept if record["script"] == "opal_cql.py")

    # a second invocation runs nothing that finished: only the failed run again (without it, not even Ray starts)
    second = run_script(sandbox, "analysis/grid.py", "--grid", write_grid(tmp_path, datasets["pointmaze"], broken=False),
                        "--num-cpus", 2, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("skip      ") == 5 and "Ray:" not in second.stdout
    assert [l for l in second.stdout.splitlines() if l.startswith("| opal/")] == \
        [l for l in table.splitlines() if l.startswith("| opal/")]


def test_late_score_is_the_mean_of_the_last_four_evaluations():
    # evaluations 0, 10, 100, 20, 30, 40 (the last is the final one): the last four are 100, 20, 30, 40 -> 47.5
    record = {"curve": [[2500, 0.0], [5000, 10.0], [7500, 100.0], [10000, 20.0], [12500, 30.0], [15000, 40.0]]}
    assert gr.late_score(record) == pytest.approx(47.5)
    # fewer evaluations than four: no figure (the table shows "–"), not a mean over fewer
    assert gr.late_score({"curve": [[5000, 10.0], [10000, 20.0], [15000, 30.0]]}) is None
    assert gr.late_score({"curve": []}) is None and gr.late_score({}) is None


def test_iqm_and_mean_with_intervals_by_hand():
    # IQM of 5 runs: the mean of the middle three (0 and 100 trimmed) = 20; the mean of all five = 32
    estimates = gr.interval_estimates([0.0, 10.0, 20.0, 30.0, 100.0])
    assert estimates["iqm"][0] == pytest.approx(20.0) and estimates["mean"][0] == pytest.approx(32.0)
    for point, low, high in estimates.values():
        assert 0.0 <= low < point < high <= 100.0
    # IQM of 8 runs trims 2 at each end: mean of 3, 4, 5, 6 = 4.5
    assert gr.interval_estimates([1, 2, 3, 4, 5, 6, 7, 100])["iqm"][0] == pytest.approx(4.5)
    # the same runs give the same intervals (a fixed bootstrap seed)
    assert gr.interval_estimates([0.0, 10.0, 20.0, 30.0, 100.0]) == estimates


def fake_cql_run(folder: Path, exp_name: str, seed: int, finished: bool, **args):
    run_dir = folder / f"{exp_name}__pointmaze-large__{seed}__0"
    run_dir.mkdir(parents=True)
    saved = {**{key: value for key, value in vars(oc.Args(primitives="none")).items()}, "exp_name": exp_name, **args}
    save_checkpoint(run_dir / "opal_cql.pt", {
        "script": "opal_cql", "finished": finished, "seed": seed, "dataset_id": "opal/pointmaze-large-diverse-v0",
        "args": saved, "primitives": "none", "summary": {"last_normalized_score": 10.0 * seed,
                                                          "best_normalized_score": 50.0, "sps": 5.0}})
    return run_dir


def test_runs_are_matched_by_their_flags_and_resumed_when_unfinished(tmp_path, capsys):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(f'runs_dir = "{tmp_path / "runs"}"\n[experiments.raw]\nscript = "opal_cql.py"\nseeds = [1, 2, 3]\n'
                         'args = "--primitives none --cql-alpha 5.0"\n')
    grid = gr.load_grid(grid_file)
    assert [run["key"] for run in grid["runs"]] == ["raw/seed1", "raw/seed2", "raw/seed3"]
    elsewhere = tmp_path / "by-hand"
    fake_cql_run(elsewhere, "raw", 1, True, cql_alpha=5.0, total_steps=15000, bf16=False)  # resolved values count
    fake_cql_run(elsewhere, "raw", 2, True, cql_alpha=10.0)  # another --cql-alpha: not this grid's run
    fake_cql_run(elsewhere, "other", 3, True, cql_alpha=5.0)  # another --exp-name
    matched = gr.matching_records(grid, [elsewhere])
    assert list(matched) == ["raw/seed1"]
    assert "differs in --cql-alpha (10.0 vs 5.0)" in capsys.readouterr().out

    # the run's own folder: an unfinished checkpoint is resumed, a finished one skipped, none started afresh
    run = grid["runs"][2]
    assert gr.command_for(run, None)[2:] == ["--primitives", "none", "--cql-alpha", "5.0", "--seed", "3",
                                             "--exp-name", "raw", "--runs-dir", run["dir"]]
    unfinished = fake_cql_run(Path(run["dir"]), "raw", 3, False, cql_alpha=5.0)
    assert gr.command_for(run, None)[2:] == ["--resume", str(unfinished)]
    assert not gr.is_finished(gr.latest_checkpoint(run))


def test_grid_files_are_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[experiments.a]\nscript = "opal_cql.py"\nvae = "b"\n[experiments.b]\nscript = "opal_cql.py"\n')
    with pytest.raises(SystemExit, match="is not an opal_vae.py experiment"):
        gr.load_grid(bad)
    bad.write_text('[experiments.a]\nscript = "opal_cql.py"\nseed = [1]\n')
    with pytest.raises(SystemExit, match=r"knows only args, cpus, gpus, group, label, script, seeds.*\['seed'\]"):
        gr.load_grid(bad)
    bad.write_text('[experiments.v]\nscript = "opal_vae.py"\nseeds = [1]\n[experiments.a]\nscript = "opal_cql.py"\n'
                   'seeds = [2]\nvae = "v"\n')
    with pytest.raises(SystemExit, match="a/seed2 needs v/seed2, which the grid does not run"):
        gr.load_grid(bad)


def test_progress_is_read_from_the_runs_progress_bar(tmp_path):
    run = {"dir": str(tmp_path)}
    assert gr.progress(run) is None
    started = time.time() - 1
    (tmp_path / "run.log").write_text("CQL (opal):   0%|   | 0/15000 [00:00<?, ?it/s]\rCQL (opal):  83%|████  | "
                                      "12479/15000 [23:48<03:42, 11.34it/s, q_data=-2045.887]")
    assert gr.progress(run) == (12479, 15000, 11.34)
    line = gr.status_line({"a": run, "b": {"dir": str(tmp_path / "none")}}, started, 2, dict(finished=1, failed=0, skipped=0))
    # (15000 - 12479) / 11.34 = 222 s left for the running run, 15000 / 11.34 = 1,323 s for the queued one (a whole
    # run at the running one's speed), over 2 slots: 772 s
    assert "1 running, 1 queued, 1 finished" in line and "ETA ~13 min" in line


def test_the_report_by_hand_and_from_the_records_file_alone(tmp_path, capsys):
    grid_file = tmp_path / "g.toml"
    grid_file.write_text(f'runs_dir = "{tmp_path / "runs"}"\nrecords = "{tmp_path / "kept.jsonl"}"\n'
                         '[experiments.raw]\nscript = "opal_cql.py"\nlabel = "CQL"\nseeds = [1, 2, 3, 4, 5]\n'
                         'args = "--primitives none"\n')
    grid = gr.load_grid(grid_file)
    for run, final in zip(grid["runs"], [0.0, 100.0, 20.0, 30.0, 10.0]):
        run_dir = fake_cql_run(Path(run["dir"]), "raw", run["seed"], True)
        saved = torch.load(run_dir / "opal_cql.pt", weights_only=True)
        saved["summary"].update(last_normalized_score=final, last_closest_goal_distance=1.5)
        save_checkpoint(run_dir / "opal_cql.pt", saved)
    fake_cql_run(Path(grid["runs"][0]["dir"]) / "older", "raw", 1, False)  # an unfinished attempt is not a run
    row = [line for line in gr.report(grid).splitlines() if line.startswith("| opal/")]
    cells = [cell.strip() for cell in row[0].strip("|").split("|")]
    # IQM of 5 runs: the mean of the middle three (0 and 100 trimmed) = 20; the mean of all five = 32
    assert cells[1:3] == ["CQL", "5"] and cells[3].startswith("20.0 [") and cells[4].startswith("32.0 [")
    assert cells[5] == "50.0 [50.0, 50.0]" and cells[7] == "0, 100, 20, 30, 10" and cells[8] == "1.50"
    assert cells[6] == "–"  # these runs logged no evaluations: no mean of the last four
    # the records file keeps the table when the run folders are gone
    for run in grid["runs"]:
        shutil.rmtree(run["dir"])
    assert [line for line in gr.report(grid).splitlines() if line.startswith("| opal/")] == row
    # and running the grid again runs none of them (Ray never starts: nothing is left to do)
    capsys.readouterr()
    assert gr.run_grid(grid, gr.Args(grid=str(grid_file))) == 0
    assert capsys.readouterr().out.count(": kept in the records file") == 5


def start_a_long_run(sandbox, datasets, tmp_path, experiment: str):
    """A grid of one CQL run of 2,000 steps that saves no checkpoint of its own (only a stop's), started in the
    background; returns (the grid process, the grid file, the run's log) once the run has taken 50 steps."""
    grid_file = tmp_path / "long.toml"
    grid_file.write_text(f'runs_dir = "{tmp_path / "runs"}"\n[experiments.{experiment}]\nscript = "opal_cql.py"\n'
                         f'seeds = [1]\nargs = "--dataset-id {datasets["pointmaze"]} --primitives none {TINY_CQL} '
                         '--total-steps 2000 --eval-every 2000 --save-every 100000"\n')
    log = tmp_path / "runs" / experiment / "seed1" / "run.log"
    grid = subprocess.Popen([sys.executable, str(gr.ROOT / "analysis" / "grid.py"), "--grid", str(grid_file),
                             "--num-cpus", "2"], env=sandbox["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + 300
    while time.time() < deadline and (gr.progress({"dir": str(log.parent)}) or (0,))[0] < 50:
        time.sleep(0.2)
    return grid, grid_file, log


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stopped_grid_checkpoints_its_runs_and_resumes_them(sandbox, datasets, tmp_path, stop):
    # Ctrl-C, or SIGTERM from `kill` or a cluster's scheduler (Ray's own handler of SIGTERM must not end the grid
    # before the runs have saved)
    grid, grid_file, log = start_a_long_run(sandbox, datasets, tmp_path, "cql")
    grid.send_signal(stop)
    out, _ = grid.communicate(timeout=180)
    assert grid.returncode == 130, out[-3000:]
    assert "stopping: the runs save their checkpoints" in out
    checkpoint = gr.latest_checkpoint({"dir": str(log.parent), "script": "opal_cql.py"})
    stopped_at = torch.load(checkpoint, weights_only=True)["step"]
    assert 50 <= stopped_at < 2000 and not gr.is_finished(checkpoint)
    again = run_script(sandbox, "analysis/grid.py", "--grid", grid_file, "--num-cpus", 2, timeout=300)
    assert again.returncode == 0 and "finished  cql/seed1" in again.stdout, again.stdout[-3000:]
    assert f"--resume {checkpoint.parent}" in log.read_text()
    assert torch.load(checkpoint, weights_only=True)["step"] == 2000 and gr.is_finished(checkpoint)


def test_a_run_whose_worker_dies_is_retried_and_resumes(sandbox, datasets, tmp_path):
    # what a lost node looks like to a task: its worker process dies (SIGKILL); the run gets SIGTERM, checkpoints,
    # and Ray's retry resumes it from there
    grid, _, log = start_a_long_run(sandbox, datasets, tmp_path, "lost")
    killed = subprocess.run(["pkill", "-KILL", "-f", "ray::lost/seed1"]).returncode
    out, _ = grid.communicate(timeout=300)
    assert killed == 0 and grid.returncode == 0, out[-3000:]
    assert "finished  lost/seed1" in out
    commands = [line for line in log.read_text().splitlines() if line.startswith("$ ")]
    assert len(commands) == 2 and "--resume" in commands[1]  # started once, resumed once, not started afresh
    checkpoint = gr.latest_checkpoint({"dir": str(log.parent), "script": "opal_cql.py"})
    assert torch.load(checkpoint, weights_only=True)["step"] == 2000 and gr.is_finished(checkpoint)


def test_a_run_waits_until_its_earlier_attempt_has_ended(tmp_path):
    # a grid stopped and started again at once: the earlier attempt (its process id in run.pid) is still writing
    # its checkpoint, so the new attempt must not look for checkpoints until that process has ended
    run_dir, stop_file = tmp_path / "cql" / "seed1", str(tmp_path / "STOP")
    run_dir.mkdir(parents=True)
    earlier = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3)", "--runs-dir", str(run_dir)])
    (run_dir / "run.pid").write_text(f"{gr.socket.gethostname()} {earlier.pid}\n")
    gr.wait_for_earlier_attempt(run_dir, stop_file)
    assert earlier.poll() is not None  # returned only once it had ended
    # a process id now used by a process that is not this run's does not hold it up, nor does a stale file
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    (run_dir / "run.pid").write_text(f"{gr.socket.gethostname()} {other.pid}\n")
    started = time.time()
    gr.wait_for_earlier_attempt(run_dir, stop_file)
    assert time.time() - started < 2 and other.poll() is None
    other.kill()
    (run_dir / "run.pid").write_text(f"{gr.socket.gethostname()} {earlier.pid}\n")  # ended: returns at once
    gr.wait_for_earlier_attempt(run_dir, stop_file)
    ended = subprocess.Popen([sys.executable, "-c", "pass", "--runs-dir", str(run_dir)])
    while Path(f"/proc/{ended.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)  # ended, not yet reaped (its parent has not waited): a zombie does not hold it up
    (run_dir / "run.pid").write_text(f"{gr.socket.gethostname()} {ended.pid}\n")
    started = time.time()
    gr.wait_for_earlier_attempt(run_dir, stop_file)
    assert time.time() - started < 2
    ended.wait()


def test_a_family_of_tasks_is_aggregated_over_tasks_and_seeds():
    """A `group` of experiments (one a maze): IQM over every run of every task; the stratified bootstrap resamples
    seeds within each task, so a task whose seeds agree contributes no spread of its own."""
    scores = np.array([[0.0, 10.0, 20.0, 30.0], [40.0, 50.0, 60.0, 100.0]])  # (2 seeds, 4 tasks)
    estimates = gr.family_estimates(scores)
    assert estimates["iqm"][0] == pytest.approx((20 + 30 + 40 + 50) / 4)  # the middle half of the 8 runs
    assert estimates["mean"][0] == pytest.approx(scores.mean())
    assert estimates["iqm"][1] <= estimates["iqm"][0] <= estimates["iqm"][2]
    assert gr.family_estimates(scores) == estimates  # a fixed seed: the same table every time
    steady = gr.family_estimates(np.array([[10.0, 90.0], [10.0, 90.0]]))  # seeds agree within each task
    assert steady["mean"][1] == pytest.approx(50.0) and steady["mean"][2] == pytest.approx(50.0)

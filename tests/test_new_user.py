"""What a new user's mistakes and interruptions end in: one readable paragraph (or line) and the right exit code,
before any work is done, and nothing half-written."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT, assert_refused, run_script
from opal_utils import Loop

sys.path.insert(0, str(ROOT / "analysis"))
import grid as gr  # noqa: E402

SCRIPTS = {  # each script with the least it needs to get going (without primitives: no VAE checkpoint needed)
    "opal_vae.py": [], "opal_cql.py": ["--primitives", "none"], "opal_fewshot_il.py": ["--primitives", "none"],
    "opal_online_sac.py": ["--primitives", "none"], "opal_mt_transfer.py": ["--primitives", "none"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_runs_dir_that_cannot_be_made_is_refused_before_any_work(sandbox, tmp_path, script):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    started = time.time()
    result = run_script(sandbox, script, *SCRIPTS[script], "--runs-dir", a_file / "runs", timeout=120)
    assert_refused(result, "--runs-dir", "cannot hold the run's files")
    assert time.time() - started < 60  # refused at start-up: no dataset was loaded, no environment made
    result = run_script(sandbox, script, *SCRIPTS[script], "--runs-dir", "/proc/opal-runs", timeout=120)
    assert_refused(result, "--runs-dir /proc/opal-runs")


def test_ctrl_c_while_collecting_exits_130_cleanly_and_writes_nothing(sandbox):
    command = [sys.executable, str(ROOT / "collect_data.py"), "--env", "pointmaze-medium", "--steps", "2000000",
               "--dataset-id", "test/ctrl-c-v0"]
    process = subprocess.Popen(command, env=sandbox["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    time.sleep(8)  # inside the collection of 2M steps
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    store = Path(sandbox["env"]["MINARI_DATASETS_PATH"])
    assert process.returncode == 130 and "Traceback" not in stderr and "nothing was written" in stderr, stderr[-2000:]
    assert not (store / "test" / "ctrl-c-v0").exists() and not list(store.glob(".staging-*"))


def test_ctrl_c_while_a_dataset_is_generated_on_first_use(sandbox, tmp_path):
    """Ctrl-C in a terminal reaches the script and the collect_data.py it started: both end without a traceback,
    exit code 130, and the store holds no dataset (the next run generates it afresh)."""
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(tmp_path / "store")}
    process = subprocess.Popen([sys.executable, str(ROOT / "opal_vae.py"), "--env", "pointmaze-medium", "--runs-dir",
                                tmp_path / "runs"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)  # its own process group, as a terminal's job
    lines = []
    while process.poll() is None:
        lines.append(process.stdout.readline())
        if "generating it with collect_data.py" in lines[-1]:
            break
    time.sleep(8)  # collect_data.py's imports done, inside its collection
    os.killpg(process.pid, signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    stdout = "".join(lines) + stdout
    assert process.returncode == 130, (stdout[-2000:], stderr[-2000:])
    assert "Traceback" not in stderr and "nothing was written" in stdout + stderr, (stdout[-2000:], stderr[-2000:])
    assert not (tmp_path / "store" / "opal" / "pointmaze-medium-diverse-v0").exists()
    assert not list((tmp_path / "store").glob(".staging-*"))


def test_collect_data_refuses_before_collecting(sandbox, datasets, tmp_path):
    started = time.time()
    result = run_script(sandbox, "collect_data.py", "--env", "pointmaze-large", "--dataset-id", datasets["pointmaze"])
    assert result.returncode != 0 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert "steps/s" not in result.stdout + result.stderr  # nothing was collected first
    read_only = tmp_path / "read-only"
    read_only.write_text("a file where the store should be")
    result = subprocess.run([sys.executable, str(ROOT / "collect_data.py"), "--env", "pointmaze-large"],
                            env={**sandbox["env"], "MINARI_DATASETS_PATH": str(read_only / "store")},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "Cannot write to the Minari store" in result.stderr, result.stderr[-2000:]
    assert "steps/s" not in result.stdout + result.stderr
    result = run_script(sandbox, "collect_data.py", "--env", "pointmaze-large", "--action-noise", "-1")
    assert result.returncode != 0 and "--action-noise" in result.stderr and "Traceback" not in result.stderr
    assert time.time() - started < 90


@pytest.mark.parametrize("flags", [dict(num_cpus=0), dict(num_cpus=-2), dict(poll=0.0)])
def test_grid_refuses_a_cluster_without_cpus_and_a_zero_poll(flags):
    with pytest.raises(SystemExit) as refused:
        gr.Args(grid="grids/pointmaze_large.toml", **flags)
    assert str(refused.value).startswith("error: --")


def test_the_progress_bar_shows_small_rates_and_the_stop_is_on_its_own_line(capsys, monkeypatch):
    """0.25 steps/s shows as 0.25, not 0; a stop prints below the bar how to continue."""
    monkeypatch.setattr(time, "time", lambda: 1000.0)  # a frozen clock: the rate must not drift with the machine's load
    shown, stop_requested = {}, []
    args = SimpleNamespace(save_every=1000, log_every=1)
    loop = Loop("β-VAE", 1, 10, args, SimpleNamespace(add_scalar=lambda *a: None), {}, lambda step: None,
                Path("runs/x/opal_vae.pt"), stop_requested)
    loop.start_time = time.time() - 4.0
    loop.progress = SimpleNamespace(set_postfix=shown.update, close=lambda: shown.update(closed=True))
    loop.end_of_step(1, {"vae_loss": torch.tensor(1.0)})
    assert shown["sps"] == "0.25"
    stop_requested.append(signal.SIGINT)
    with pytest.raises(SystemExit) as stopped:
        loop.end_of_step(2, {"vae_loss": torch.tensor(1.0)})
    assert stopped.value.code == 130 and shown["closed"]
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith("stopped by signal at β-VAE step 2; checkpoint written to runs/x/opal_vae.pt")
    assert lines[-1].startswith("continue with: python ") and lines[-1].endswith(" --resume runs/x/opal_vae.pt")

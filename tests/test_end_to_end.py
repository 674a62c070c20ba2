"""End-to-end: collect_data.py and opal_vae.py run as a user runs them, on tiny datasets made here, offline."""

import json
import math
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import opal_vae as ov
from conftest import run_script

TINY = ["--hidden-dim", 32, "--gru-layers", 2, "--batch-size", 32, "--log-every", 5, "--picture-latents", 2]


def run_vae(sandbox, *arguments, expect_success=True):
    result = run_script(sandbox, "opal_vae.py", *TINY, "--runs-dir", sandbox["base"] / "runs", *arguments)
    if expect_success:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def run_dir_of(result) -> Path:
    line = [l for l in result.stdout.splitlines() if l.startswith("checkpoint: ")][-1]
    return Path(line.split("checkpoint: ", 1)[1]).parent


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


def test_pointmaze_dataset_passes_minaris_maze_checks(datasets):
    dataset = minari.load_dataset(datasets["pointmaze"])
    assert dataset.total_steps == 3000 and dataset.total_episodes == 6
    for episode in dataset.iterate_episodes():
        steps = len(episode.actions)
        assert episode.actions.shape == (steps, 2) and episode.rewards.shape == (steps,)
        assert episode.observations["observation"].shape == (steps + 1, 4)
        assert episode.infos["qpos"].shape == (steps + 1, 2) and episode.infos["qvel"].shape == (steps + 1, 2)
        assert episode.infos["qpos"].std(0).min() > 0  # the ball moves
        jumps = np.linalg.norm(np.diff(episode.observations["achieved_goal"], axis=0), axis=1)
        assert jumps.max() < 0.5
        assert not np.allclose(episode.actions[0], episode.actions[-1])
        np.testing.assert_allclose(episode.infos["qpos"], episode.observations["achieved_goal"], atol=1e-9)
    # the undirected data reaches many goals: a new random goal is drawn whenever one is reached
    goals = np.concatenate([e.infos["goal"] for e in dataset.iterate_episodes()])
    assert len(np.unique(goals.round(3), axis=0)) >= 6
    eval_env = dataset.recover_environment(eval_env=True)
    maze_map = eval_env.unwrapped.maze.maze_map
    assert maze_map[1][1] == "r" and maze_map[7][9] == "g"  # D4RL's large evaluation task


def test_expert_demonstrations_reach_the_evaluation_goal(datasets):
    dataset = minari.load_dataset(datasets["pointmaze-expert"])
    for episode in dataset.iterate_episodes():
        assert episode.terminations[-1] and episode.infos["success"][-1]
        assert np.linalg.norm(episode.observations["achieved_goal"][0] - [-4.5, 3.0]) < 0.5  # starts in cell (1, 1)


def test_generation_into_an_existing_id_is_refused(sandbox, datasets):
    result = run_script(sandbox, "collect_data.py", "--env", "pointmaze-large", "--steps", 100,
                        "--dataset-id", datasets["pointmaze"])
    assert result.returncode != 0 and "already exists" in result.stderr


def test_unwritable_store_gets_a_clear_message(sandbox, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(blocked / "store")}
    import subprocess, sys
    result = subprocess.run([sys.executable, str(Path(ov.__file__).with_name("collect_data.py")), "--steps", "50"],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Cannot write to the Minari store" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("family", ["pointmaze", "antmaze", "kitchen"])
def test_opal_vae_trains_and_writes_a_checkpoint(sandbox, datasets, family):
    result = run_vae(sandbox, "--dataset-id", datasets[family], "--num-steps", 40, "--bc-steps", 10, "--seed", 3)
    run_dir = run_dir_of(result)
    assert "40 gradient steps at batch 32" in result.stdout
    losses = scalars(run_dir, "losses/vae_loss")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]  # the updates really ran and learned something
    assert len(scalars(run_dir, "losses/bc_nll")) == 2 and scalars(run_dir, "charts/SPS")[-1] > 0

    payload = torch.load(run_dir / "opal_vae.pt", map_location="cpu", weights_only=True)
    obs_dim = {"pointmaze": 4, "antmaze": 29, "kitchen": 59}[family]
    act_dim = {"pointmaze": 2, "antmaze": 8, "kitchen": 9}[family]
    assert payload["obs_dim"] == obs_dim and payload["act_dim"] == act_dim
    assert payload["dataset_id"] == datasets[family] and payload["c"] == 10 and payload["latent_dim"] == 8
    assert payload["obs_layout"] == (["achieved_goal", "observation"] if family == "antmaze" else ["observation"])
    assert payload["summary"]["vae_steps"] == 40 and payload["summary"]["bc_steps"] == 10
    assert payload["seed"] == 3 and set(payload["versions"]) >= {"torch", "gymnasium", "minari", "mujoco"}
    encoder = ov.Encoder(obs_dim, act_dim, 8, 32, 2)
    encoder.load_state_dict(payload["encoder"])
    policy = ov.PrimitivePolicy(obs_dim, act_dim, 8, 32)
    policy.load_state_dict(payload["primitive_policy"])
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 40
    if family != "kitchen":  # the maze families get the picture and the closed-loop check
        assert (run_dir / "primitives.png").stat().st_size > 10_000
        assert payload["summary"]["rollout_xy_error"] >= 0


def test_same_seed_same_losses(sandbox, datasets):
    first = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0)
    second = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0)
    other = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0, "--seed", 2)
    first_losses = scalars(run_dir_of(first), "losses/vae_loss")
    assert first_losses == scalars(run_dir_of(second), "losses/vae_loss")
    assert first_losses != scalars(run_dir_of(other), "losses/vae_loss")


def test_missing_pointmaze_dataset_is_generated(sandbox, tmp_path):
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(tmp_path / "empty-store")}
    local = {**sandbox, "env": env}
    # the umaze alias is not in this store yet: the script makes it (1M steps take ~1 minute), then trains
    result = run_vae(local, "--env", "pointmaze-umaze", "--num-steps", 5, "--bc-steps", 0, "--picture-latents", 1)
    assert "is not in the local Minari store: generating it" in result.stdout
    assert minari.load_dataset  # the dataset now exists in that store
    assert (tmp_path / "empty-store" / "opal" / "pointmaze-umaze-diverse-v0" / "data").is_dir()


# --- bad input: one clear paragraph, exit code != 0, no traceback, nothing half-written ---
def assert_clean_failure(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


def test_unknown_alias(sandbox):
    assert_clean_failure(run_vae(sandbox, "--env", "antmaze-huge", expect_success=False),
                         "unknown --env 'antmaze-huge'", "antmaze-large-diverse", "pointmaze-large")


def test_d4rl_dataset_unavailable_offline(sandbox):
    runs = sandbox["base"] / "runs-offline"
    result = run_script(sandbox, "opal_vae.py", "--env", "antmaze-large-diverse", "--runs-dir", runs)
    assert_clean_failure(result, "D4RL/antmaze/large-diverse-v1 is not stored locally and could not be downloaded",
                         "minari download")
    assert not runs.exists()  # nothing half-written


def test_episodes_shorter_than_c(sandbox, datasets):
    runs = sandbox["base"] / "runs-short"
    result = run_script(sandbox, "opal_vae.py", "--dataset-id", datasets["short"], "--runs-dir", runs)
    assert_clean_failure(result, "every episode of test/pointmaze-short-v0 is shorter than c = 10")
    assert not runs.exists()


@pytest.mark.parametrize("flag,value", [("--c", 0), ("--latent-dim", 0), ("--num-steps", -5), ("--batch-size", 0)])
def test_bad_numbers(sandbox, flag, value):
    assert_clean_failure(run_vae(sandbox, flag, value, expect_success=False), f"{flag} must be")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(sandbox, datasets):
    result = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 200, "--learning-rate", 1e6,
                     "--save-every", 1, "--log-every", 1, expect_success=False)
    assert_clean_failure(result, "became nan" if "became nan" in result.stderr else "became inf", "stopped")
    run_dir = Path(sorted((sandbox["base"] / "runs").glob("*"), key=lambda p: p.stat().st_mtime)[-1])
    payload = ov.load_checkpoint(run_dir, "opal_vae")
    assert all(torch.isfinite(v).all() for v in payload["encoder"].values())
    assert math.isfinite(payload["summary"]["vae_loss"])


def test_unknown_dataset_id_offline(sandbox):
    result = run_script(sandbox, "opal_vae.py", "--dataset-id", "nobody/nothing-v0", "--runs-dir", sandbox["base"] / "runs-x")
    assert_clean_failure(result, "nobody/nothing-v0 is not stored locally and could not be downloaded", "minari list remote")
    assert not (sandbox["base"] / "runs-x").exists()


def test_missing_huggingface_hub_is_named(sandbox, tmp_path):
    # a stand-in package that fails to import, as on a machine where minari was installed without [hf]
    fake = tmp_path / "fake-site" / "huggingface_hub"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named huggingface_hub')\n")
    env = {**sandbox["env"], "PYTHONPATH": str(tmp_path / "fake-site")}
    result = run_script({**sandbox, "env": env}, "opal_vae.py", "--env", "kitchen-mixed")
    assert_clean_failure(result, "D4RL/kitchen/mixed-v2 is not stored locally and downloading it needs huggingface_hub",
                         "minari[hf]")


def test_unwritable_store_when_generating(sandbox, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(blocked / "store")}
    result = run_vae({**sandbox, "env": env}, "--env", "pointmaze-medium", expect_success=False)
    assert_clean_failure(result, f"cannot use the Minari store {blocked / 'store'} (Not a directory)",
                         "Set MINARI_DATASETS_PATH to a writable folder")


def test_track_logs_to_wandb_offline(sandbox, datasets, tmp_path):
    env = {**sandbox["env"], "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    run_vae({**sandbox, "env": env}, "--dataset-id", datasets["pointmaze"], "--num-steps", 10, "--bc-steps", 0, "--track")
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_interrupted_generation_leaves_no_dataset(sandbox):
    import signal, subprocess, sys, time
    command = [sys.executable, str(Path(ov.__file__).with_name("collect_data.py")), "--env", "pointmaze-medium",
               "--steps", "2000000", "--dataset-id", "test/interrupted-v0"]
    process = subprocess.Popen(command, env=sandbox["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # well inside the collection of 2M steps
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)
    store = Path(sandbox["env"]["MINARI_DATASETS_PATH"])
    assert process.returncode != 0
    assert not (store / "test" / "interrupted-v0").exists()
    assert not list(store.glob(".staging-*"))


@pytest.mark.parametrize("flag", ["--bf16", "--compile"])
def test_speed_flags_train(sandbox, datasets, flag):
    result = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 20, "--bc-steps", 0, flag)
    losses = scalars(run_dir_of(result), "losses/vae_loss")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    if flag == "--bf16":  # honoured where the CPU computes in bf16, turned off with a message elsewhere
        native = ov.use_bf16(True, torch.device("cpu"))
        saved = torch.load(run_dir_of(result) / "opal_vae.pt", weights_only=True)
        assert saved["args"]["bf16"] == native and ("bf16 autocast off" in result.stdout) != native

"""Shared fixtures: a private Minari store, TMPDIR and no network for every test."""

import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import minari
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """Environment for subprocesses and for this process: temporary store and TMPDIR, offline."""
    base = tmp_path_factory.mktemp("opal")
    env = dict(os.environ)
    env.update(
        MINARI_DATASETS_PATH=str(base / "minari"),
        TMPDIR=str(base / "tmp"),  # every maze gym.make leaves an xml file in TMPDIR
        HF_HUB_OFFLINE="1",
        WANDB_MODE="disabled",
        MUJOCO_GL="egl",
        PYTHONWARNINGS="ignore",
        PYTHONUNBUFFERED="1",  # a child's progress lines reach the tests that wait for them as they are printed
    )
    (base / "tmp").mkdir()
    for key in ("MINARI_DATASETS_PATH", "TMPDIR", "HF_HUB_OFFLINE", "WANDB_MODE"):
        os.environ[key] = env[key]
    return {"env": env, "base": base}


def run_script(sandbox, script, *arguments, timeout=600):
    """Run one of our scripts as a user would; returns the CompletedProcess (text output)."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, arguments)], env=sandbox["env"],
                          cwd=sandbox["base"], capture_output=True, text=True, timeout=timeout)


def assert_refused(result, *fragments):
    """The script stopped with a readable message (no traceback) that contains every fragment."""
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.fixture(scope="session")
def datasets(sandbox):
    """Tiny datasets of all three families, made by collect_data.py in the temporary store (antmaze: by the real
    controller)."""
    made = {
        "pointmaze": ("opal/pointmaze-large-diverse-v0", ["--env", "pointmaze-large", "--steps", 3000, "--episode-length", 500]),
        "pointmaze-expert": ("opal/pointmaze-large-expert-v0", ["--env", "pointmaze-large", "--kind", "expert", "--episodes", 2]),
        # antmaze by D4RL's recipe with the committed goal-reaching ant (controllers/ant_goal_reacher.pt)
        "antmaze": ("test/antmaze-large-made-v0", ["--env", "antmaze-large", "--steps", 600, "--episode-length", 200]),
        "antmaze-expert": ("test/antmaze-large-made-expert-v0", ["--env", "antmaze-large", "--kind", "expert", "--episodes", 2,
                                                                 "--episode-length", 300, "--keep-failed"]),
        "kitchen": ("test/kitchen-random-v0", ["--env", "kitchen", "--kind", "random", "--steps", 200, "--episode-length", 100]),
        "short": ("test/pointmaze-short-v0", ["--env", "pointmaze-umaze", "--kind", "random", "--steps", 40, "--episode-length", 8]),
    }
    for name, (dataset_id, arguments) in made.items():
        result = run_script(sandbox, "collect_data.py", *arguments, "--dataset-id", dataset_id)
        assert result.returncode == 0, f"collect_data.py failed for {name}:\n{result.stderr[-3000:]}"
    return {name: dataset_id for name, (dataset_id, _) in made.items()}


@pytest.fixture(scope="session")
def vae_checkpoints(sandbox, datasets):
    """Small opal_vae.pt checkpoints for the three dataset families (tiny networks, tiny budgets)."""
    checkpoints = {}
    for family in ("pointmaze", "antmaze", "kitchen"):
        result = run_script(sandbox, "opal_vae.py", "--dataset-id", datasets[family], "--num-steps", 20, "--bc-steps", 5,
                            "--hidden-dim", 32, "--gru-layers", 1, "--batch-size", 16, "--picture-latents", 1,
                            "--runs-dir", sandbox["base"] / "vae-runs")
        assert result.returncode == 0, result.stderr[-3000:]
        line = [l for l in result.stdout.splitlines() if l.startswith("checkpoint: ")][-1]
        checkpoints[family] = Path(line.split("checkpoint: ", 1)[1])
    return checkpoints


def pytest_collection_modifyitems(items):
    """Tests that run a script in a subprocess (they use the `sandbox` fixture) are marked `script`; the rest run
    in-process in seconds, and `-m "not script"` selects them (tests/mutation_check.py does)."""
    for item in items:
        if "sandbox" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.script)


def corridor_dataset(dataset_id: str):
    """A two-cell PointMaze corridor, reset cell west of the goal cell, as a tiny Minari dataset of random steps."""
    from minari.data_collector import EpisodeBuffer
    corridor = [[1, 1, 1, 1], [1, "r", "g", 1], [1, 1, 1, 1]]
    env = gym.make("PointMaze_UMaze-v3", maze_map=corridor, continuing_task=True, reset_target=False,
                   max_episode_steps=60)
    buffers = []
    for seed in range(2):
        obs, _ = env.reset(seed=seed)
        observations, actions = [obs], []
        for _ in range(12):
            actions.append(env.action_space.sample())
            observations.append(env.step(actions[-1])[0])
        buffers.append(EpisodeBuffer(observations={k: np.stack([o[k] for o in observations]) for k in obs},
                                     actions=np.stack(actions), rewards=np.zeros(12), terminations=np.zeros(12, bool),
                                     truncations=np.arange(12) == 11))
    minari.create_dataset_from_buffers(dataset_id=dataset_id, buffer=buffers, env=env.spec, eval_env=env.spec,
                                       algorithm_name="random", ref_min_score=0.0, ref_max_score=1.0,
                                       author="opal tests", author_email="opal@example.invalid",
                                       code_permalink="tests/test_opal_fewshot_il.py", description="random steps",
                                       data_format="hdf5")

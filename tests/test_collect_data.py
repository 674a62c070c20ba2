"""collect_data.py: the datasets it makes pass Minari's maze checks, demonstrations reach the goal, refusals."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import minari
import numpy as np
import pytest

from conftest import ROOT, run_script


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


def test_demonstrations_from_anywhere(sandbox, datasets):
    """--starts anywhere: every free cell but the goal is a reset cell of the demonstrations and of the evaluation
    task written with them; the demonstrations start in different cells and all reach the goal."""
    import collect_data

    free_map = [[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 1, 0, 1, 1], [1, 1, 1, 1, 1]]
    assert collect_data.eval_map(free_map, (1, 1), (2, 2), anywhere=True) == \
        [[1, 1, 1, 1, 1], [1, "r", "r", "r", 1], [1, 1, "g", 1, 1], [1, 1, 1, 1, 1]]
    assert collect_data.eval_map(free_map, (1, 1), (2, 2)) == \
        [[1, 1, 1, 1, 1], [1, "r", 0, 0, 1], [1, 1, "g", 1, 1], [1, 1, 1, 1, 1]]
    result = run_script(sandbox, "collect_data.py", "--env", "pointmaze-medium", "--kind", "expert", "--starts",
                        "anywhere", "--episodes", 6)
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = minari.load_dataset("opal/pointmaze-medium-expert-anywhere-v0")
    maze = dataset.recover_environment(eval_env=True).unwrapped.maze
    free = sum(value != 1 for row in maze.maze_map for value in row)
    assert len(maze.unique_reset_locations) == free - 1 and maze.maze_map[6][6] == "g"
    cells = set()
    for episode in dataset.iterate_episodes():
        assert episode.terminations[-1] and episode.infos["success"][-1]
        cells.add(tuple(maze.cell_xy_to_rowcol(episode.observations["achieved_goal"][0])))
    assert len(cells) >= 3
    refused = run_script(sandbox, "collect_data.py", "--starts", "anywhere", "--steps", 10)
    assert refused.returncode != 0 and "--starts applies to --kind expert only" in refused.stderr


def test_generation_into_an_existing_id_is_refused(sandbox, datasets):
    result = run_script(sandbox, "collect_data.py", "--env", "pointmaze-large", "--steps", 100,
                        "--dataset-id", datasets["pointmaze"])
    assert result.returncode != 0 and "already exists" in result.stderr


def test_unwritable_store_gets_a_clear_message(sandbox, tmp_path):
    blocked = tmp_path / "file-not-folder"
    blocked.write_text("")
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(blocked / "store")}
    result = subprocess.run([sys.executable, str(ROOT / "collect_data.py"), "--steps", "50"],
                            env=env, capture_output=True, text=True)
    assert result.returncode != 0 and "Cannot write to the Minari store" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("interrupted_in", ["create_dataset_from_buffers", "verify"])
def test_interrupted_write_leaves_no_dataset(sandbox, tmp_path, monkeypatch, interrupted_in):
    """A signal that lands while the dataset is being written (SIGTERM raises SystemExit(143) in the script, Ctrl-C
    KeyboardInterrupt) leaves neither a dataset nor its staging folder: interrupted inside Minari's write, after the
    files exist, and inside the verification that follows it."""
    import collect_data

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "store"))
    args = collect_data.Args(env="pointmaze-umaze", kind="random", steps=40, episode_length=20)
    buffers, data_env, eval_env = collect_data.collect(args)
    reached = []

    def interrupt_after(function):
        def wrapper(*arguments, **keywords):
            function(*arguments, **keywords)
            reached.append(sorted(p.name for p in (tmp_path / "store").iterdir()))  # what exists at the signal
            raise SystemExit(143)
        return wrapper

    target = collect_data.minari if interrupted_in == "create_dataset_from_buffers" else collect_data
    monkeypatch.setattr(target, interrupted_in, interrupt_after(getattr(target, interrupted_in)))
    with pytest.raises(SystemExit):
        collect_data.write_dataset(args, "test/interrupted-v0", buffers, data_env, eval_env)
    assert reached and reached[0][0].startswith(".staging-")  # the signal came while the staging copy existed
    assert list((tmp_path / "store").iterdir()) == []  # nothing left: no dataset, no staging folder


def test_sigterm_during_collection_exits_with_143_and_no_traceback(sandbox):
    command = [sys.executable, str(ROOT / "collect_data.py"), "--env", "pointmaze-medium",
               "--steps", "2000000", "--dataset-id", "test/interrupted-v0"]
    process = subprocess.Popen(command, env=sandbox["env"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(8)  # imports done, well inside the collection of 2M steps
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    store = Path(sandbox["env"]["MINARI_DATASETS_PATH"])
    assert process.returncode == 143 and "Traceback" not in stderr, stderr[-2000:]
    assert not (store / "test" / "interrupted-v0").exists() and not list(store.glob(".staging-*"))


def test_metaworld_pick_place_demonstrations_train_a_vae_and_are_refused_downstream(sandbox, tmp_path):
    """metaworld-pick-place: the scripted expert with noise succeeds, each episode ends --settle-steps after its first
    success, objects and goals differ between episodes and repeat with the seed; opal_vae.py trains on the data at
    c = 5 (no environment to roll out in: said, and skipped); opal_cql.py refuses it with one paragraph."""
    made = run_script(sandbox, "collect_data.py", "--env", "metaworld-pick-place", "--episodes", 4,
                      "--settle-steps", 5)
    assert made.returncode == 0, made.stderr[-2000:]
    dataset = minari.load_dataset("opal/metaworld-pick-place-expert-v0")
    assert dataset.env_spec is None and dataset.observation_space.shape == (39,) and dataset.action_space.shape == (4,)
    starts, successes = [], 0
    for episode in dataset.iterate_episodes():
        success = episode.infos["success"].astype(bool)  # one row per observation
        assert episode.truncations[-1] and not episode.terminations.any()
        if success.any():  # the episode ends 5 steps after its first success; without one, at Meta-World's 500
            successes += 1
            assert len(success) - 1 - np.argmax(success) == 5
        else:
            assert len(episode.actions) == 500
        assert np.abs(episode.actions).max() <= 1.0 and np.abs(episode.actions).std(0).min() > 0.05
        starts.append(np.concatenate([episode.observations[0, 4:7], episode.observations[0, -3:]]))  # object, goal
    assert len(np.unique(np.round(starts, 4), axis=0)) == 4 and successes >= 3
    again = run_script(sandbox, "collect_data.py", "--env", "metaworld-pick-place", "--episodes", 2,
                       "--settle-steps", 5, "--dataset-id", "test/metaworld-again-v0")
    assert again.returncode == 0, again.stderr[-2000:]
    first = next(minari.load_dataset("test/metaworld-again-v0").iterate_episodes())
    np.testing.assert_array_equal(first.observations, next(dataset.iterate_episodes()).observations)

    vae = run_script(sandbox, "opal_vae.py", "--env", "metaworld-pick-place", "--c", 5, "--num-steps", 10,
                     "--bc-steps", 2, "--hidden-dim", 32, "--gru-layers", 1, "--batch-size", 16,
                     "--runs-dir", tmp_path)
    assert vae.returncode == 0, vae.stderr[-2000:]
    assert "windows of c = 5; state 39-d (flat), action 4-d" in vae.stdout
    assert "no evaluation environment for opal/metaworld-pick-place-expert-v0" in vae.stdout
    assert "checkpoint: " in vae.stdout
    refused = run_script(sandbox, "opal_cql.py", "--env", "metaworld-pick-place", "--primitives", "none",
                         "--total-steps", 10, "--runs-dir", tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "stores no environment to act in" in refused.stderr
    wrong = run_script(sandbox, "collect_data.py", "--env", "metaworld-pick-place", "--kind", "diverse")
    assert wrong.returncode != 0 and "scripted expert's only" in wrong.stderr


def test_reference_scores_make_d4rls_normalised_scores(datasets):
    """Mazes: 0 and 1 (a success rate); kitchen: 0 and 4 tasks, so a return of 3 tasks scores 75."""
    kitchen, maze = minari.load_dataset(datasets["kitchen"]), minari.load_dataset(datasets["pointmaze"])
    assert minari.get_normalized_score(kitchen, np.array([3.0]))[0] == pytest.approx(0.75)
    assert minari.get_normalized_score(maze, np.array([1.0]))[0] == pytest.approx(1.0)


def test_only_demonstrations_that_reach_the_goal_are_kept():
    """--kind expert keeps the first --episodes episodes that reach the goal, in the order tried, tries no more than it
    needs, and stops with a message when --demo-attempts hold too few; --keep-failed keeps the first ones as they
    come."""
    import collect_data
    from types import SimpleNamespace

    reached = [False, True, False, True, True, False, True]  # attempt i reaches the goal?
    tried = []

    def run(attempt):
        tried.append(attempt)
        return SimpleNamespace(attempt=attempt, infos={"success": np.array([False] * 3 + [reached[attempt]])})

    kept = collect_data.successful_demonstrations(run, wanted=3, attempts=7)
    assert [b.attempt for b in kept] == [1, 3, 4] and tried == [0, 1, 2, 3, 4]
    tried.clear()
    assert [b.attempt for b in collect_data.successful_demonstrations(run, 2, 7, keep_failed=True)] == [0, 1]
    with pytest.raises(SystemExit, match="only 2 of 4 demonstrations reached the goal"):
        collect_data.successful_demonstrations(run, wanted=3, attempts=4)

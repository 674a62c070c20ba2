"""controllers/ant_goal_reacher.py: what the goal-reaching ant reads (the goal in its torso's frame) and is paid, by
hand; a few training steps run and write a policy that loads; the committed controller reaches its goals and makes
antmaze data by D4RL's recipe."""

import math
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_refused, run_script

sys.path.insert(0, str(ROOT / "controllers"))
import ant_goal_reacher as ag  # noqa: E402


def ant_observation(x, y, yaw, rest=0.0):
    """qpos[:15] + qvel[:14] with the torso at (x, y), height 0.6, turned by `yaw` about the vertical axis."""
    qpos = np.full(15, rest)
    qpos[:7] = [x, y, 0.6, math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
    return np.concatenate([qpos, np.full(14, rest)])


@pytest.mark.parametrize("yaw", [0.0, 0.7, math.pi / 2, -2.5])
def test_torso_yaw_of_a_turn_about_the_vertical(yaw):
    assert ag.torso_yaw([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]) == pytest.approx(yaw)


def test_the_goal_is_given_in_the_torsos_frame():
    facing_north = ant_observation(1.0, 2.0, math.pi / 2, rest=0.3)
    # 3 m north of a torso facing north: straight ahead; 1 m west of it: to its left; 2 m east: to its right
    for goal, expected in (((1.0, 5.0), (3.0, 0.0)), ((0.0, 2.0), (0.0, 1.0)), ((3.0, 2.0), (0.0, -2.0))):
        inputs = ag.controller_input(facing_north, goal)
        assert inputs.shape == (ag.OBS_DIM,)
        np.testing.assert_allclose(inputs[-2:], expected, atol=1e-6)
        np.testing.assert_allclose(inputs[:-2], facing_north[2:].astype(np.float32))  # AntMaze's 27-d observation
    facing_east = ant_observation(0.0, 0.0, 0.0)
    np.testing.assert_allclose(ag.controller_input(facing_east, (2.0, -1.0))[-2:], (2.0, -1.0), atol=1e-6)


def test_the_reward_is_the_speed_toward_the_goal_plus_upright_minus_effort():
    env = ag.GoalReachingAnt(seed=0)
    env.reset(goal_distance=3.0)
    before = env.distance
    action = np.full(8, 0.5, dtype=np.float32)
    _, reward, fell, reached, distance = env.step(action)
    assert not fell and not reached and distance == pytest.approx(float(np.linalg.norm(env.goal - env.state[:2])))
    assert reward == pytest.approx((before - distance) / 0.05 + 1.0 - 0.5 * 8 * 0.25)
    env.goal = env.state[:2] + np.array([0.1, 0.0])  # within 0.45 m: reached, +1, and a new goal 1-5 m away
    env.distance = 0.2
    _, reward, _, reached, distance = env.step(np.zeros(8, dtype=np.float32))
    assert reached and reward == pytest.approx((0.2 - distance) / 0.05 + 1.0 + 1.0)
    assert 1.0 - 0.5 <= env.distance <= 5.0 + 0.5


@pytest.mark.parametrize("tilt, lying", [(0.0, False), (1.0, False), (1.5, False), (1.7, True), (math.pi, True)])
def test_an_ant_on_its_back_has_fallen(tilt, lying):
    # turned by `tilt` about the x axis (and any heading): the up axis points below the horizon past 90°
    for yaw in (0.0, 2.0):
        about_x = np.array([math.cos(tilt / 2), math.sin(tilt / 2), 0.0, 0.0])
        about_z = np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])
        w1, x1, y1, z1 = about_z
        w2, x2, y2, z2 = about_x  # the product about_z * about_x: first the tilt, then the heading
        quaternion = (w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                      w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2)
        assert ag.on_its_back(quaternion) == lying
    env = ag.GoalReachingAnt(seed=0)  # in the simulator: the ant put down upside down ends its episode
    env.reset(goal_distance=3.0)
    qpos, qvel = env.ant.data.qpos.copy(), env.ant.data.qvel.copy() * 0
    qpos[2:7] = [0.3, math.cos(tilt / 2), math.sin(tilt / 2), 0.0, 0.0]
    env.ant.set_state(qpos, qvel)
    assert env.step(np.zeros(8, dtype=np.float32))[2] == lying


def saved_updates(saved) -> int:
    return int(saved["critic_optimizer"]["state"][0]["step"])


def test_a_few_training_steps_write_a_policy_that_loads(tmp_path):
    args = ag.Args(total_steps=400, learning_starts=300, batch_size=32, hidden_dim=32, log_every=100,
                   save_every=200, runs_dir=str(tmp_path / "runs"), policy_file=str(tmp_path / "policy.pt"),
                   episodes=1, max_steps=20)
    ag.train(args)
    act = ag.load_policy(tmp_path / "policy.pt")
    actions = act(np.zeros((3, ag.OBS_DIM), dtype=np.float32))
    assert actions.shape == (3, 8) and bool((actions.abs() <= 1).all())
    saved = torch.load(next((tmp_path / "runs").glob("*/checkpoint.pt")), weights_only=False)
    assert saved["step"] == 400 and saved["buffer"]["size"] == 400
    # continued from the networks alone (agent.pt, what a later session keeps): the policy refills the buffer first
    agent_file = next((tmp_path / "runs").glob("*/agent.pt"))
    ag.train(ag.Args(**{**vars(args), "total_steps": 600, "learning_starts": 100, "resume": str(agent_file)}))
    again = torch.load(agent_file, weights_only=False)
    assert again["step"] == 600 and "buffer" not in again
    # 200 more steps: the first 99 refill the buffer, then one update a step (the 100th step on)
    assert int(again["critic_optimizer"]["state"][0]["step"]) == saved_updates(saved) + 101


def test_the_committed_controller_reaches_goals_one_cell_away():
    """controllers/ant_goal_reacher.pt is the trained policy (not a stand-in): it says how it was made and reaches
    goals 4 m away (one maze cell) in 10 of 10 episodes of a seed of its own (99 of 100 in docs/collect_data.md)."""
    saved = torch.load(ag.POLICY_FILE, weights_only=True)
    assert saved["seed"] == 1 and saved["step"] == 1_000_000 and "ant_goal_reacher.py" in saved["command"]
    success, speed = ag.evaluate(ag.Args(mode="evaluate", episodes=10, seed=7))
    assert success >= 0.9 and speed > 0.2


def test_d4rls_antmaze_recipe_with_the_controller_makes_a_dataset_the_scripts_read(sandbox, tmp_path):
    """collect_data.py --env antmaze-large --kind diverse drives the committed controller from waypoint to waypoint:
    the dataset passes collect_data's maze checks, has D4RL antmaze's 29-d state layout and D4RL's evaluation task
    (reset (1, 1), goal (7, 9)), and the ant moves through the maze; --kind expert writes demonstrations of that
    task; a missing controller is a clear refusal."""
    import minari

    from opal_utils import load_dataset

    made = run_script(sandbox, "collect_data.py", "--env", "antmaze-large", "--steps", 1200, "--episode-length", 400,
                      "--dataset-id", "test/antmaze-made-v0")
    assert made.returncode == 0, made.stderr[-2000:]
    dataset, layout, data = load_dataset("test/antmaze-made-v0", "cpu")
    assert layout == ["achieved_goal", "observation"] and data["observations"].shape[1] == 29
    assert dataset.total_steps == 1200 and dataset.total_episodes == 3
    eval_map = dataset.recover_environment(eval_env=True).unwrapped.maze.maze_map
    assert eval_map[1][1] == "r" and eval_map[7][9] == "g"
    for episode in dataset.iterate_episodes():  # the ant walks away from where it starts (random torques do not)
        xy = episode.observations["achieved_goal"]
        assert np.linalg.norm(xy - xy[0], axis=1).max() > 2.0
    demos = run_script(sandbox, "collect_data.py", "--env", "antmaze-large", "--kind", "expert", "--episodes", 1,
                       "--episode-length", 50, "--keep-failed", "--dataset-id", "test/antmaze-made-expert-v0")
    assert demos.returncode == 0, demos.stderr[-2000:]
    assert minari.load_dataset("test/antmaze-made-expert-v0").total_episodes == 1
    # without --keep-failed a 50-step walk (about 4 m of the 56 m path) is no demonstration: a clear refusal
    refused = run_script(sandbox, "collect_data.py", "--env", "antmaze-large", "--kind", "expert", "--episodes", 1,
                         "--episode-length", 50, "--demo-attempts", 2, "--dataset-id", "test/antmaze-made-expert-2-v0")
    assert_refused(refused, "only 0 of 2 demonstrations reached the goal", "--keep-failed")
    assert not (sandbox["base"] / "minari" / "test" / "antmaze-made-expert-2-v0").exists()
    missing = run_script(sandbox, "collect_data.py", "--env", "antmaze-large", "--steps", 100, "--controller",
                         tmp_path / "none.pt", "--dataset-id", "test/antmaze-none-v0")
    assert missing.returncode != 0 and "controller" in missing.stderr and "Traceback" not in missing.stderr

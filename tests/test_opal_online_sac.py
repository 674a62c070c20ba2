"""opal_online_sac.py: the semi-MDP step, the replay buffer and the SAC target by hand; the high-level transitions a
real run stores, both modes end to end on the PointMaze and AntMaze schemas; refusals."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import opal_online_sac as osac
from conftest import assert_refused, corridor_dataset, run_script

TINY = ["--hidden-dim", 32, "--layers", 1, "--batch-size", 16, "--num-envs", 2, "--learning-starts", 40,
        "--prior-start-steps", 100, "--log-every", 20, "--eval-episodes", 2, "--eval-episodes-during", 2,
        "--eval-num-envs", 2]


def run_sac(sandbox, *arguments):
    return run_script(sandbox, "opal_online_sac.py", *TINY, "--runs-dir", sandbox["base"] / "sac-runs", *arguments)


def checkpoint_of(result) -> dict:
    line = [line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")][-1]
    return torch.load(line.split("checkpoint: ", 1)[1], weights_only=True)


def test_smdp_step_by_hand():
    # c = 3, γ = 0.5; env 0 runs its primitive out with rewards 1, 0, 2; env 1's episode ends at its second step,
    # reward 4 there: it closes with k = 2 < c
    returns, steps = torch.zeros(2), torch.zeros(2, dtype=torch.long)
    closed_after = []
    for rewards, ended in (([1.0, 0.0], [False, False]), ([0.0, 4.0], [False, True]), ([2.0, 0.0], [False, False])):
        returns, steps, closed = osac.smdp_step(returns, steps, torch.tensor(rewards), torch.tensor(ended), 0.5, 3)
        closed_after.append(closed.tolist())
        if closed[1]:
            assert returns[1].item() == pytest.approx(0.5 * 4.0) and steps[1].item() == 2
            returns[1], steps[1] = 0.0, 0  # the script opens a new transition there
    assert closed_after == [[False, False], [False, True], [True, False]]
    assert returns[0].item() == pytest.approx(1.0 + 0.25 * 2.0) and steps[0].item() == 3
    assert steps[1].item() == 1 and returns[1].item() == 0.0  # the new transition ran one step, reward 0
    # its backup: γ once per decision, or γ^k for the k steps it ran
    k = torch.tensor([3.0, 2.0])
    assert osac.backup_discounts(k, 0.5, "decision").tolist() == [0.5, 0.5]
    assert osac.backup_discounts(k, 0.5, "window").tolist() == [0.125, 0.25]


def test_replay_buffer_is_a_ring_and_round_trips():
    buffer = osac.ReplayBuffer(3, 2, 1, "cpu")
    row = lambda value, n: dict(states=torch.full((n, 2), value), choices=torch.full((n, 1), value),
                                returns=torch.full((n,), value), next_states=torch.full((n, 2), value),
                                dones=torch.zeros(n), steps=torch.full((n,), 3, dtype=torch.long))
    buffer.add(**row(1.0, 2))
    buffer.add(**row(2.0, 2))  # the fourth transition overwrites the first
    assert buffer.size == 3 and buffer.position == 1
    assert buffer.data["returns"].tolist() == [2.0, 1.0, 2.0] and buffer.data["steps"].tolist() == [3.0] * 3
    copy = osac.ReplayBuffer(3, 2, 1, "cpu")
    copy.load_state_dict(buffer.state_dict())
    assert copy.size == 3 and copy.position == 1
    assert all(torch.equal(copy.data[name], buffer.data[name]) for name in buffer.data)
    batch = buffer.sample(50, torch.Generator().manual_seed(0))
    assert set(batch["returns"].tolist()) == {1.0, 2.0} and batch["states"].shape == (50, 2)


def test_sac_critic_target_by_hand():
    # α ≈ 0 and target critics that output 5 and 7 everywhere: y = R + γ_hl (1 - done) min(5, 7)
    args = osac.Args(primitives="none", hidden_dim=8, layers=1)
    agent = osac.SAC(3, -torch.ones(2), torch.ones(2), args, torch.randn(50, 3))
    with torch.no_grad():
        agent.log_alpha.fill_(-60.0)
        last = agent.target_critics.net[-1]  # the last layer of both target critics: weights 0, biases 5 and 7
        last.weight.zero_()
        last.bias.copy_(torch.tensor([5.0, 7.0]).view(2, 1, 1))
    s, s_next, choice = torch.randn(4, 3), torch.randn(4, 3), torch.rand(4, 2) * 2 - 1
    reward, done = torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 1.0, 0.0, 0.0])
    discount = torch.tensor([0.9, 0.9, 0.5, 0.9])
    with torch.no_grad():
        q = agent.critics(s, choice)
    target = torch.tensor([1.0 + 0.9 * 5, 0.0, 2.0 + 0.5 * 5, 0.5 + 0.9 * 5])
    losses = agent.update(s, choice, reward, s_next, done, discount)
    assert losses["critic_loss"].item() == pytest.approx(((q - target) ** 2).mean(1).sum().item(), rel=1e-5)
    assert losses["q"].item() == pytest.approx(q.mean().item(), rel=1e-5)


def test_sac_temperature_and_prior_penalty():
    # the policy pays log π; with a prior it pays log π - log ρ (a one-sample KL), and α moves toward its target
    args = osac.Args(primitives="none", hidden_dim=8, layers=1)
    agent = osac.SAC(3, -torch.ones(2), torch.ones(2), args, torch.randn(50, 3))
    s, choice, log_prob = torch.randn(5, 3), torch.rand(5, 2) * 2 - 1, torch.randn(5)
    assert torch.equal(agent.penalty(s, choice, log_prob), log_prob) and agent.penalty_target == 2.0
    prior = osac.Prior(3, 2, 8)
    agent = osac.SAC(3, -torch.ones(2), torch.ones(2), osac.Args(vae_ckpt="x", prior_kl_target=4.0, hidden_dim=8,
                                                                 layers=1), torch.randn(50, 3), prior)
    mean, log_std = prior(s)
    expected = log_prob - (-0.5 * ((choice - mean) / log_std.exp()) ** 2 - log_std
                           - 0.5 * math.log(2 * math.pi)).sum(-1)
    assert torch.allclose(agent.penalty(s, choice, log_prob), expected, atol=1e-5) and agent.penalty_target == 4.0
    batch = (torch.randn(16, 3), torch.rand(16, 2) * 2 - 1, torch.zeros(16), torch.randn(16, 3), torch.zeros(16),
             torch.full((16,), 0.99))
    losses = agent.update(*batch)
    moved = agent.log_alpha.item()  # one Adam step of size lr against the sign of (penalty - target)
    assert moved == pytest.approx(args.critic_lr * (1 if losses["penalty"].item() > 4.0 else -1), rel=1e-3)


def test_start_from_prior_fits_the_task_policy_to_the_prior():
    # a prior whose means vary with the state and sit inside the box: after fitting, π's own mean (before its tanh)
    # is the prior's, its spread the prior's, and the prior's samples became likelier under π
    torch.manual_seed(0)
    prior = osac.Prior(3, 2, 16)
    with torch.no_grad():
        prior.net[-1].weight.mul_(5.0), prior.net[-1].bias.copy_(torch.tensor([0.5, -0.5, -1.0, -1.0]))
    policy = osac.TanhGaussianPolicy(3, 2, -3 * torch.ones(2), 3 * torch.ones(2), 32, 2)
    states = torch.randn(2000, 3)
    before, after = osac.start_from_prior(policy, prior, states, 600, 256, 3e-3, seed=1)
    assert after > before + 0.5
    with torch.no_grad():
        s = torch.randn(500, 3)
        mean, log_std = prior(s)
        fitted = policy(s, deterministic=True)[0]
        assert (fitted - mean).abs().mean() < 0.1 and mean.std(0).min() > 0.3  # tracks a prior that varies
        samples = torch.stack([policy(s)[0] for _ in range(64)])
        assert torch.allclose(samples.std(0).mean(0), log_std.exp().mean(0), rtol=0.25)


def test_stored_transitions_add_up(sandbox, datasets):
    """SAC+OPAL with c = 4 in a two-cell corridor, episodes cut at 10 steps: every episode is primitives of 4, 4
    and 2 steps (the last ends inside a primitive, at the time limit, and bootstraps; the goal, a cell away, is
    rarely reached so soon, and a goal transition is checked by hand in test_smdp_step_by_hand); the steps of the
    stored and open transitions add up to the environment steps taken. The training reward is shaped, r' = 2 r - 1:
    every step without the goal costs 1."""
    corridor_dataset("test/corridor-sac-v0")
    vae = run_script(sandbox, "opal_vae.py", "--dataset-id", "test/corridor-sac-v0", "--c", 4, "--num-steps", 20,
                     "--bc-steps", 5, "--hidden-dim", 16, "--gru-layers", 1, "--batch-size", 8, "--picture-latents", 1,
                     "--runs-dir", sandbox["base"] / "vae-runs")
    assert vae.returncode == 0, vae.stderr[-3000:]
    vae_path = [line for line in vae.stdout.splitlines() if line.startswith("checkpoint: ")][-1].split(": ", 1)[1]
    result = run_sac(sandbox, "--dataset-id", "test/corridor-sac-v0", "--vae-ckpt", vae_path, "--total-steps", 200,
                     "--max-episode-steps", 10, "--gamma", 0.9, "--eval-every", 100, "--reward-scale", 2,
                     "--reward-bias", -1)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = checkpoint_of(result)
    buffer, opened = payload["buffer"], payload["open"]
    steps, dones, returns = buffer["steps"], buffer["dones"].bool(), buffer["returns"]
    assert payload["c"] == 4 and buffer["size"] == len(steps) > 0
    assert ((steps >= 1) & (steps <= 4)).all()
    costs = -(1 - 0.9 ** steps) / (1 - 0.9)  # Σ_{t<k} γ^t (-1)
    assert torch.allclose(returns[dones], costs[dones] + 2 * 0.9 ** (steps[dones] - 1))  # the goal, on the last step
    assert (~dones).any() and torch.allclose(returns[~dones], costs[~dones])
    assert set(steps[~dones].tolist()) <= {4.0, 2.0}
    assert (steps[~dones] == 2).any()  # time-limit ends inside a primitive happened
    assert steps.sum().item() + opened["steps"][~opened["needs_choice"]].sum().item() == 200
    # each transition's s' is where its primitive ended: the ball moved, and every transition but an episode's
    # first starts exactly where one stored before it ended (20 episodes of 10 steps in all)
    states, next_states = buffer["states"], buffer["next_states"]
    assert (states != next_states).any(1).all()
    starts_elsewhere = sum(not (next_states == state).all(1).any() for state in states)
    assert starts_elsewhere <= 200 // 10
    assert 0 < payload["updates"] <= len(steps)  # one update per transition closed after the warm-up
    # the training episodes' log: one entry per episode that ended (at the goal, a terminal transition; at the time
    # limit, the 2-step one), its success and its return (the task's 0/1) the same, the goal's count in the summary
    ended = int(dones.sum()) + int(((steps == 2) & ~dones).sum())
    summary = payload["summary"]
    assert summary["train_episodes"] == ended and summary["train_episodes_at_goal"] == int(dones.sum())
    events = EventAccumulator(str(Path(result.stdout.split("run dir ")[1].split()[0]))).Reload()
    episode_returns = [event.value for event in events.Scalars("charts/episodic_return")]
    episode_success = [event.value for event in events.Scalars("charts/episode_success")]
    assert len(episode_returns) == ended and episode_returns == episode_success


def test_training_envs_report_each_episode_and_restore_its_return(sandbox):
    """opal_utils.TrainingEnvs in the corridor: pushed east, the ball reaches the goal cell; the step that reaches
    it reports that episode once, as (return 1, reached), and the next episode's return starts from 0. With the
    dense reward, a copy restored from a checkpoint mid-episode (its actions replayed) has the same return so far
    and reports the same episode."""
    from opal_utils import TrainingEnvs, load_minari_dataset, observation_layout

    corridor_dataset("test/corridor-episodes-v0")
    dataset = load_minari_dataset("test/corridor-episodes-v0")
    layout, east = observation_layout(dataset), torch.tensor([[1.0, 0.0]])
    envs = TrainingEnvs(dataset, layout, 1, 7, torch.device("cpu"))
    envs.reset(np.ones(1, dtype=bool))
    reports = [envs.step(east)[-1] for _ in range(40)]
    reached = [i for i, episodes in enumerate(reports) if episodes]
    assert reached and reports[reached[0]] == [(1.0, True)]  # the sparse reward: 1 on the step at the goal
    assert all(not episodes for episodes in reports[:reached[0]])
    envs.reset(np.ones(1, dtype=bool))
    assert envs.episode_returns.tolist() == [0.0]

    dense = TrainingEnvs(dataset, layout, 1, 7, torch.device("cpu"), reward_type="dense")
    dense.reset(np.ones(1, dtype=bool))
    for _ in range(5):
        dense.step(east)
    restored = TrainingEnvs(dataset, layout, 1, 7, torch.device("cpu"), reward_type="dense")
    restored.restore(dense.state_dict())
    assert 0 < restored.episode_returns[0] == dense.episode_returns[0]
    for _ in range(40):
        first, second = dense.step(east)[-1], restored.step(east)[-1]
        assert first == second
        if first:
            break
    assert first and first[0][1]  # the goal, with the same return in both


@pytest.mark.parametrize("family", ["pointmaze", "antmaze"])
@pytest.mark.parametrize("mode", ["opal", "none"])
def test_end_to_end(sandbox, datasets, vae_checkpoints, family, mode):
    primitives = ["--vae-ckpt", vae_checkpoints[family]] if mode == "opal" else ["--primitives", "none"]
    result = run_sac(sandbox, "--dataset-id", datasets[family], *primitives, "--total-steps", 120,
                     "--learning-starts", 20, "--max-episode-steps", 30, "--eval-every", 60, "--save-every", 50)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 60: normalized score" in result.stdout and "step 120: normalized score" in result.stdout
    payload = checkpoint_of(result)
    c = payload["c"]
    assert payload["finished"] and payload["primitives"] == mode and (c > 1) == (mode == "opal")
    assert payload["updates"] > 0 and payload["buffer"]["size"] > 0
    assert payload["summary"]["steps"] == 120 and math.isfinite(payload["summary"]["critic_loss"])
    assert payload["critic_optimizer"]["state"][0]["step"].item() == payload["updates"]  # every update stepped Adam
    if mode == "opal":  # the primitive policy travels with the task policy
        assert payload["primitive_policy"] is not None and payload["choice_dim"] == payload["latent_dim"]
    run_dir = Path(result.stdout.split("run dir ")[1].split()[0])
    events = EventAccumulator(str(run_dir)).Reload()
    assert {"losses/critic_loss", "charts/SPS", "charts/updates_per_second", "eval/success_rate"} <= set(
        events.Tags()["scalars"])


def test_refusals(sandbox, datasets, vae_checkpoints):
    assert_refused(run_sac(sandbox, "--dataset-id", datasets["pointmaze"]), "--primitives opal needs --vae-ckpt")
    assert_refused(run_sac(sandbox, "--dataset-id", datasets["pointmaze"], "--primitives", "none",
                           "--prior-kl-target", 5), "--prior-kl-target needs the VAE's prior")
    assert_refused(run_sac(sandbox, "--dataset-id", datasets["pointmaze"], "--vae-ckpt", vae_checkpoints["antmaze"]),
                   "does not fit this run: its dataset_id")
    assert_refused(run_sac(sandbox, "--dataset-id", datasets["kitchen"], "--primitives", "none", "--dense-reward"),
                   "--dense-reward needs a maze task")
    assert_refused(run_sac(sandbox, "--primitives", "none", "--num-envs", 8, "--total-steps", 4),
                   "--total-steps (4) must be at least --num-envs (8)")

"""opal_fewshot_il.py: the demonstrations' relabelling and choice by hand, both modes end to end on all three dataset
families, demonstrations made by a policy, refusals."""

import math
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import opal_fewshot_il as fs
from opal_utils import load_checkpoint, policies_from_checkpoint, save_checkpoint
from conftest import assert_refused, corridor_dataset, run_script

TINY = ["--policy-layers", 2, "--hidden-dim", 32, "--batch-size", 16, "--total-steps", 40, "--finetune-steps", 20,
        "--log-every", 10, "--eval-every", 20, "--eval-episodes", 2, "--eval-episodes-during", 2, "--num-envs", 2]


def run_fewshot(sandbox, *arguments):
    return run_script(sandbox, "opal_fewshot_il.py", *TINY, "--runs-dir", sandbox["base"] / "fewshot-runs", *arguments)


def checkpoint_of(result) -> Path:
    return Path([line for line in result.stdout.splitlines() if line.startswith("checkpoint: ")][-1][12:])


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir))
    events.Reload()
    return [event.value for event in events.Scalars(tag)]


class WindowSummary(torch.nn.Module):
    """A stand-in encoder whose 'mean' depends on every step of the window it reads: (Σ_t a_t + 100 s_0[0], t-weighted
    sum of the states' first coordinate), so a wrong window, stride or step gives another number."""

    def forward(self, states, actions):  # (B, c, 1), (B, c, 1)
        weights = torch.arange(1, states.shape[1] + 1, dtype=torch.float32)
        mean = torch.stack([actions[..., 0].sum(1) + 100 * states[:, 0, 0], (states[..., 0] * weights).sum(1)], -1)
        return mean, torch.zeros_like(mean)


def two_demonstrations():
    """Episodes of 4 and 3 steps, flat rows 0-4 and 5-8 (T + 1 rows each); state = row number, action = 10 row."""
    rows = torch.arange(9, dtype=torch.float32)[:, None]
    return {"observations": rows, "actions": 10 * rows, "episode_lengths": torch.tensor([4, 3])}


def test_relabel_demonstrations_by_hand():
    demos = two_demonstrations()
    starts, latents = fs.relabel_demonstrations(WindowSummary(), demos, c=2)
    # stride 1, windows inside an episode: episode 0 starts t = 0, 1, 2 (rows 0-2), episode 1 t = 0, 1 (rows 5, 6)
    assert starts.tolist() == [0, 1, 2, 5, 6]
    # window at row r: actions 10 r + 10 (r + 1), first state r; states weighted 1 r + 2 (r + 1)
    assert latents.tolist() == [[20 * r + 10 + 100 * r, 3 * r + 2] for r in (0, 1, 2, 5, 6)]
    starts, choices = fs.relabel_demonstrations(None, demos, c=1)  # plain BC: every step and its own action
    assert starts.tolist() == [0, 1, 2, 3, 5, 6, 7] and choices[:, 0].tolist() == [0, 10, 20, 30, 50, 60, 70]


def test_pick_demonstrations_by_hand():
    demos = {"observations": torch.arange(12.0)[:, None], "actions": -torch.arange(12.0)[:, None],
             "episode_lengths": torch.tensor([2, 3, 4])}  # rows 0-2, 3-6, 7-11
    rows_of = {0: [0, 1, 2], 1: [3, 4, 5, 6], 2: [7, 8, 9, 10, 11]}
    seen = set()
    for seed in range(12):
        picked, chosen = fs.pick_demonstrations(demos, 2, seed)
        expected = np.random.default_rng(seed).choice(3, 2, replace=False)
        assert chosen == sorted(expected.tolist()) and len(set(chosen)) == 2
        assert picked["observations"][:, 0].tolist() == [r for e in chosen for r in rows_of[e]]
        assert picked["actions"][:, 0].tolist() == [-r for e in chosen for r in rows_of[e]]
        assert picked["episode_lengths"].tolist() == [[2, 3, 4][e] for e in chosen]
        seen.add(tuple(chosen))
    assert len(seen) == 3  # seeds draw different demonstrations
    picked, chosen = fs.pick_demonstrations(demos, 3, 0)  # all of them
    assert chosen == [0, 1, 2] and picked["observations"][:, 0].tolist() == list(range(12))
    with pytest.raises(SystemExit, match="--num-demos 4 asks for more demonstrations than the dataset holds \\(3\\)"):
        fs.pick_demonstrations(demos, 4, 0)


def constant_output(policy, output):
    """The task policy's network outputs `output` (means, then log-stds) whatever the state."""
    with torch.no_grad():
        for layer in policy.net:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.zero_()
                layer.bias.zero_()
        policy.net[-1].bias.copy_(torch.tensor(output))


def test_task_policy_nll_by_hand():
    # a task policy whose network outputs mean (0.5, -1) and log-std (0, -1) everywhere, in the box [-2, 2] x [0, 4]
    policy = fs.TanhGaussianPolicy(3, 2, torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 4.0]), 8, 1)
    constant_output(policy, [0.5, -1.0, 0.0, -1.0])
    choices = torch.tensor([[1.0, 1.0], [-0.5, 3.0]])

    def log_density(choice):  # change of variables: x = centre + half-width tanh(u)
        total = 0.0
        for value, centre, half, mean, log_std in zip(choice, (0.0, 2.0), (2.0, 2.0), (0.5, -1.0), (0.0, -1.0)):
            squashed = (value - centre) / half
            u = math.atanh(squashed)
            total += (-0.5 * ((u - mean) / math.exp(log_std)) ** 2 - log_std - 0.5 * math.log(2 * math.pi)
                      - math.log(1 - squashed ** 2 + 1e-6) - math.log(half))
        return total

    expected = -(log_density([1.0, 1.0]) + log_density([-0.5, 3.0])) / 2
    assert fs.task_policy_nll(policy, torch.randn(2, 3), choices).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family", ["pointmaze", "antmaze", "kitchen"])
@pytest.mark.parametrize("primitives", ["opal", "none"])
def test_fewshot_runs_end_to_end(sandbox, datasets, vae_checkpoints, family, primitives):
    # pointmaze and antmaze: demonstrations of the evaluation task (the ant's by the real controller); kitchen: its
    # random stand-in plays the demonstrations
    demo_id = datasets[f"{family}-expert"] if family != "kitchen" else datasets[family]
    extra = ["--vae-ckpt", vae_checkpoints[family]] if primitives == "opal" else []
    result = run_fewshot(sandbox, "--dataset-id", datasets[family], "--demo-dataset-id", demo_id, "--num-demos", 2,
                         "--primitives", primitives, *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 20: normalized score" in result.stdout and "step 40: normalized score" in result.stdout
    path = checkpoint_of(result)
    payload = load_checkpoint(path, "opal_fewshot_il")
    assert payload["finished"] and payload["primitives"] == primitives and payload["c"] == (10 if primitives == "opal" else 1)
    assert payload["demo_dataset_id"] == demo_id and len(payload["demo_episodes"]) == 2
    # all 40 imitation steps happened, and the likelihood rose
    assert {int(state["step"]) for state in payload["policy_optimizer"]["state"].values()} == {40}
    assert payload["policy_optimizer"]["param_groups"][0]["lr"] == payload["args"]["policy_lr"]
    policy_nll = scalars(path.parent, "losses/policy_nll")
    assert len(policy_nll) == 4 and policy_nll[-1] < policy_nll[0]
    assert len(scalars(path.parent, "eval/normalized_score")) == 2
    task_policy, primitive_policy = policies_from_checkpoint(payload, fs.TanhGaussianPolicy, fs.PrimitivePolicy)
    choice, _ = task_policy(torch.zeros(1, payload["obs_dim"]), deterministic=True)
    if primitives == "opal":  # the primitive policy was fine-tuned on the demonstrations: 20 steps, it moved
        vae = torch.load(vae_checkpoints[family], weights_only=True)
        assert {int(state["step"]) for state in payload["finetune_optimizer"]["state"].values()} == {20}
        assert payload["finetune_optimizer"]["param_groups"][0]["lr"] == payload["args"]["finetune_lr"]
        assert any(not torch.equal(vae["primitive_policy"][k], payload["primitive_policy"][k])
                   for k in vae["primitive_policy"])
        assert primitive_policy(torch.zeros(1, payload["obs_dim"]), choice)[0].shape == (1, payload["act_dim"])
        assert len(scalars(path.parent, "losses/finetune_nll")) == 2
    else:
        assert primitive_policy is None and choice.shape == (1, payload["act_dim"])


def test_fewshot_refusals(sandbox, datasets, vae_checkpoints, tmp_path):
    pointmaze = ["--dataset-id", datasets["pointmaze"], "--demo-dataset-id", datasets["pointmaze-expert"]]
    assert_refused(run_fewshot(sandbox, *pointmaze, "--primitives", "none", "--num-demos", 5),
                   "--num-demos 5 asks for more demonstrations than the dataset holds (2)")
    assert_refused(run_fewshot(sandbox, *pointmaze), "--primitives opal needs --vae-ckpt")
    # a VAE of another dataset; demonstrations whose states are not the VAE's
    assert_refused(run_fewshot(sandbox, *pointmaze, "--vae-ckpt", vae_checkpoints["antmaze"], "--num-demos", 2),
                   "does not fit this run: its dataset_id is 'test/antmaze-large-made-v0'")
    assert_refused(run_fewshot(sandbox, "--dataset-id", datasets["pointmaze"], "--demo-dataset-id", datasets["antmaze"],
                               "--vae-ckpt", vae_checkpoints["pointmaze"], "--num-demos", 2),
                   "does not fit this run: its obs_layout is ['observation']")
    payload = torch.load(vae_checkpoints["pointmaze"], weights_only=True)
    payload.update(phase="vae", step=845, finished=False)
    stopped = tmp_path / "stopped" / "opal_vae.pt"
    stopped.parent.mkdir()
    torch.save(payload, stopped)
    assert_refused(run_fewshot(sandbox, *pointmaze, "--vae-ckpt", stopped, "--num-demos", 2),
                   "did not finish: it stopped in its vae phase at step 845", "--allow-unfinished")
    assert_refused(run_fewshot(sandbox, "--env", "antmaze-large-diverse", "--primitives", "none"),
                   "no default demonstration dataset for antmaze-large-diverse", "--demos-from-policy")
    with pytest.raises(SystemExit, match="--num-demos must be at least 1, got 0"):
        fs.Args(primitives="none", num_demos=0)


def test_demonstrations_from_a_policy(sandbox, tmp_path):
    """--demos-from-policy: a policy checkpoint that pushes east reaches the goal cell east of the reset cell; its
    successful episodes become the demonstration dataset, each ending at the goal, and BC then imitates them."""
    corridor_dataset("test/corridor-random-v0")
    east = fs.TanhGaussianPolicy(4, 2, -torch.ones(2), torch.ones(2), 8, 1)
    constant_output(east, [1.5, 0.0, -5.0, -5.0])  # action (tanh 1.5, 0) ≈ (0.905, 0)
    policy_path = tmp_path / "opal_cql.pt"
    save_checkpoint(policy_path, {
        "script": "opal_cql", "dataset_id": "test/corridor-random-v0", "obs_layout": ["observation"], "obs_dim": 4,
        "act_dim": 2, "primitives": "none", "c": 1, "choice_dim": 2, "choice_low": [-1.0, -1.0],
        "choice_high": [1.0, 1.0], "policy_hidden_dim": 8, "policy_layers": 1, "task_policy": east.state_dict(),
        "finished": True})
    result = run_fewshot(sandbox, "--dataset-id", "test/corridor-random-v0", "--primitives", "none",
                         "--demo-dataset-id", "test/corridor-demos-v0", "--demos-from-policy", policy_path,
                         "--num-demos", 3, "--demo-attempts", 5)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "wrote test/corridor-demos-v0: 3 demonstrations" in result.stdout
    demos = minari.load_dataset("test/corridor-demos-v0")
    assert demos.total_episodes == 3
    for episode in demos.iterate_episodes():
        goal = episode.observations["desired_goal"][-1]
        assert np.linalg.norm(episode.observations["achieved_goal"][-1] - goal) <= 0.45  # ends at the goal ...
        assert all(np.linalg.norm(episode.observations["achieved_goal"][:-1] - goal, axis=1) > 0.45)  # ... first there
        assert episode.terminations[-1] and not episode.terminations[:-1].any()
        assert np.allclose(episode.actions, [math.tanh(1.5), 0.0], atol=1e-6)
    # a policy that never succeeds is refused with a reason, and no dataset is written
    constant_output(east, [-1.5, 0.0, -5.0, -5.0])  # west, into the wall
    payload = torch.load(policy_path, weights_only=True)
    payload["task_policy"] = east.state_dict()
    torch.save(payload, policy_path)
    result = run_fewshot(sandbox, "--dataset-id", "test/corridor-random-v0", "--primitives", "none",
                         "--demo-dataset-id", "test/corridor-west-v0", "--demos-from-policy", policy_path,
                         "--demo-attempts", 2)
    assert_refused(result, "succeeded in none of 2 episodes")
    assert "test/corridor-west-v0" not in minari.list_local_datasets()

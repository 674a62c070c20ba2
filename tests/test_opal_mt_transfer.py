"""opal_mt_transfer.py: GAE over high-level steps and PPO's losses by hand, the running statistics, choices held for
c steps in evaluation, and tiny MT10 runs in both modes on a VAE trained on Meta-World data (c = 5)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import opal_mt_transfer as mt
from conftest import assert_refused, run_script

TINY = ["--episode-length", 20, "--total-steps", 400, "--eval-every", 200, "--eval-episodes", 1,
        "--eval-episodes-during", 1, "--hidden-dim", 16, "--num-minibatches", 4, "--update-epochs", 2]


def test_generalized_advantages_by_hand():
    # one environment, three high-level steps, the episode ends after the second; γ_hl = 0.5, λ = 0.8
    rewards, values = torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([[0.5], [1.0], [2.0]])
    dones, last = torch.tensor([[0.0], [1.0], [0.0]]), torch.tensor([4.0])
    advantages, targets = mt.generalized_advantages(rewards, values, dones, torch.tensor(0.5), last, 0.8)
    # step 3 bootstraps V(s_T) = 4: δ = 3 + 0.5·4 - 2 = 3, A = 3
    # step 2 ends its episode: δ = 2 - 1 = 1, A = 1 (nothing of step 3 flows back)
    # step 1: δ = 1 + 0.5·1 - 0.5 = 1, A = 1 + 0.5·0.8·1 = 1.4
    torch.testing.assert_close(advantages, torch.tensor([[1.4], [1.0], [3.0]]))
    torch.testing.assert_close(targets, advantages + values)


def test_ppo_losses_by_hand():
    advantages, log_ratio = torch.tensor([1.0, -1.0, 2.0]), torch.log(torch.tensor([1.5, 1.5, 0.5]))
    # ρ = 1.5, A = 1: max(-1.5, -1.2) = -1.2; ρ = 1.5, A = -1: max(1.5, 1.2) = 1.5; ρ = 0.5, A = 2: max(-1, -1.6) = -1
    loss = mt.clipped_surrogate_loss(advantages, log_ratio, 0.2)
    assert loss.item() == pytest.approx((-1.2 + 1.5 - 1.0) / 3)
    values, old, targets = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.9]), torch.tensor([2.0, 5.0])
    # (1 - 2)² = 1 against (0 + 0.2 - 2)² = 3.24; (3 - 5)² = 4 against (2.9 + 0.1 - 5)² = 4: ½ (3.24 + 4) / 2
    # (clipping V itself instead of V - V_old would give (0.2 - 5)² = 23.04 for the second)
    assert mt.clipped_value_loss(values, old, targets, 0.2).item() == pytest.approx(0.5 * (3.24 + 4.0) / 2)


def test_running_normalizer_and_reward_scaler():
    data = torch.randn(300, 3) * torch.tensor([1.0, 5.0, 0.1]) + 2.0
    normalizer = mt.RunningNormalizer(3)
    for chunk in data.split(70):  # batches of unequal sizes give the statistics of the whole
        normalizer.update(chunk)
    torch.testing.assert_close(normalizer.mean, data.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(normalizer.var, data.var(0, unbiased=False), rtol=1e-3, atol=1e-4)
    assert normalizer(torch.full((1, 3), 1e6)).max().item() == 10.0  # clipped
    assert normalizer(torch.full((1, 3), -1e6)).min().item() == -10.0
    x = torch.tensor([[2.5, -1.0, 2.05]])  # (x - mean) / sqrt(var + 1e-8), inside ±10
    torch.testing.assert_close(normalizer(x), (x - normalizer.mean) / (normalizer.var + 1e-8).sqrt())
    torch.testing.assert_close(normalizer(x), (x - data.mean(0)) / data.std(0, unbiased=False), rtol=1e-3, atol=1e-3)
    scaler = mt.RewardScaler(2)
    scaled = scaler(torch.tensor([1.0, 3.0]), torch.tensor(0.5), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(scaler.returns, torch.tensor([1.0, 0.0]))  # the ended episode's return restarts
    std = math.sqrt(scaler.stats.var.item() + 1e-8)
    torch.testing.assert_close(scaled, torch.tensor([1.0, 3.0]) / std)
    scaler(torch.tensor([2.0, 2.0]), torch.tensor(0.5), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(scaler.returns, torch.tensor([0.5 * 1.0 + 2.0, 2.0]))


def test_evaluation_holds_each_choice_for_c_steps():
    """Meta-World's evaluation calls eval_action every step and reset(mask) where episodes end: a new choice comes
    every c steps, or at once where an episode restarted."""
    class CountingActor(torch.nn.Module):  # returns how often it was asked, so every fresh choice is visible
        calls = 0

        def actor_mean(self, states):
            CountingActor.calls += 1
            return torch.full((len(states), 4), float(CountingActor.calls))

    policy = mt.HeldChoicePolicy(CountingActor(), lambda s: s, None, 3,
                                 mt.ChoiceSpace(-100.0 * torch.ones(4), 100 * torch.ones(4)), "cpu")
    policy.reset(np.ones(2, dtype=bool))
    held = []
    for _ in range(4):
        policy.eval_action(np.zeros((2, 49)))
        held.append(policy.choices[:, 0].tolist())
    assert held == [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [2.0, 2.0]]  # the 4th step chose anew, after 3 held
    policy.reset(np.array([False, True]))
    policy.eval_action(np.zeros((2, 49)))
    assert policy.choices[:, 0].tolist() == [2.0, 3.0]  # the restarted environment chose anew, the other held
    assert CountingActor.calls == 3  # the task policy ran at the three decisions only, not at every step
    # without primitives the held choice is the action, clipped to [-1, 1]
    np.testing.assert_allclose(policy.eval_action(np.zeros((2, 49))), np.ones((2, 4)))


def test_choices_relative_to_the_prior():
    """--choice-space prior: z = μ_ρ(s) + σ_ρ(s) u from the 39-d state alone (the task id is not the prior's),
    clipped into the box; box: z = u, clipped."""
    class Prior(torch.nn.Module):
        def forward(self, states):
            assert states.shape[1] == mt.STATE_DIM
            return states[:, :2] * 0 + torch.tensor([1.0, -1.0]), torch.log(torch.tensor([[2.0, 0.5]]))

    states, u = torch.zeros(2, mt.STATE_DIM + 10), torch.tensor([[0.5, 2.0], [3.0, -1.0]])
    relative = mt.ChoiceSpace(torch.tensor([-5.0, -5.0]), torch.tensor([3.0, 5.0]), Prior())
    # (1 + 2·0.5, -1 + 0.5·2) = (2, 0); (1 + 2·3, -1 + 0.5·-1) = (7 → 3 clipped, -1.5)
    torch.testing.assert_close(relative(states, u), torch.tensor([[2.0, 0.0], [3.0, -1.5]]))
    box = mt.ChoiceSpace(torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(box(states, u), torch.tensor([[0.5, 1.0], [1.0, -1.0]]))


@pytest.fixture(scope="module")
def metaworld_vae(sandbox, tmp_path_factory):
    """A tiny opal_vae.pt at c = 5 on three Meta-World pick-place episodes."""
    made = run_script(sandbox, "collect_data.py", "--env", "metaworld-pick-place", "--episodes", 3,
                      "--dataset-id", "test/metaworld-pick-place-v0")
    assert made.returncode == 0, made.stderr[-2000:]
    vae = run_script(sandbox, "opal_vae.py", "--dataset-id", "test/metaworld-pick-place-v0", "--c", 5,
                     "--num-steps", 20, "--bc-steps", 5, "--hidden-dim", 32, "--gru-layers", 1, "--batch-size", 16,
                     "--runs-dir", tmp_path_factory.mktemp("mt-vae"))
    assert vae.returncode == 0, vae.stderr[-2000:]
    return Path([line for line in vae.stdout.splitlines() if line.startswith("checkpoint: ")][-1].split(": ", 1)[1])


@pytest.mark.parametrize("mode", ["opal", "none"])
def test_end_to_end_on_mt10(sandbox, metaworld_vae, mode):
    vae = ["--vae-ckpt", metaworld_vae, "--capture-video"] if mode == "opal" else ["--primitives", "none"]
    result = run_script(sandbox, "opal_mt_transfer.py", *TINY, *vae, "--runs-dir", sandbox["base"] / f"mt-{mode}")
    assert result.returncode == 0, result.stderr[-3000:]
    c = 5 if mode == "opal" else 1
    if mode == "opal":  # --capture-video: one evaluation episode of pick-place-v3, filmed
        video = next((sandbox["base"] / "mt-opal").glob("*/eval.mp4"))
        assert video.stat().st_size > 1000 and video.read_bytes()[4:8] == b"ftyp"
    assert f"MT10: 10 tasks, state 49-d with the task id, c = {c}; 400 environment steps = 2 PPO iterations of " \
           f"{200 // c} high-level steps" in result.stdout
    assert "step 200: success rate" in result.stdout and "pick-place-v3" in result.stdout
    saved = torch.load(next((sandbox["base"] / f"mt-{mode}").glob("*/opal_mt_transfer.pt")), weights_only=True)
    assert saved["finished"] and saved["step"] == 400 and saved["c"] == c and len(saved["tasks"]) == 10
    assert saved["choice_dim"] == (8 if mode == "opal" else 4)
    # the updates ran: 2 iterations × 2 epochs × the 4 minibatches of an iteration's 10 × 20 / c high-level steps
    assert saved["optimizer"]["state"][0]["step"].item() == 2 * 2 * 4
    # the learning rate annealed linearly: the second and last of I = 2 iterations ran at lr / 2 (CleanRL's schedule)
    assert saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(saved["args"]["learning_rate"] / 2)
    assert saved["summary"]["approx_kl"] > 0 and saved["obs_normalizer"]["count"].item() > 2 * 200 / c
    if mode == "opal":  # the primitive policy and the prior come with it, and the latent box is the VAE's data's
        assert saved["primitive_policy"] is not None and saved["dataset_id"] == "test/metaworld-pick-place-v0"
        assert saved["prior"] is not None and saved["args"]["choice_space"] == "prior"
        assert all(low < high for low, high in zip(saved["choice_low"], saved["choice_high"]))


def test_refusals(sandbox, vae_checkpoints, metaworld_vae):
    assert_refused(run_script(sandbox, "opal_mt_transfer.py", "--vae-ckpt", vae_checkpoints["pointmaze"]),
                   "4-d states", "need its 39-d states and 4-d actions")
    assert_refused(run_script(sandbox, "opal_mt_transfer.py", "--vae-ckpt", metaworld_vae, "--episode-length", 12),
                   "--episode-length 12 is not a multiple of the primitives' c = 5")
    assert_refused(run_script(sandbox, "opal_mt_transfer.py"), "--primitives opal needs --vae-ckpt")


@pytest.mark.mt50
@pytest.mark.parametrize("mode", ["opal", "none"])
def test_mt50_runs(sandbox, metaworld_vae, mode):
    """MT50 takes the same path with 50 tasks (89-d states); left out of the default run: python -m pytest -m mt50."""
    vae = ["--vae-ckpt", metaworld_vae] if mode == "opal" else ["--primitives", "none"]
    result = run_script(sandbox, "opal_mt_transfer.py", "--benchmark", "MT50", *TINY, "--total-steps", 1000, *vae,
                        "--runs-dir", sandbox["base"] / f"mt50-{mode}", timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MT50: 50 tasks, state 89-d with the task id" in result.stdout and "over 50 tasks" in result.stdout

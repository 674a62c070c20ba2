"""opal_vae.py: the slicer, loss terms, GRU and checkpoint contract against hand computations; then end-to-end runs as a
user runs it, on tiny datasets made here, offline: training, checkpoint, refusals."""

import json
import math
from pathlib import Path

import minari
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import opal_vae as ov
from opal_utils import load_checkpoint
from conftest import ROOT, run_script

# --- the slicer ---
def test_window_starts_by_hand():
    # episodes of 3, 12 and 10 steps own rows 0-3, 4-16, 17-27 (T + 1 observations each)
    starts = ov.window_starts(torch.tensor([3, 12, 10]), c=10)
    assert starts.tolist() == [4, 5, 6, 17]  # the 3-step episode is skipped, the 10-step one has exactly one


def test_window_starts_with_a_stride_by_hand():
    # episodes of 9 and 7 steps own rows 0-9 and 10-17; c = 3, stride 2: t = 0, 2, 4, 6 (6 + 3 <= 9) and t = 0, 2, 4
    assert ov.window_starts(torch.tensor([9, 7]), c=3, stride=2).tolist() == [0, 2, 4, 6, 10, 12, 14]
    assert ov.window_starts(torch.tensor([9, 7]), c=3, stride=3).tolist() == [0, 3, 6, 10, 13]


def test_window_starts_stride_and_count():
    lengths = torch.tensor([25, 9, 40, 10, 0])
    for c, stride in [(1, 1), (5, 1), (10, 1), (10, 10), (3, 4)]:
        starts = ov.window_starts(lengths, c, stride)
        expected = sum((t - c) // stride + 1 for t in lengths.tolist() if t >= c)
        assert len(starts) == expected


def test_no_window_crosses_an_episode_boundary():
    lengths = torch.randint(0, 30, (200,), generator=torch.Generator().manual_seed(0))
    c = 7
    starts = ov.window_starts(lengths, c)
    offsets = torch.cumsum(lengths + 1, 0) - (lengths + 1)
    episode = torch.searchsorted(offsets, starts, right=True) - 1
    # s_0 .. s_c (the next state included) stay inside the window's own episode
    assert (starts + c <= offsets[episode] + lengths[episode]).all()
    assert (starts >= offsets[episode]).all()
    assert len(set(starts.tolist())) == len(starts)


def test_window_starts_all_too_short():
    assert len(ov.window_starts(torch.tensor([3, 9, 5]), c=10)) == 0


def test_window_rows_by_hand():
    # windows of c = 3 starting at rows 4, 17 and 0: rows s_0 .. s_2 of each (s_3, the next state, is not in it)
    assert ov.window_rows(torch.tensor([4, 17, 0]), 3).tolist() == [[4, 5, 6], [17, 18, 19], [0, 1, 2]]


# --- the loss terms ---
def test_gaussian_log_prob_by_hand():
    x, mean, log_std = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, math.log(2.0)]])
    by_hand = (-0.5 * 0.25 - 0.5 * math.log(2 * math.pi)) + (-0.5 * 1.0 - math.log(2.0) - 0.5 * math.log(2 * math.pi))
    assert ov.gaussian_log_prob(x, mean, log_std).item() == pytest.approx(by_hand, abs=1e-6)


def test_gaussian_kl_by_hand():
    # KL(N(1, 0.5^2) || N(0, 2^2)) = log(2/0.5) + (0.25 + 1)/(2*4) - 1/2
    kl = ov.gaussian_kl(torch.tensor([1.0]), torch.tensor([math.log(0.5)]), torch.tensor([0.0]), torch.tensor([math.log(2.0)]))
    assert kl.item() == pytest.approx(math.log(4.0) + 1.25 / 8 - 0.5, abs=1e-6)
    same = ov.gaussian_kl(torch.ones(3), torch.zeros(3), torch.ones(3), torch.zeros(3))
    assert same.item() == pytest.approx(0.0, abs=1e-7)


class Fixed(torch.nn.Module):
    """A stand-in network that returns fixed Gaussian parameters, so the loss can be computed by hand."""

    def __init__(self, mean, log_std, batch_dims):
        super().__init__()
        self.mean, self.log_std, self.batch_dims = torch.tensor(mean), torch.tensor(log_std), batch_dims

    def forward(self, first_input, *other_inputs):
        batch_shape = first_input.shape[: self.batch_dims]
        return self.mean.expand(*batch_shape, -1), self.log_std.expand(*batch_shape, -1)


def test_beta_vae_loss_by_hand():
    # one window, c = 2, 1-d actions, 1-d latent; q(z|τ) = N(0.5, 1), ρ(z|s0) = N(0, 1), π(a|s,z) = N(0, 1)
    encoder = Fixed([0.5], [0.0], batch_dims=1)  # (B, c, ·) -> (B, latent)
    prior = Fixed([0.0], [0.0], batch_dims=1)  # (B, ·) -> (B, latent)
    primitive_policy = Fixed([0.0], [0.0], batch_dims=2)  # (B, c, ·) -> (B, c, action)
    states, actions = torch.zeros(1, 2, 3), torch.tensor([[[1.0], [2.0]]])
    loss, nll, kl = ov.beta_vae_loss(encoder, prior, primitive_policy, states, actions, beta=0.1, noise=torch.zeros(1, 1))
    nll_by_hand = 0.5 * (1 + 4) + 2 * 0.5 * math.log(2 * math.pi)  # -Σ_t log N(a_t; 0, 1)
    kl_by_hand = 0.5 * 0.5 ** 2  # KL(N(0.5,1) || N(0,1))
    assert nll.item() == pytest.approx(nll_by_hand, abs=1e-5)
    assert kl.item() == pytest.approx(kl_by_hand, abs=1e-6)
    assert loss.item() == pytest.approx(nll_by_hand + 0.1 * kl_by_hand, abs=1e-5)


class Lambda(torch.nn.Module):
    """A stand-in network computing `function` of its inputs, so a loss can be computed by hand."""

    def __init__(self, function):
        super().__init__()
        self.function = function

    def forward(self, *inputs):
        return self.function(*inputs)


def normal_nll(x, mean, std):
    return 0.5 * ((x - mean) / std) ** 2 + math.log(std) + 0.5 * math.log(2 * math.pi)


def normal_kl(mean_q, std_q, mean_p, std_p):
    return math.log(std_p / std_q) + (std_q ** 2 + (mean_q - mean_p) ** 2) / (2 * std_p ** 2) - 0.5


def test_beta_vae_loss_by_hand_two_windows_two_latent_dims():
    """Unequal variances, a 2-d latent, two windows, non-zero noise, and networks whose outputs depend on what they
    read: q(z|τ) on s_0 and the actions, ρ(z|s_0) on the first state, π(a|s,z) on s_t and the sampled z."""
    states = torch.tensor([[[1.0], [3.0]], [[-2.0], [0.5]]])  # (B=2, c=2, 1)
    actions = torch.tensor([[[0.5], [-1.0]], [[2.0], [1.0]]])
    noise = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    log_stds = lambda *values: torch.log(torch.tensor(values))
    # q(z|τ) = N([s_0 + a_1, a_0], diag(0.5, 2)²); ρ(z|s_0) = N([s_0, 0], diag(1, 3)²); π(a|s,z) = N(z_0 + z_1 s, 0.5²)
    encoder = Lambda(lambda s, a: (torch.stack([s[:, 0, 0] + a[:, 1, 0], a[:, 0, 0]], -1), log_stds(0.5, 2.0).expand(len(s), 2)))
    prior = Lambda(lambda s0: (torch.cat([s0, torch.zeros_like(s0)], -1), log_stds(1.0, 3.0).expand(len(s0), 2)))
    policy = Lambda(lambda s, z: (z[..., :1] + z[..., 1:] * s, log_stds(0.5).expand(*s.shape[:2], 1)))
    loss, nll, kl = ov.beta_vae_loss(encoder, prior, policy, states, actions, beta=0.1, noise=noise)

    nll_by_hand, kl_by_hand = [], []
    for b, (s, a) in enumerate(zip(states[:, :, 0].tolist(), actions[:, :, 0].tolist())):
        mean_q, std_q = [s[0] + a[1], a[0]], [0.5, 2.0]
        z = [mean_q[k] + std_q[k] * noise[b, k].item() for k in range(2)]  # reparameterised sample
        nll_by_hand.append(sum(normal_nll(a[t], z[0] + z[1] * s[t], 0.5) for t in range(2)))  # summed over the window
        kl_by_hand.append(sum(normal_kl(mean_q[k], std_q[k], [s[0], 0.0][k], [1.0, 3.0][k]) for k in range(2)))
    assert nll.item() == pytest.approx(sum(nll_by_hand) / 2, rel=1e-5)
    assert kl.item() == pytest.approx(sum(kl_by_hand) / 2, rel=1e-5)
    assert loss.item() == pytest.approx((sum(nll_by_hand) + 0.1 * sum(kl_by_hand)) / 2, rel=1e-5)


def test_gaussian_kl_by_hand_unequal_variances_several_dims():
    mean_q, std_q, mean_p, std_p = [0.0, 2.0, -1.0], [0.5, 2.0, 1.5], [1.0, 0.0, -1.0], [1.0, 3.0, 0.5]
    kl = ov.gaussian_kl(torch.tensor(mean_q), torch.tensor(std_q).log(), torch.tensor(mean_p), torch.tensor(std_p).log())
    assert kl.item() == pytest.approx(sum(map(normal_kl, mean_q, std_q, mean_p, std_p)), rel=1e-5)
    # KL is not symmetric: KL(q || p) != KL(p || q) here
    assert kl.item() != pytest.approx(sum(map(normal_kl, mean_p, std_p, mean_q, std_q)), rel=1e-2)


def test_primitive_bc_loss_by_hand():
    # π(a|s,z) = N(z_0 + z_1 s_t, 0.5²) at every step t of the window; the loss sums over t, averages over windows
    states = torch.tensor([[[1.0], [3.0], [-1.0]], [[0.0], [2.0], [4.0]]])
    actions = torch.tensor([[[0.0], [1.0], [2.0]], [[-1.0], [0.5], [0.0]]])
    latents = torch.tensor([[0.5, -1.0], [1.0, 0.25]])
    policy = Lambda(lambda s, z: (z[..., :1] + z[..., 1:] * s, torch.full_like(s, math.log(0.5))))
    by_hand = [sum(normal_nll(actions[b, t, 0].item(), latents[b, 0].item() + latents[b, 1].item() * states[b, t, 0].item(),
                              0.5) for t in range(3)) for b in range(2)]
    assert ov.primitive_bc_loss(policy, states, actions, latents).item() == pytest.approx(sum(by_hand) / 2, rel=1e-5)


def test_action_mse_by_hand():
    # q's mean z = the window's first action + its last state, π's mean a = z + 2 s_t: the error is that of a_t against
    # a_0 + s_{c-1} + 2 s_t, averaged over windows, steps and action dimensions (2-d states: z and s read apart)
    states = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [-1.0, 2.0]], [[0.0, 1.0], [2.0, -1.0], [4.0, 0.5]]])
    actions = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]], [[-1.0, 0.5], [0.5, 0.5], [0.0, -2.0]]])
    encoder = Lambda(lambda s, a: (a[:, 0] + s[:, -1], None))
    policy = Lambda(lambda s, z: (z + 2 * s, None))
    squared = [(actions[b, t, d] - actions[b, 0, d] - states[b, 2, d] - 2 * states[b, t, d]).item() ** 2
               for b in range(2) for t in range(3) for d in range(2)]
    assert ov.action_mse(encoder, policy, states, actions).item() == pytest.approx(sum(squared) / 12, rel=1e-6)


def test_beta_vae_loss_gradients_reach_every_network():
    torch.manual_seed(0)
    encoder, prior, policy = ov.Encoder(4, 2, 3, 16, 2), ov.Prior(4, 3, 16), ov.PrimitivePolicy(4, 2, 3, 16)
    loss, _, _ = ov.beta_vae_loss(encoder, prior, policy, torch.randn(5, 6, 4), torch.rand(5, 6, 2) * 2 - 1, beta=0.1)
    loss.backward()
    for module in (encoder, prior, policy):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_encoder_is_the_same_with_either_gru():
    """The shared Encoder runs on nn.GRU; opal_vae.py trains it with the written-out GRU: same init, same z."""
    torch.manual_seed(2)
    with_torch_gru = ov.Encoder(4, 2, 3, 16, 2)
    torch.manual_seed(2)
    written_out = ov.Encoder(4, 2, 3, 16, 2, gru=ov.BidirectionalGRU)
    assert all(torch.equal(a, b) for a, b in zip(with_torch_gru.state_dict().values(), written_out.state_dict().values()))
    states, actions = torch.randn(5, 10, 4), torch.randn(5, 10, 2)
    assert torch.allclose(with_torch_gru(states, actions)[0], written_out(states, actions)[0], atol=1e-5)


def test_encoder_reads_the_whole_window():
    torch.manual_seed(0)
    encoder = ov.Encoder(4, 2, 3, 16, 2)
    states, actions = torch.randn(1, 10, 4), torch.randn(1, 10, 2)
    changed_first, changed_last = actions.clone(), actions.clone()
    changed_first[0, 0] += 1
    changed_last[0, -1] += 1
    base = encoder(states, actions)[0]
    assert not torch.allclose(base, encoder(states, changed_first)[0])
    assert not torch.allclose(base, encoder(states, changed_last)[0])


@pytest.mark.parametrize("layers, in_dim, hidden", [(1, 5, 7), (3, 6, 4)])
def test_written_out_gru_equals_nn_gru(layers, in_dim, hidden):
    """Same initialisation for the same seed, same final states and same gradients as torch's own GRU."""
    torch.manual_seed(1)
    reference = torch.nn.GRU(in_dim, hidden, layers, bidirectional=True, batch_first=True)
    torch.manual_seed(1)
    gru = ov.BidirectionalGRU(in_dim, hidden, layers)
    assert list(gru.state_dict()) == list(reference.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(gru.state_dict().values(), reference.state_dict().values()))
    reference.double(), gru.double()
    inputs = torch.randn(9, 6, in_dim, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 9, hidden, dtype=torch.float64)  # weighs every output differently

    final_reference = reference(inputs)[1][-2:]  # last layer: forward after x_5, backward after x_0
    grads_reference = torch.autograd.grad((final_reference * weights).sum(), [inputs, *reference.parameters()])
    final = gru(inputs)[1]
    grads = torch.autograd.grad((final * weights).sum(), [inputs, *gru.parameters()])
    assert torch.allclose(final, final_reference, atol=1e-12)
    for grad, grad_reference in zip(grads, grads_reference):
        assert torch.allclose(grad, grad_reference, atol=1e-12)


# --- end to end ---
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


@pytest.mark.parametrize("family", ["pointmaze", "antmaze", "kitchen"])
def test_opal_vae_trains_and_writes_a_checkpoint(sandbox, datasets, family):
    result = run_vae(sandbox, "--dataset-id", datasets[family], "--num-steps", 40, "--bc-steps", 10, "--seed", 3)
    run_dir = run_dir_of(result)
    assert "40 gradient steps at batch 32" in result.stdout
    losses = scalars(run_dir, "losses/vae_loss")
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
    assert len(scalars(run_dir, "losses/bc_nll")) == 2 and scalars(run_dir, "charts/SPS")[-1] > 0

    payload = torch.load(run_dir / "opal_vae.pt", map_location="cpu", weights_only=True)
    obs_dim = {"pointmaze": 4, "antmaze": 29, "kitchen": 59}[family]
    act_dim = {"pointmaze": 2, "antmaze": 8, "kitchen": 9}[family]
    assert payload["obs_dim"] == obs_dim and payload["act_dim"] == act_dim
    assert payload["dataset_id"] == datasets[family] and payload["c"] == 10 and payload["latent_dim"] == 8
    assert payload["obs_layout"] == (["achieved_goal", "observation"] if family == "antmaze" else ["observation"])
    assert payload["summary"]["vae_steps"] == 40 and payload["summary"]["bc_steps"] == 10
    assert payload["seed"] == 3 and set(payload["versions"]) >= {"torch", "gymnasium", "minari", "mujoco"}
    # every gradient step was taken: Adam counts them for each parameter
    assert {int(state["step"]) for state in payload["optimizer"]["state"].values()} == {40}
    assert {int(state["step"]) for state in payload["bc_optimizer"]["state"].values()} == {10}
    # at the learning rate asked for: the β-VAE's optimiser over all three networks, BC's over the primitive policy
    encoder_size, prior_size, policy_size = (len([k for k in payload[name] if "normalize" not in k])
                                             for name in ("encoder", "prior", "primitive_policy"))
    assert payload["optimizer"]["param_groups"][0]["lr"] == payload["args"]["learning_rate"]
    assert len(payload["optimizer"]["state"]) == encoder_size + prior_size + policy_size
    assert payload["bc_optimizer"]["param_groups"][0]["lr"] == payload["args"]["learning_rate"]
    assert len(payload["bc_optimizer"]["state"]) == policy_size
    encoder = ov.Encoder(obs_dim, act_dim, 8, 32, 2)
    encoder.load_state_dict(payload["encoder"])
    policy = ov.PrimitivePolicy(obs_dim, act_dim, 8, 32)
    policy.load_state_dict(payload["primitive_policy"])
    assert json.loads((run_dir / "config.json").read_text())["num_steps"] == 40
    if family != "kitchen":  # the maze families get the picture and the closed-loop check
        # the paths are in the picture, not only the walls (a tiny ant hardly moves: a few pixels beside its start)
        assert drawn_pixels(run_dir / "primitives.png") > (200 if family == "pointmaze" else 0)
        assert payload["summary"]["rollout_xy_error"] >= 0


def drawn_pixels(png) -> int:
    """Pixels of a picture of the primitives in the first path colour (tab10 blue; one latent per start state)."""
    import matplotlib.image

    rgb = matplotlib.image.imread(png)[..., :3]
    return int((np.abs(rgb - np.array([0.122, 0.467, 0.706])).max(-1) < 0.08).sum())


def test_same_seed_same_losses(sandbox, datasets):
    first = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0)
    second = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0)
    other = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0, "--seed", 2)
    first_losses = scalars(run_dir_of(first), "losses/vae_loss")
    assert first_losses == scalars(run_dir_of(second), "losses/vae_loss")
    assert first_losses != scalars(run_dir_of(other), "losses/vae_loss")


def test_missing_pointmaze_dataset_is_generated(sandbox, tmp_path, monkeypatch):
    env = {**sandbox["env"], "MINARI_DATASETS_PATH": str(tmp_path / "empty-store")}
    local = {**sandbox, "env": env}
    # the umaze alias is not in this store yet: the script makes it (1M steps take ~1 minute), then trains
    result = run_vae(local, "--env", "pointmaze-umaze", "--num-steps", 5, "--bc-steps", 0, "--picture-latents", 1)
    assert "is not in the local Minari store: generating it" in result.stdout
    assert result.returncode == 0, result.stderr[-2000:]
    monkeypatch.setenv("MINARI_DATASETS_PATH", env["MINARI_DATASETS_PATH"])  # the dataset now exists in that store
    assert minari.load_dataset("opal/pointmaze-umaze-diverse-v0").total_steps == 1_000_000


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
def test_bad_numbers(flag, value):
    with pytest.raises(SystemExit, match=f"{flag} must be"):
        ov.Args(**{flag[2:].replace("-", "_"): value})


def test_a_bad_number_on_the_command_line(sandbox):
    assert_clean_failure(run_vae(sandbox, "--c", 0, expect_success=False), "--c must be")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(sandbox, datasets):
    result = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 200, "--learning-rate", 1e6,
                     "--save-every", 1, "--log-every", 1, expect_success=False)
    assert_clean_failure(result, "became nan" if "became nan" in result.stderr else "became inf", "stopped")
    run_dir = Path(sorted((sandbox["base"] / "runs").glob("*"), key=lambda p: p.stat().st_mtime)[-1])
    payload = load_checkpoint(run_dir, "opal_vae")
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


@pytest.mark.parametrize("flag", ["--bf16", "--compile"])
def test_speed_flags_train(sandbox, datasets, flag):
    result = run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 20, "--bc-steps", 0, flag)
    losses = scalars(run_dir_of(result), "losses/vae_loss")
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    if flag == "--bf16":  # the probe's choice, printed, is the one the run saved and ran with
        saved = torch.load(run_dir_of(result) / "opal_vae.pt", weights_only=True)
        config = json.loads((run_dir_of(result) / "config.json").read_text())
        assert f"bf16 autocast {'on' if saved['args']['bf16'] else 'off'}: a probe measured" in result.stdout
        assert config["bf16"] == saved["args"]["bf16"]


def test_only_the_known_adroit_notice_is_silenced(sandbox):
    for script in ("opal_vae.py", "opal_cql.py", "opal_fewshot_il.py", "opal_online_sac.py", "opal_mt_transfer.py",
                   "collect_data.py"):
        result = run_script(sandbox, script, "--help")
        assert result.returncode == 0 and "usage:" in result.stdout
        assert "Adroit" not in result.stdout + result.stderr
    # another notice gymnasium-robotics might print for its version still reaches the user
    import subprocess, sys
    code = ("import farama_notifications as f, importlib.metadata as m, runpy, sys; "
            "f.notifications.setdefault('gymnasium_robotics', {})[m.version('gymnasium-robotics')] = 'another notice'; "
            "sys.argv = ['opal_vae.py', '--help']; runpy.run_path('opal_vae.py', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=sandbox["env"], capture_output=True, text=True)
    assert "another notice" in result.stderr and "usage:" in result.stdout


@pytest.mark.learning
def test_vae_learns_primitives_that_reconstruct_the_windows():
    """Learning, not just running: windows whose c actions repeat one of four skills (a direction in 2-d, with a
    little noise). After 300 Adam steps on the β-VAE loss the primitive policy, driven by the encoder's z, reproduces
    the windows' actions far better than untrained, and the KL term is finite and positive."""
    torch.manual_seed(0)
    skills = torch.tensor([[0.6, 0.0], [-0.6, 0.0], [0.0, 0.6], [0.0, -0.6]])
    chosen = torch.randint(4, (1024,))
    states = torch.randn(1024, 4, 3)
    actions = skills[chosen][:, None, :].expand(-1, 4, -1) + 0.02 * torch.randn(1024, 4, 2)
    encoder, prior, policy = ov.Encoder(3, 2, 2, 32, 1), ov.Prior(3, 2, 32), ov.PrimitivePolicy(3, 2, 2, 32)
    optimizer = torch.optim.Adam([*encoder.parameters(), *prior.parameters(), *policy.parameters()], lr=3e-3)

    def action_error():
        with torch.no_grad():
            z = encoder(states, actions)[0]
            return ((policy(states, z[:, None].expand(-1, 4, -1))[0] - actions) ** 2).mean()

    untrained = action_error()
    for _ in range(300):
        batch = torch.randint(1024, (64,))
        loss, _, kl = ov.beta_vae_loss(encoder, prior, policy, states[batch], actions[batch], beta=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert action_error() < 0.01 and action_error() < 0.1 * untrained and 0 < kl.item() < 100


def test_rollout_error_replays_a_window_exactly_with_its_own_actions():
    """The closed-loop check: from a window's first simulator state, c steps of the primitive policy driven by the
    encoder's z must land where the data landed. Stand-ins make z the window's (constant) action and the primitive
    policy act z, so the replay is exact; the prior's z = (1, -1), another action, misses by a measurable amount."""
    import gymnasium as gym

    env = gym.make("PointMaze_Open-v3", continuing_task=False)
    sim, c = env.unwrapped.point_env, 5
    obs, _ = env.reset(seed=1)
    rows = {"observations": [], "achieved_goal": [], "qpos": [], "qvel": [], "actions": []}
    window_actions = np.random.default_rng(0).uniform(-1, 1, (4, 2))
    for t in range(4 * c + 1):
        rows["observations"].append(obs["observation"]), rows["achieved_goal"].append(obs["achieved_goal"])
        rows["qpos"].append(sim.data.qpos.copy()), rows["qvel"].append(sim.data.qvel.copy())
        action = window_actions[min(t // c, 3)]
        rows["actions"].append(action)
        obs, *_ = env.step(action)
    data = {k: torch.as_tensor(np.array(v), dtype=torch.float64 if k.startswith("q") else torch.float32)
            for k, v in rows.items()}
    encoder = Lambda(lambda s, a: (a.mean(1), torch.zeros(len(a), 2)))
    prior = Lambda(lambda s0: (torch.tensor([[1.0, -1.0]]).expand(len(s0), 2), torch.zeros(len(s0), 2)))
    policy = Lambda(lambda s, z: (z, torch.zeros_like(z)))
    starts = torch.tensor([0, c, 2 * c, 3 * c])
    error, prior_error, moved = ov.rollout_error(env, ["observation"], data, starts, encoder, prior, policy, c,
                                                 windows=12, seed=3)
    assert error < 1e-6 and prior_error > 0.05
    chosen = starts[torch.randint(4, (12,), generator=torch.Generator().manual_seed(3))]
    by_hand = np.mean([np.linalg.norm(rows["achieved_goal"][s + c] - rows["achieved_goal"][s]) for s in chosen.tolist()])
    assert moved == pytest.approx(by_hand, rel=1e-5)


def test_either_gru_trains_the_same_and_their_checkpoints_load_into_the_other(sandbox, datasets):
    """--gru cudnn (nn.GRU, the default on CUDA) and --gru written-out (the default on CPUs): the same initialisation
    and math, so the same losses up to float rounding, and each checkpoint's encoder loads into the other GRU and
    gives the same z."""
    runs = {gru: run_vae(sandbox, "--dataset-id", datasets["pointmaze"], "--num-steps", 15, "--bc-steps", 0,
                         "--gru", gru) for gru in ("cudnn", "written-out")}
    losses = {gru: scalars(run_dir_of(result), "losses/vae_loss") for gru, result in runs.items()}
    assert np.allclose(losses["cudnn"], losses["written-out"], rtol=1e-4)
    assert "encoder on nn.GRU;" in runs["cudnn"].stdout and "encoder on the written-out GRU;" in runs["written-out"].stdout
    states, actions = torch.randn(6, 10, 4), torch.randn(6, 10, 2)
    for gru, result in runs.items():
        saved = torch.load(run_dir_of(result) / "opal_vae.pt", map_location="cpu", weights_only=True)["encoder"]
        latents = []
        for other in (torch.nn.GRU, ov.BidirectionalGRU):
            encoder = ov.Encoder(4, 2, 8, 32, 2, gru=other)
            encoder.load_state_dict(saved)
            latents.append(encoder(states, actions)[0])
        assert torch.allclose(*latents, atol=1e-5), gru

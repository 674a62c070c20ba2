"""Unit tests of opal_vae.py's data plumbing, loss terms and checkpoint contract, against hand computations."""

import math
import os

import pytest
import torch

import opal_vae as ov


# --- the slicer ---
def test_window_starts_by_hand():
    # episodes of 3, 12 and 10 steps own rows 0-3, 4-16, 17-27 (T + 1 observations each)
    starts = ov.window_starts(torch.tensor([3, 12, 10]), c=10)
    assert starts.tolist() == [4, 5, 6, 17]  # the 3-step episode is skipped, the 10-step one has exactly one


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


# --- the checkpoint contract ---
def payload():
    return {"script": "opal_vae", "dataset_id": "opal/pointmaze-large-diverse-v0", "obs_dim": 4, "act_dim": 2,
            "c": 10, "latent_dim": 8, "prior": ov.Prior(4, 8, 16).state_dict(), "args": {"seed": 1, "x": None}}


def test_bf16_only_where_it_is_faster(monkeypatch):
    # AVX-512 BF16 without AMX computes bf16 at 0.6x fp32 (measured): off there
    for avx512_bf16, amx, expected in [(False, False, False), (True, False, False), (False, True, True), (True, True, True)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert ov.use_bf16(True, torch.device("cpu")) == expected
        assert not ov.use_bf16(False, torch.device("cpu"))
    assert not ov.use_bf16(True, torch.device("meta"))


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "opal_vae.pt"
    ov.save_checkpoint(path, payload())
    assert os.listdir(tmp_path) == ["opal_vae.pt"]  # no temporary file left behind
    loaded = ov.load_checkpoint(path, "opal_vae")
    assert loaded["format_version"] == ov.CHECKPOINT_FORMAT_VERSION and loaded["versions"]["torch"] == torch.__version__
    saved = payload()
    ov.save_checkpoint(path, saved)
    prior = ov.Prior(4, 8, 16)
    prior.load_state_dict(ov.load_checkpoint(path, "opal_vae")["prior"])  # strict: every key present
    assert torch.equal(prior.net[0].weight, saved["prior"]["net.0.weight"])
    ov.check_checkpoint(loaded, path, obs_dim=4, c=10, dataset_id="opal/pointmaze-large-diverse-v0")
    assert ov.load_checkpoint(tmp_path, "opal_vae")["c"] == 10  # a run directory works too


def test_checkpoint_refuses_a_mismatch(tmp_path):
    path = tmp_path / "opal_vae.pt"
    ov.save_checkpoint(path, payload())
    loaded = ov.load_checkpoint(path, "opal_vae")
    with pytest.raises(SystemExit, match="its c is 10, this run has 5"):
        ov.check_checkpoint(loaded, path, obs_dim=4, c=5)
    with pytest.raises(SystemExit, match="its dataset_id is 'opal/pointmaze-large-diverse-v0'"):
        ov.check_checkpoint(loaded, path, dataset_id="D4RL/antmaze/large-diverse-v1")
    with pytest.raises(SystemExit, match="written by opal_vae.py, but a opal_cql.py checkpoint"):
        ov.load_checkpoint(path, "opal_cql")


def test_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        ov.load_checkpoint(tmp_path / "missing.pt", "opal_vae")
    good = tmp_path / "good.pt"
    ov.save_checkpoint(good, payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match="truncated, corrupted or not a torch file"):
        ov.load_checkpoint(truncated, "opal_vae")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(SystemExit, match="a torch file but not an OPAL checkpoint"):
        ov.load_checkpoint(foreign, "opal_vae")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "opal", "anything": Fixed([0.0], [0.0], 1)}, pickled)
    with pytest.raises(SystemExit, match="holds Python objects besides tensors"):
        ov.load_checkpoint(pickled, "opal_vae")
    newer = tmp_path / "newer.pt"
    ov.save_checkpoint(newer, payload())
    content = torch.load(newer, weights_only=True)
    content["format_version"] = ov.CHECKPOINT_FORMAT_VERSION + 1
    torch.save(content, newer)
    with pytest.raises(SystemExit, match="newer than this script"):
        ov.load_checkpoint(newer, "opal_vae")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "opal_vae.pt"
    ov.save_checkpoint(path, payload())
    before = path.read_bytes()
    with pytest.raises(Exception):
        ov.save_checkpoint(path, {**payload(), "unpicklable": lambda: None})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["opal_vae.pt"]


def test_unknown_alias_lists_the_valid_ones():
    with pytest.raises(SystemExit, match="unknown --env 'antmaze-hard'.*antmaze-large-diverse.*pointmaze-large"):
        ov.resolve_dataset_id("antmaze-hard", None)
    assert ov.resolve_dataset_id("antmaze-hard", "x/y-v0") == "x/y-v0"

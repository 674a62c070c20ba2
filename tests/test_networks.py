"""The shared network blocks against hand computations: Gaussian heads, the normaliser, the MLP, the encoder, prior and
primitive policy (each normalises its states), the tanh-Gaussian task policy against torch.distributions, the critics.
The blocks are word for word the same in every script (tests/test_shared_blocks.py), so opal_cql's copies stand in."""

import math

import pytest
import torch
from torch import distributions as D

import opal_cql as oc


def fitted(module, obs_dim):
    """`module` with its normaliser fitted to states far from zero mean and unit std, so skipping it shows."""
    torch.manual_seed(3)
    module.normalize.fit(torch.randn(100, obs_dim) * torch.tensor([5.0, 0.2, 1.0, 3.0])[:obs_dim] + 4)
    return module


def test_gaussian_head_splits_and_clamps():
    output = torch.tensor([[0.5, -1.5, -7.0, 3.0], [1.0, 2.0, -1.0, 0.25]])
    mean, log_std = oc.gaussian_head(output)
    assert mean.tolist() == [[0.5, -1.5], [1.0, 2.0]]
    assert log_std.tolist() == [[-5.0, 2.0], [-1.0, 0.25]]  # clamped to [-5, 2] (ours), untouched inside
    assert (oc.LOG_STD_MIN, oc.LOG_STD_MAX) == (-5.0, 2.0)


def test_normalizer_by_hand():
    states = torch.tensor([[1.0, 7.0], [3.0, 7.0], [5.0, 7.0]])  # column 1 is constant: its std is floored at 1e-3
    normalizer = oc.Normalizer(2)
    normalizer.fit(states)
    assert normalizer.mean.tolist() == [3.0, 7.0]
    assert normalizer.std.tolist() == pytest.approx([2.0, 1e-3])  # sample std of 1, 3, 5
    assert normalizer(torch.tensor([[4.0, 7.002]]))[0].tolist() == pytest.approx([0.5, 2.0], rel=1e-3)


def test_mlp_is_linear_relu_linear_relu_linear():
    net = oc.mlp(3, 5, 2, hidden_layers=2)
    assert [type(layer).__name__ for layer in net] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [tuple(layer.weight.shape) for layer in net[::2]] == [(5, 3), (5, 5), (2, 5)]
    x = torch.randn(4, 3)
    by_hand = net[4](torch.clamp_min(net[2](torch.clamp_min(net[0](x), 0)), 0))
    assert torch.allclose(net(x), by_hand)


def test_encoder_by_hand():
    """z's Gaussian from the last GRU layer's final forward state (after s_{c-1}) and final backward state (after s_0),
    read over embeddings of (normalised s_t, a_t)."""
    encoder = fitted(oc.Encoder(4, 2, 3, hidden_dim=6, gru_layers=2), 4)
    states, actions = torch.randn(5, 7, 4) * 3 + 4, torch.rand(5, 7, 2) * 2 - 1
    normalized = (states - encoder.normalize.mean) / encoder.normalize.std
    embedded = torch.relu(torch.cat([normalized, actions], -1) @ encoder.embed[0].weight.T + encoder.embed[0].bias)
    outputs, _ = encoder.gru(embedded)  # (B, c, 2 H): [forward | backward] of the last layer at every step
    last_forward, first_backward = outputs[:, -1, :6], outputs[:, 0, 6:]
    mean, log_std = oc.gaussian_head(encoder.head(torch.cat([last_forward, first_backward], -1)))
    got_mean, got_log_std = encoder(states, actions)
    assert torch.allclose(got_mean, mean, atol=1e-6) and torch.allclose(got_log_std, log_std, atol=1e-6)


def test_encode_windows_gives_the_posterior_mean_of_each_window():
    class WindowReader(torch.nn.Module):  # mean: the window's first and last state values; log-std: something else
        def forward(self, states, actions):
            return torch.stack([states[:, 0, 0], states[:, -1, 0]], -1), torch.full((len(states), 2), -9.0)

    observations = torch.arange(20, dtype=torch.float32)[:, None] * 10  # row r holds 10 r
    latents = oc.encode_windows(WindowReader(), observations, torch.zeros(20, 1), torch.tensor([0, 3, 11]), c=4)
    assert latents.tolist() == [[0.0, 30.0], [30.0, 60.0], [110.0, 140.0]]


def test_prior_and_primitive_policy_normalise_their_states():
    prior = fitted(oc.Prior(4, 3, 8), 4)
    policy = fitted(oc.PrimitivePolicy(4, 2, 3, 8), 4)
    states, latents = torch.randn(6, 4) * 3 + 4, torch.randn(6, 3)
    normalized = (states - prior.normalize.mean) / prior.normalize.std
    assert all(torch.equal(a, b) for a, b in zip(prior(states), oc.gaussian_head(prior.net(normalized))))
    by_hand = oc.gaussian_head(policy.net(torch.cat([normalized, latents], -1)))  # [normalised s, z]
    assert all(torch.allclose(a, b) for a, b in zip(policy(states, latents), by_hand))


def tanh_gaussian(policy, states):
    """The same distribution written with torch.distributions: N(mean, std) -> tanh -> center + half_range x."""
    mean, log_std = oc.gaussian_head(policy.net(policy.normalize(states)))
    transforms = [D.TanhTransform(), D.AffineTransform(policy.center, policy.half_range)]
    return D.TransformedDistribution(D.Independent(D.Normal(mean, log_std.exp()), 1), transforms), mean


def test_tanh_gaussian_policy_against_torch_distributions():
    low, high = torch.tensor([-3.0, 0.5]), torch.tensor([1.0, 0.75])  # centre (-1, 0.625), half ranges (2, 0.125)
    policy = fitted(oc.TanhGaussianPolicy(4, 2, low, high, hidden_dim=16, layers=2), 4)
    with torch.no_grad():  # log-stds around -1: samples stay away from the box's edges
        policy.net[-1].bias[2:] = -1.0
        policy.net[-1].weight[2:] *= 0.1
    states = torch.randn(64, 4) * 3 + 4
    distribution, mean = tanh_gaussian(policy, states)
    torch.manual_seed(5)
    actions, log_prob = policy(states)
    assert ((actions > low) & (actions < high)).all()
    assert torch.allclose(log_prob, distribution.log_prob(actions), atol=2e-3)
    given = distribution.sample()
    assert torch.allclose(policy.log_prob(states, given), distribution.log_prob(given), atol=2e-3)
    deterministic, _ = policy(states, deterministic=True)  # the squashed mean, no noise
    assert torch.allclose(deterministic, policy.center + policy.half_range * torch.tanh(mean), atol=1e-6)


def test_twin_critics_start_different_and_compute_each_network():
    critics = fitted(oc.Critics(4, 2, hidden_dim=8, layers=3, ensemble=2), 4)
    linears = [layer for layer in critics.net if isinstance(layer, oc.VectorizedLinear)]
    assert [tuple(layer.weight.shape[1:]) for layer in linears] == [(6, 8), (8, 8), (8, 8), (8, 1)]
    for layer in linears:  # independent initialisations, as two nn.Linear would have
        assert not torch.allclose(layer.weight[0], layer.weight[1]) and not torch.allclose(layer.bias[0], layer.bias[1])
    states, actions = torch.randn(5, 4) * 3 + 4, torch.randn(5, 2)
    x = torch.cat([(states - critics.normalize.mean) / critics.normalize.std, actions], -1)
    for member in range(2):
        h = x
        for index, layer in enumerate(linears):
            h = h @ layer.weight[member] + layer.bias[member, 0]
            h = torch.relu(h) if index < len(linears) - 1 else h
        assert torch.allclose(critics(states, actions)[member], h.squeeze(-1), atol=1e-5)


def test_gaussian_log_prob_against_torch_distributions():
    x, mean, log_std = torch.randn(7, 3), torch.randn(7, 3), torch.randn(7, 3)
    expected = D.Normal(mean, log_std.exp()).log_prob(x).sum(-1)
    assert torch.allclose(oc.gaussian_log_prob(x, mean, log_std), expected, atol=1e-5)
    assert math.isclose(oc.gaussian_log_prob(torch.zeros(1), torch.zeros(1), torch.zeros(1)).item(),
                        -0.5 * math.log(2 * math.pi), rel_tol=1e-6)

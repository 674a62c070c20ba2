"""OPAL, step 1: learn a latent space of temporally extended primitives from undirected offline data.

A β-VAE reads length-c sub-trajectories τ = (s_0, a_0, ..., s_{c-1}, a_{c-1}) of the dataset. Its encoder q_φ(z|τ)
compresses τ into a latent z, its decoder, the primitive policy π_θ(a|s,z), must reproduce every action of τ from z,
and a prior ρ_ω(z|s_0) must predict z from the first state alone (Ajay et al., ICLR 2021, Eq. (1)-(2)):
    max  E_τ E_{z~q(z|τ)} [ Σ_{t<c} log π_θ(a_t|s_t,z) ]  -  β · KL( q_φ(z|τ) || ρ_ω(z|s_0) )
Then, as the paper does before using the primitives, the encoder's posterior mean relabels each window and the
primitive policy is fine-tuned by behaviour cloning on (s_t, a_t, z).

Run:    python opal_vae.py                                   # pointmaze-large, made offline if missing
        python opal_vae.py --env antmaze-large-diverse       # D4RL data through Minari (needs internet once)
Reads:  a Minari dataset (--env alias or --dataset-id)
Writes: runs/opal_vae__<env>__<seed>__<time>/  opal_vae.pt (the checkpoint every other OPAL script loads),
        primitives.png, TensorBoard events, config.json

Reading order: `Args`; then ALGORITHM: the slicer, the networks q_φ, ρ_ω, π_θ, the two losses and the relabeller;
then `__main__` at the bottom (setup → β-VAE → relabel and BC fine-tuning → evaluation). Bookkeeping (datasets,
checkpoints, logging) is in opal_utils.py; a short section before `__main__` draws the primitives and checks them.
"""

import math
from dataclasses import asdict, dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from opal_utils import (
    GraphedUpdate, Loop, dataset_fields, fail, flatten_observation, load_dataset, open_run, print_summary,
    random_state, resolve_dataset_id, resume_progress, start_run, save_checkpoint, setup_torch,
    stop_if_not_finite_module, stop_signals, use_bf16
)


@dataclass
class Args:
    exp_name: str = "opal_vae"
    """name of this experiment, the first part of the run directory's name"""
    seed: int = 1
    """seed of torch, numpy and the batch sampler"""
    env: str = "pointmaze-large"
    """dataset alias: antmaze-medium-diverse, antmaze-large-diverse, kitchen-mixed, kitchen-partial,
    pointmaze-umaze, pointmaze-medium, pointmaze-large, metaworld-pick-place (use --c 5, the paper's c for it);
    pointmaze and Meta-World data are generated offline when missing"""
    dataset_id: Optional[str] = None
    """any Minari dataset id, local or remote; overrides --env"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without an account)"""
    wandb_project_name: str = "opal"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, cuda:1, ..."""
    bf16: bool = False
    """run the forward pass under torch.autocast(bfloat16); honoured only where a probe at start-up measures bf16
    1.25x faster than fp32 or more, on a CPU or a GPU (ours)"""
    compile: bool = False
    """torch.compile the β-VAE loss (compiles for about half a minute first)"""
    gru: Literal["auto", "cudnn", "written-out"] = "auto"
    """the encoder's GRU: cudnn, torch's nn.GRU (cuDNN's kernel on a GPU); written-out, BidirectionalGRU below (its
    gate arithmetic fuses under --compile); auto: nn.GRU on CUDA, written-out elsewhere (ours, measured:
    docs/speed.md). Same parameters: a checkpoint of either loads into the other"""
    cudagraph: bool = True
    """on a CUDA device, record each β-VAE and BC step once as a CUDA graph and replay it (ours, measured:
    docs/speed.md); no effect on a CPU"""
    runs_dir: str = "runs"
    """folder that receives the run directory"""
    save_every: int = 5000
    """write the checkpoint every this many gradient steps (and always at the end or on Ctrl-C)"""
    log_every: int = 100
    """log losses and steps/s every this many gradient steps"""
    resume: Optional[str] = None
    """continue an interrupted run from its opal_vae.pt (or run directory), with the arguments saved in it"""

    # OPAL's β-VAE; defaults are the paper's (Ajay et al. 2021, appendix) unless marked "ours"
    c: int = 10
    """primitive length: steps per sub-trajectory (paper: 10)"""
    latent_dim: int = 8
    """dimension of the latent z (paper: 8)"""
    beta: float = 0.1
    """weight β of KL(q(z|τ) || ρ(z|s0)) (paper: 0.1)"""
    hidden_dim: int = 200
    """width of every hidden layer and of the GRU (paper: 200)"""
    gru_layers: int = 4
    """layers of the encoder's bidirectional GRU (paper: 4)"""
    learning_rate: float = 1e-3
    """Adam learning rate of the β-VAE and of BC fine-tuning (paper: 1e-3)"""
    batch_size: Optional[int] = None
    """sub-trajectories per gradient step; default: the paper's 50 for D4RL aliases, 256 otherwise
    (ours: faster on a CPU)"""
    num_steps: Optional[int] = None
    """β-VAE gradient steps; default: the paper's 100 epochs over all windows for D4RL aliases,
    4,000 at batch 256 otherwise (ours: on pointmaze-large about 20 minutes on 2 idle CPU cores, 3.9 steps/s;
    about 55 at one thread beside another run, as a grid runs it)"""
    bc_steps: Optional[int] = None
    """gradient steps of BC fine-tuning of the primitive policy on (s_t, a_t, z); default num_steps // 10 (ours)"""
    picture_latents: int = 8
    """latents drawn from the prior per start state in primitives.png"""

    def __post_init__(self):
        for name in ("c", "latent_dim", "batch_size", "hidden_dim", "gru_layers", "save_every", "log_every",
                     "num_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.bc_steps is not None and self.bc_steps < 0:
            fail(f"--bc-steps must be at least 0, got {self.bc_steps}.")
        if not (self.learning_rate > 0 and self.beta >= 0):
            fail("--learning-rate must be positive and --beta non-negative.")


# ======================================================================================================================
# ALGORITHM: what to study. The slicer, the three networks (shared word for word with the other scripts; the encoder's
# GRU written out beside it), the two losses and the relabeller.
# ======================================================================================================================
# --- shared: slicer ---
def window_starts(episode_lengths: torch.Tensor, c: int, stride: int = 1) -> torch.Tensor:
    """Flat row of s_0 of every length-c window (s_t, a_t)_{t<c}, with s_c in the same episode.

    Episode e owns rows offset_e .. offset_e + T_e (T_e + 1 observations). Its windows start at
    t = 0, stride, ... while t + c <= T_e, so no window crosses an episode boundary and episodes
    shorter than c contribute none. Pure index arithmetic, no loop over samples.
    """
    lengths = episode_lengths.long()
    offsets = torch.cumsum(lengths + 1, 0) - (lengths + 1)
    per_episode = torch.where(lengths >= c, (lengths - c) // stride + 1, torch.zeros_like(lengths))
    episode = torch.repeat_interleave(torch.arange(len(lengths)), per_episode)
    first_of_episode = torch.cumsum(per_episode, 0) - per_episode
    rank = torch.arange(int(per_episode.sum())) - first_of_episode[episode]
    return offsets[episode] + rank * stride


def window_rows(starts: torch.Tensor, c: int) -> torch.Tensor:
    """Flat rows of the c steps s_0 .. s_{c-1} of the windows starting at `starts`: (N,) -> (N, c)."""
    return starts[:, None] + torch.arange(c, device=starts.device)
# --- end shared ---


# --- shared: networks ---
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0  # clamp of every Gaussian's log-std (ours; keeps likelihoods finite)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, hidden_layers: int = 2) -> nn.Sequential:
    layers, width = [], in_dim
    for _ in range(hidden_layers):
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    return nn.Sequential(*layers, nn.Linear(width, out_dim))


class Normalizer(nn.Module):
    """Standardises states with the dataset's mean and std (ours); stored in every state dict."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, states: torch.Tensor):
        self.mean.copy_(states.mean(0))
        self.std.copy_(states.std(0).clamp_min(1e-3))

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.mean) / self.std


def gaussian_head(output: torch.Tensor):
    """(mean, clamped log-std) from a network's output, in float32 even under bf16 autocast."""
    mean, log_std = output.float().chunk(2, dim=-1)
    return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)


def gaussian_log_prob(x, mean, log_std):
    """log N(x; mean, diag(exp(log_std))^2), summed over the last dimension."""
    return (-0.5 * ((x - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
# --- end shared ---


# --- shared: encoder ---
class Encoder(nn.Module):
    """q_φ(z|τ): an MLP embeds each (s_t, a_t), a bidirectional GRU reads the c embeddings, a Gaussian comes out.
    `gru` builds the GRU: nn.GRU, or anything with its arguments, parameter names and (output, h_n) result."""

    def __init__(self, obs_dim, act_dim, latent_dim, hidden_dim=200, gru_layers=4, gru=nn.GRU):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        self.embed = nn.Sequential(nn.Linear(obs_dim + act_dim, hidden_dim), nn.ReLU())
        self.gru = gru(hidden_dim, hidden_dim, gru_layers, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden_dim, 2 * latent_dim)

    def forward(self, states, actions):  # (B, c, obs_dim), (B, c, act_dim) -> mean, log_std of z: (B, latent_dim)
        _, final_states = self.gru(self.embed(torch.cat([self.normalize(states), actions], -1)))
        # the last layer's forward state after s_{c-1} and its backward state after s_0
        return gaussian_head(self.head(torch.cat([final_states[-2], final_states[-1]], -1)))
# --- end shared ---


class BidirectionalGRU(nn.Module):
    """nn.GRU(bidirectional=True) written out, with its parameter names and initialisation (checkpoints of either
    load into the other). Per layer, the input projections of all c steps and both directions are one matmul; only
    the recurrence is sequential, and its two directions advance together in one batched matmul per step. Eager,
    it is within about 10 % of nn.GRU; under --compile its gate arithmetic fuses, which nn.GRU's kernel cannot."""

    def __init__(self, input_dim, hidden_dim, num_layers, batch_first=True, bidirectional=True):
        super().__init__()
        assert batch_first and bidirectional, "only the layout the Encoder uses"
        self.hidden_dim, self.num_layers = hidden_dim, num_layers
        bound = hidden_dim ** -0.5  # nn.GRU's U(-1/sqrt(H), 1/sqrt(H)), drawn in nn.GRU's parameter order
        for layer in range(num_layers):
            in_dim = input_dim if layer == 0 else 2 * hidden_dim
            for direction in ("", "_reverse"):
                for name, shape in (("weight_ih", (3 * hidden_dim, in_dim)), ("weight_hh", (3 * hidden_dim, hidden_dim)),
                                    ("bias_ih", (3 * hidden_dim,)), ("bias_hh", (3 * hidden_dim,))):
                    parameter = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
                    self.register_parameter(f"{name}_l{layer}{direction}", parameter)

    def forward(self, inputs):  # (B, c, input_dim) -> (None, (2, B, H)): last layer's final forward, backward states
        x = inputs.transpose(0, 1)  # time-major: (c, B, ·)
        for layer in range(self.num_layers):
            both = [getattr(self, f"{name}_l{layer}{direction}") for name in
                    ("weight_ih", "bias_ih", "weight_hh", "bias_hh") for direction in ("", "_reverse")]
            w_ih, b_ih = torch.cat(both[0:2]), torch.cat(both[2:4])
            w_hh, b_hh = torch.stack(both[4:6]).transpose(1, 2), torch.stack(both[6:8]).unsqueeze(1)
            forward_inputs, backward_inputs = F.linear(x, w_ih, b_ih).chunk(2, -1)  # W_i x_t + b_i, every t at once
            inputs_by_step = torch.stack([forward_inputs, backward_inputs.flip(0)], 1)  # backward reads c-1 .. 0
            h = x.new_zeros(2, x.shape[1], self.hidden_dim)
            states = []
            for input_r_z_n in inputs_by_step.unbind(0):  # (2, B, 3H) at one step, both directions
                x_r, x_z, x_n = input_r_z_n.chunk(3, -1)
                h_r, h_z, h_n = torch.baddbmm(b_hh, h, w_hh).chunk(3, -1)  # W_h h_{t-1} + b_h
                reset, update = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                candidate = torch.tanh(x_n + reset * h_n)
                h = candidate + update * (h - candidate)  # (1 - u) n + u h_{t-1}
                states.append(h)
            forward_states, backward_states = torch.stack(states).unbind(1)
            x = torch.cat([forward_states, backward_states.flip(0)], -1)  # (c, B, 2H), in time order
        return None, h  # as nn.GRU returns (outputs, final states); the Encoder reads only the latter


# --- shared: prior ---
class Prior(nn.Module):
    """ρ_ω(z|s_0): which primitives are plausible from the first state."""

    def __init__(self, obs_dim, latent_dim, hidden_dim=200):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        self.net = mlp(obs_dim, hidden_dim, 2 * latent_dim)

    def forward(self, first_states):
        return gaussian_head(self.net(self.normalize(first_states)))
# --- end shared ---


# --- shared: primitive_policy ---
class PrimitivePolicy(nn.Module):
    """π_θ(a|s,z): the decoder; one z drives c consecutive actions."""

    def __init__(self, obs_dim, act_dim, latent_dim, hidden_dim=200):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        self.net = mlp(obs_dim + latent_dim, hidden_dim, 2 * act_dim)

    def forward(self, states, latents):
        return gaussian_head(self.net(torch.cat([self.normalize(states), latents], -1)))
# --- end shared ---


def gaussian_kl(mean_q, log_std_q, mean_p, log_std_p):
    """KL(N_q || N_p) of diagonal Gaussians, summed over the last dimension."""
    var_q, var_p = (2 * log_std_q).exp(), (2 * log_std_p).exp()
    return (log_std_p - log_std_q + (var_q + (mean_q - mean_p) ** 2) / (2 * var_p) - 0.5).sum(-1)


def beta_vae_loss(encoder, prior, primitive_policy, states, actions, beta, noise=None):
    """Eq. (1) of the paper, negated and averaged over a batch of windows; returns (loss, nll, kl).

    states, actions: (B, c, ·). noise: the reparameterisation ε ~ N(0, I) of shape (B, latent_dim).
    """
    mean_q, log_std_q = encoder(states, actions)
    noise = torch.randn_like(mean_q) if noise is None else noise
    latents = mean_q + log_std_q.exp() * noise  # z ~ q(z|τ), reparameterised
    mean_a, log_std_a = primitive_policy(states, latents.unsqueeze(1).expand(-1, states.shape[1], -1))
    reconstruction_nll = -gaussian_log_prob(actions, mean_a, log_std_a).sum(1)  # -Σ_{t<c} log π(a_t|s_t,z)
    kl = gaussian_kl(mean_q, log_std_q, *prior(states[:, 0]))  # KL(q(z|τ) || ρ(z|s_0))
    return (reconstruction_nll + beta * kl).mean(), reconstruction_nll.mean(), kl.mean()


def vae_update(encoder, prior, primitive_policy, optimizer, states, actions, beta: float, bf16: bool,
               loss_function=beta_vae_loss) -> dict:
    """One gradient step of Eq. (1) for the encoder, prior and primitive policy together (one optimiser over the
    three) on a batch of windows (B, c, ·); returns the losses (0-d tensors)."""
    with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss, reconstruction_nll, kl = loss_function(encoder, prior, primitive_policy, states, actions, beta)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"vae_loss": loss, "reconstruction_nll": reconstruction_nll, "kl": kl}


# --- shared: primitive_finetune ---
def primitive_bc_loss(primitive_policy, states, actions, latents):
    """BC fine-tuning of the primitive policy on relabelled windows: -Σ_{t<c} log π_θ(a_t|s_t,z), z = μ_φ(τ) fixed,
    averaged over the batch. states, actions: (B, c, ·); latents: (B, latent_dim)."""
    mean_a, log_std_a = primitive_policy(states, latents.unsqueeze(1).expand(-1, states.shape[1], -1))
    return -gaussian_log_prob(actions, mean_a, log_std_a).sum(1).mean()


def relabelled_batch(data, starts, latents, c: int, batch_size: int, sampler):
    """B relabelled windows drawn uniformly with replacement: their states and actions (B, c, ·) and their z (B, ·),
    z of the window that starts at row starts[i] being latents[i]."""
    chosen = torch.randint(len(starts), (batch_size,), device=starts.device, generator=sampler)
    rows = window_rows(starts[chosen], c)  # (B, c)
    return data["observations"][rows], data["actions"][rows], latents[chosen]


def primitive_finetune_update(primitive_policy, optimizer, states, actions, latents, bf16: bool) -> dict:
    """One gradient step of the primitive policy's BC loss (the encoder and its z stay fixed)."""
    with torch.autocast(states.device.type, dtype=torch.bfloat16, enabled=bf16):
        nll = primitive_bc_loss(primitive_policy, states, actions, latents)
    optimizer.zero_grad(set_to_none=True)
    nll.backward()
    optimizer.step()
    return {"nll": nll}
# --- end shared ---


def action_mse(encoder, primitive_policy, states, actions):
    """How well the primitives reproduce the data: mean over windows, steps and dimensions of (μ_θ(s_t, z) - a_t)²
    with z = μ_φ(τ), the encoder's mean of each window. states, actions: (B, c, ·)."""
    mean_a, _ = primitive_policy(states, encoder(states, actions)[0].unsqueeze(1).expand(-1, states.shape[1], -1))
    return F.mse_loss(mean_a, actions)


# --- shared: relabeller ---
@torch.no_grad()
def encode_windows(encoder, observations, actions, starts, c):
    """z = μ_φ(τ), the posterior mean of the length-c window starting at each row of `starts` (OPAL's relabelling)."""
    return torch.cat([encoder(observations[r], actions[r])[0] for r in window_rows(starts, c).split(4096)])
# --- end shared ---


# ======================================================================================================================
# CHECKS AND THE PICTURE: a first reading may skip to __main__. The primitives replayed in the simulator, closed loop,
# against the data's windows, and drawn as paths in the maze (primitives.png).
# ======================================================================================================================
@torch.no_grad()
def rollout_error(env, layout, data, starts, encoder, prior, primitive_policy, c, windows=64, seed=0):
    """Closed-loop check of the primitives: from a dataset state, run π(a|s,z) with z = the encoder mean of
    the dataset's window for c steps in the real simulator, and measure how far the end point lands from the
    dataset's s_c (xy). The same with z = the prior's mean at s_0 says how much the encoder's z adds.
    Returns (xy error with the encoder's z, with the prior's mean, xy distance the data moved), or None
    when the dataset lacks qpos/qvel infos."""
    sim = getattr(env.unwrapped, "point_env", None) or getattr(env.unwrapped, "ant_env", None)
    if sim is None or "qpos" not in data or "achieved_goal" not in data:
        return None
    generator = torch.Generator().manual_seed(seed)
    chosen = starts[torch.randint(len(starts), (windows,), generator=generator)]
    rows = chosen.cpu()[:, None] + torch.arange(c)
    encoder_z, _ = encoder(data["observations"][rows], data["actions"][rows])
    prior_z, _ = prior(data["observations"][chosen])
    env.reset(seed=seed)
    low, high = env.action_space.low, env.action_space.high
    goal = data["achieved_goal"]
    errors = {"encoder": [], "prior": []}
    for name, latents in (("encoder", encoder_z), ("prior", prior_z)):
        for i, row in enumerate(chosen.tolist()):
            sim.set_state(data["qpos"][row].cpu().numpy(), data["qvel"][row].cpu().numpy())
            state = data["observations"][row]
            for _ in range(c):
                action, _ = primitive_policy(state[None], latents[i : i + 1])
                obs, *_ = env.step(np.clip(action[0].cpu().numpy(), low, high))
                state = torch.as_tensor(flatten_observation(obs, layout), device=latents.device)
            errors[name].append(np.linalg.norm(obs["achieved_goal"] - goal[row + c].cpu().numpy()))
    moved = (goal[chosen + c] - goal[chosen]).norm(dim=-1).mean()
    return float(np.mean(errors["encoder"])), float(np.mean(errors["prior"])), float(moved)


@torch.no_grad()
def draw_primitives(env, layout, prior, primitive_policy, c, path, latents=8, chain=5, starts=6, seed=0):
    """primitives.png: from a few start cells, `latents` coloured xy paths; each path chains `chain` primitives,
    drawing z ~ ρ(z|s) afresh every c steps (dots mark the switches), so one sees where the prior's primitives lead."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maze = env.unwrapped.maze
    free = [(r, col) for r, row in enumerate(maze.maze_map) for col, v in enumerate(row) if v != 1]
    picked = [free[i] for i in np.linspace(0, len(free) - 1, starts).astype(int)]
    device = next(prior.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    low, high = env.action_space.low, env.action_space.high
    size = maze.maze_size_scaling
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(maze.maze_map[0]), 1 + 0.6 * len(maze.maze_map)))
    for r, row in enumerate(maze.maze_map):
        for col, v in enumerate(row):
            if v == 1:
                x, y = maze.cell_rowcol_to_xy(np.array([r, col]))
                ax.add_patch(plt.Rectangle((x - size / 2, y - size / 2), size, size, color="0.35"))
    colours = plt.cm.tab10(np.arange(latents) % 10)
    for cell in picked:
        for k in range(latents):
            obs, _ = env.reset(seed=seed, options={"reset_cell": np.array(cell)})  # same start for every colour
            state = torch.as_tensor(flatten_observation(obs, layout), device=device)[None]
            path_xy = [obs["achieved_goal"]]
            for _ in range(chain):
                mean, log_std = prior(state)
                z = mean + log_std.exp() * torch.randn(mean.shape, generator=generator, device=device)
                for _ in range(c):
                    action, _ = primitive_policy(state, z)
                    obs, *_ = env.step(np.clip(action[0].cpu().numpy(), low, high))
                    state = torch.as_tensor(flatten_observation(obs, layout), device=device)[None]
                    path_xy.append(obs["achieved_goal"])
            path_xy = np.array(path_xy)
            ax.plot(path_xy[:, 0], path_xy[:, 1], color=colours[k], lw=1.2)
            ax.plot(path_xy[c::c, 0], path_xy[c::c, 1], ".", color=colours[k], ms=4)
        ax.plot(*path_xy[0], "ko", ms=5)
    ax.set_aspect("equal")
    ax.set_xticks([]), ax.set_yticks([])
    ax.set_title(f"{latents} rollouts per start state (black); each chains {chain} primitives "
                 f"z ~ ρ(z|s) of {c} steps (dots)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = start_run(args, "opal_vae")  # --resume, or a new run

    # Setup: device, dataset and its windows, the budget's defaults (the paper's for D4RL data, a CPU's otherwise)
    device = setup_torch(args.seed, args.device)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    dataset, layout, data = load_dataset(dataset_id, device)
    starts = window_starts(data["episode_lengths"], args.c).to(device)
    if len(starts) == 0:
        fail(f"every episode of {dataset_id} is shorter than c = {args.c} steps (longest: "
             f"{int(data['episode_lengths'].max())}), so there is no sub-trajectory to learn from; lower --c.")
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    paper_scale = dataset_id.startswith("D4RL/")
    batch_size = args.batch_size or (50 if paper_scale else 256)
    num_steps = args.num_steps or (100 * len(starts) // batch_size if paper_scale else 4000)
    bc_steps = args.bc_steps if args.bc_steps is not None else num_steps // 10
    cudnn_gru = args.gru == "cudnn" or (args.gru == "auto" and device.type == "cuda")
    encoder = Encoder(obs_dim, act_dim, args.latent_dim, args.hidden_dim, args.gru_layers,
                      gru=nn.GRU if cudnn_gru else BidirectionalGRU)
    prior = Prior(obs_dim, args.latent_dim, args.hidden_dim)
    primitive_policy = PrimitivePolicy(obs_dim, act_dim, args.latent_dim, args.hidden_dim)
    for module in (encoder, prior, primitive_policy):
        module.to(device).normalize.fit(data["observations"])
    # bf16 autocast if a probe measures it faster: the β-VAE loss of Eq. (1) on a batch of windows
    probe_rows = window_rows(starts[:batch_size], args.c)
    graphed = args.cudagraph and device.type == "cuda"
    args.bf16 = use_bf16(args.bf16, device, resumed=resumed is not None, graphed=graphed, work=lambda: beta_vae_loss(
        encoder, prior, primitive_policy, data["observations"][probe_rows], data["actions"][probe_rows], args.beta)[0])
    config = {**asdict(args), "dataset_id": dataset_id, "batch_size": batch_size, "num_steps": num_steps,
              "bc_steps": bc_steps, "windows": len(starts), "obs_dim": obs_dim, "act_dim": act_dim}
    run_dir, writer = open_run(args, config, resumed_dir)
    print(f"{dataset_id}: {len(data['episode_lengths'])} episodes, {int(data['episode_lengths'].sum())} steps, "
          f"{len(starts)} windows of c = {args.c}; state {obs_dim}-d ({'+'.join(layout) or 'flat'}), "
          f"action {act_dim}-d")
    print(f"β-VAE: {num_steps} gradient steps at batch {batch_size}, then {bc_steps} BC steps; encoder on "
          f"{'nn.GRU' if cudnn_gru else 'the written-out GRU'}; run dir {run_dir}")

    parameters = [*encoder.parameters(), *prior.parameters(), *primitive_policy.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=args.learning_rate, fused=True)
    bc_optimizer = torch.optim.Adam(primitive_policy.parameters(), lr=args.learning_rate, fused=True)
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    checkpoint_path, summary, phase, first_step = run_dir / "opal_vae.pt", {}, "vae", 1
    if resumed is not None:  # models, optimisers, step counters and random number generators as they were
        for module, key in ((encoder, "encoder"), (prior, "prior"), (primitive_policy, "primitive_policy")):
            module.load_state_dict(resumed[key])
        optimizer.load_state_dict(resumed["optimizer"])
        bc_optimizer.load_state_dict(resumed["bc_optimizer"])
        (summary, first_step), phase = resume_progress(resumed, sampler), resumed["phase"]

    def checkpoint(phase: str, step: int):
        stop_if_not_finite_module(f"{phase} step {step}", checkpoint_path, writer, encoder=encoder, prior=prior,
                                  primitive_policy=primitive_policy)
        save_checkpoint(checkpoint_path, {
            "script": "opal_vae", "args": asdict(args), "seed": args.seed,
            **dataset_fields(dataset_id, dataset, layout, obs_dim, act_dim), "c": args.c, "latent_dim": args.latent_dim,
            "hidden_dim": args.hidden_dim, "gru_layers": args.gru_layers, "encoder": encoder.state_dict(),
            "prior": prior.state_dict(), "primitive_policy": primitive_policy.state_dict(),
            "optimizer": optimizer.state_dict(), "bc_optimizer": bc_optimizer.state_dict(),
            "phase": phase, "step": step, "finished": phase == "done", "summary": dict(summary),
            "rng": random_state(sampler)})

    # Phase 1, Eq. (1): the β-VAE, encoder, prior and primitive policy trained jointly
    vae_loss = torch.compile(beta_vae_loss) if args.compile else beta_vae_loss
    vae_step = GraphedUpdate(  # replayed as one CUDA graph on a GPU
        lambda states, actions: vae_update(encoder, prior, primitive_policy, optimizer, states, actions, args.beta,
                                           args.bf16, vae_loss),
        [encoder, prior, primitive_policy], [], [optimizer], graphed)
    loop = Loop("β-VAE", first=first_step if phase == "vae" else num_steps + 1, last=num_steps, args=args,
                writer=writer, summary=summary, save=lambda step: checkpoint("vae", step),
                checkpoint_path=checkpoint_path, stop_requested=stop_requested, show=("reconstruction_nll", "kl"),
                prefix="vae_", optimizer=optimizer)
    for step in loop:
        rows = window_rows(starts[torch.randint(len(starts), (batch_size,), device=device, generator=sampler)], args.c)
        loop.end_of_step(step, vae_step(data["observations"][rows], data["actions"][rows]))

    # Phase 2 (§4.1): relabel the windows of stride c with z = μ_φ(τ) and fine-tune π_θ(a|s,z) by behaviour cloning
    relabel_starts = window_starts(data["episode_lengths"], args.c, stride=args.c).to(device)
    latents = encode_windows(encoder, data["observations"], data["actions"], relabel_starts, args.c)
    bc_step = GraphedUpdate(  # one CUDA graph on a GPU
        lambda states, actions, latents: {"bc_nll": primitive_finetune_update(
            primitive_policy, bc_optimizer, states, actions, latents, bf16=False)["nll"]},
        [primitive_policy], [], [bc_optimizer], graphed)
    loop = Loop("BC", first=first_step if phase == "bc" else 1, last=bc_steps, args=args, writer=writer,
                summary=summary, save=lambda step: checkpoint("bc", step), checkpoint_path=checkpoint_path,
                stop_requested=stop_requested, show=("bc_nll",), desc="BC fine-tuning", prefix="bc_",
                log_offset=num_steps)
    for step in loop:
        loop.end_of_step(step, bc_step(*relabelled_batch(data, relabel_starts, latents, args.c, batch_size, sampler)))

    # Evaluation: action error on fixed training windows, closed-loop rollouts in the simulator, the picture
    with torch.no_grad():
        fixed = torch.Generator(device=device).manual_seed(12345)  # the same 2048 windows in every run
        rows = window_rows(starts[torch.randint(len(starts), (2048,), device=device, generator=fixed)], args.c)
        summary["action_mse"] = action_mse(encoder, primitive_policy, data["observations"][rows],
                                           data["actions"][rows]).item()
    writer.add_scalar("eval/action_mse", summary["action_mse"], num_steps + bc_steps)
    eval_env = None
    try:
        eval_env = dataset.recover_environment(eval_env=True)
    except Exception as error:
        print(f"no evaluation environment for {dataset_id} ({type(error).__name__}); skipping rollouts and picture")
    if eval_env is not None and hasattr(eval_env.unwrapped, "maze"):
        measured = rollout_error(eval_env, layout, data, starts, encoder, prior, primitive_policy, args.c,
                                 seed=args.seed + 10_000)
        if measured is not None:
            names = ("rollout_xy_error", "rollout_xy_error_prior_mean", "data_xy_displacement")
            for name, value in zip(names, measured):
                summary[name] = value
                writer.add_scalar(f"eval/{name}", value, num_steps + bc_steps)
        draw_primitives(eval_env, layout, prior, primitive_policy, args.c, run_dir / "primitives.png",
                        latents=args.picture_latents, seed=args.seed + 10_000)
        print(f"picture of the primitives: {run_dir / 'primitives.png'}")
    checkpoint("done", bc_steps)
    print_summary(summary, checkpoint_path)
    writer.close()

"""OPAL, step 2: offline RL with primitives. A task policy learns to pick a primitive z every c steps.

OPAL (Ajay et al., ICLR 2021, Section 4.1) relabels the dataset with the encoder of `opal_vae.py`: every length-c
window becomes one high-level transition (s_0, z = μ_φ(τ), Σ_{t<c} γ^t r_t, s_c). An offline value method learns
the task policy π_ψ(z|s) from these transitions; at test time the frozen primitive policy π_θ(a|s,z) turns each z
into c actions. `--primitives none` runs the same method on raw actions (c = 1): the baseline. Two value methods:
conservative Q-learning (CQL; Kumar et al., 2020), the paper's (`--algorithm cql`), and implicit Q-learning (IQL;
Kostrikov et al., 2022), which scores only the data's own choices, the default (ours: on the generated mazes that
no default was tuned on before, CQL+OPAL at its defaults failed two of four; IQL+OPAL with CORL's antmaze network
size reached every goal, docs/maze_family.md). CQL's own defaults are ours by measurement too (docs/opal_cql.md,
details 4, 13 and 14): each high-level transition is backed up with γ once per decision, the task policy
pays λ KL(π_ψ ‖ ρ_ω) toward the VAE's prior, as SPiRL does, and the CQL weight stays fixed on the latent space
(CORL's Lagrange tuning on raw actions); the paper fixes none of them.

A *choice* below is what the task policy outputs and the critics score: the latent z with primitives (held for c
steps), the raw action a without them (c = 1). The same code handles both.

Run:    python opal_cql.py --vae-ckpt runs/<vae run>/opal_vae.pt                 # IQL+OPAL on pointmaze-large
        python opal_cql.py --primitives none                                     # plain IQL
        python opal_cql.py --algorithm cql --vae-ckpt runs/<vae run>/opal_vae.pt # CQL+OPAL, the paper's method
        python opal_cql.py --env antmaze-large-diverse --algorithm cql --vae-ckpt runs/<vae run>/opal_vae.pt
Reads:  a Minari dataset (--env or --dataset-id) and, with primitives, a finished opal_vae.pt
Writes: runs/opal_cql__<env>__<seed>__<time>/  opal_cql.pt (task policy + the primitive policy it drives),
        TensorBoard events, config.json, eval.mp4 with --capture-video

Reading order: `Args`; then ALGORITHM: the relabelling (slicer, encoder, high-level transitions), the task's reward,
the latent action space, the networks, the `CQL` update and the test-time execution; then `__main__` (setup → relabel
→ update loop → evaluation). Bookkeeping (datasets, checkpoints, logging, evaluation episodes): opal_utils.py.
"""

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

from opal_utils import (
    Evaluator, GraphedUpdate, Loop, agent_state_dict, check_checkpoint, dataset_fields, evaluation_env, fail,
    load_agent_state_dict, load_dataset, load_upstream, open_run, print_summary, random_state, resolve_dataset_id,
    resume_progress, start_run, save_checkpoint, setup_torch, stop_if_not_finite_module, stop_signals, use_bf16
)


@dataclass
class Args:
    exp_name: str = "opal_cql"
    """name of this experiment, the first part of the run directory's name"""
    seed: int = 1
    """seed of torch, numpy and the batch sampler (evaluation episodes use seed + 10,000 onward)"""
    env: str = "pointmaze-large"
    """dataset alias: antmaze-medium-diverse, antmaze-large-diverse, kitchen-mixed, kitchen-partial,
    pointmaze-umaze, pointmaze-medium, pointmaze-large"""
    dataset_id: Optional[str] = None
    """any Minari dataset id, local or remote; overrides --env"""
    vae_ckpt: Optional[str] = None
    """opal_vae.pt (or its run directory) trained on the same dataset; required with --primitives opal"""
    allow_unfinished: bool = False
    """accept a --vae-ckpt whose run did not finish (stopped before its last step); refused otherwise"""
    primitives: Literal["opal", "none"] = "opal"
    """opal: the value method (--algorithm) over latent primitives; none: over raw actions (c = 1), the baseline"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without an account)"""
    wandb_project_name: str = "opal"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """write eval.mp4 of one evaluation episode at the end (headless: MUJOCO_GL=egl)"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, ..."""
    bf16: bool = True
    """run the forward passes under torch.autocast(bfloat16), Q values in fp32; honoured only where a probe at
    start-up measures bf16 1.25x faster than fp32 or more, on a CPU or a GPU (ours)"""
    compile: bool = False
    """torch.compile the task policy and the critics (compiles for about a minute first)"""
    cudagraph: bool = True
    """on a CUDA device, record the whole update once as a CUDA graph and replay it at every step (ours: several
    times faster on an H200, docs/speed.md); no effect on a CPU"""
    runs_dir: str = "runs"
    """folder that receives the run directory"""
    save_every: int = 10_000
    """write the checkpoint every this many gradient steps (and at the end or on Ctrl-C)"""
    log_every: int = 250
    """log losses (averaged since the last log) and steps/s every this many gradient steps"""
    eval_every: Optional[int] = None
    """evaluate every this many gradient steps with --eval-episodes-during episodes; default total_steps // 6"""
    eval_episodes: int = 100
    """evaluation episodes at the end (D4RL uses 100)"""
    eval_episodes_during: int = 10
    """evaluation episodes at each intermediate evaluation"""
    num_envs: int = 10
    """parallel evaluation environments (gymnasium.vector.SyncVectorEnv)"""
    resume: Optional[str] = None
    """continue an interrupted run from its opal_cql.pt (or run directory), with the arguments saved in it"""

    # OPAL's high level: how the relabelled transitions are backed up and where the task policy may choose
    high_level_discount: Literal["decision", "window"] = "decision"
    """decision: γ per high-level decision (SPiRL, SUPE; ours by measurement); window: γ^k for a window of k steps
    (the exact SMDP)"""
    latent_bound: Literal["minmax", "std"] = "minmax"
    """the task policy's latent box: min/max of the relabelled latents, or their mean ± --latent-bound-std stds"""
    latent_bound_std: float = 2.0
    """half-width of the std box, in standard deviations of the relabelled latents (ours)"""
    latent_margin: float = 0.0
    """widen the latent box by this fraction of its width on each side (ours)"""
    prior_kl_weight: float = 10.0
    """weight λ of KL(π(z|s) || ρ(z|s)), toward the VAE's prior, in the task policy's loss (SPiRL-style; ours by
    measurement); 0 turns it off"""
    relabel_stride: Optional[int] = None
    """start of one high-level window every this many steps; default c (the paper's partition of trajectories)"""

    # The value method: IQL (in-support values; SUPE runs it on OPAL-style skills), or CQL (the paper's)
    algorithm: Literal["iql", "cql"] = "iql"
    """iql: implicit Q-learning (Kostrikov et al. 2022): expectile values of the data's own choices and
    advantage-weighted extraction, no choice outside the data is ever scored (the default, ours: the only candidate
    that reached the goal on all four tuning mazes, docs/maze_family.md); cql: conservative Q-learning (the paper's)"""
    iql_expectile: float = 0.9
    """IQL: expectile τ of V(s) under Q(s, c) of the data's choices (IQL's antmaze setting: 0.9)"""
    iql_temperature: float = 10.0
    """IQL: inverse temperature β of the policy's weights exp(β (Q - V)) (IQL's antmaze setting: 10)"""
    iql_max_weight: float = 100.0
    """IQL: the weights are clipped at this (IQL and CORL: 100)"""

    # CQL; defaults follow CORL's antmaze configuration unless marked "ours"
    total_steps: Optional[int] = None
    """gradient steps; default 1,000,000 for D4RL aliases (CORL), 30,000 otherwise (ours: pointmaze on a CPU, chosen
    over 15,000 on both mazes and both methods, docs/opal_cql.md detail 6)"""
    batch_size: int = 256
    """transitions per gradient step (CORL)"""
    gamma: float = 0.99
    """per-step discount γ inside a window's reward sum, and of the backup as --high-level-discount says (CORL)"""
    tau: float = 0.005
    """Polyak rate of the target critics (CORL)"""
    policy_lr: float = 1e-4
    """Adam learning rate of the task policy (CORL)"""
    critic_lr: float = 3e-4
    """Adam learning rate of the critics (CORL)"""
    hidden_dim: Optional[int] = None
    """width of the task policy's, critics' and V's hidden layers; default 256 (CORL's antmaze CQL), except CQL on
    data other than D4RL's: 128 (ours, a CPU's budget)"""
    policy_layers: int = 3
    """hidden layers of the task policy (CORL)"""
    critic_layers: Optional[int] = None
    """hidden layers of each critic (and of V); default 5 (CORL's antmaze CQL), except CQL on data other than D4RL's:
    3 (ours, a CPU's budget; IQL needed 5 on a tuning maze, docs/maze_family.md)"""
    critic_layer_norm: bool = False
    """normalise each hidden layer of the critics (ReBRAC, Tarasov et al. 2023; ours as an option)"""
    cql_alpha: float = 5.0
    """weight of the CQL regulariser (CORL antmaze: 5)"""
    lagrange: Optional[bool] = None
    """tune the CQL weight with a Lagrange multiplier towards --target-action-gap; default True on raw actions
    (CORL antmaze), False with primitives (ours: on the latent space the gap stays above the target and α' grows
    without bound; docs/opal_cql.md, detail 13)"""
    target_action_gap: float = 0.8
    """the Lagrange variant's target for E[logsumexp Q] - E_data[Q] (CORL antmaze: 0.8)"""
    cql_n_actions: int = 10
    """choices sampled per state for the CQL regulariser and the max-target backup (CORL)"""
    max_target_backup: bool = True
    """back up the max over sampled next choices of the min over critics (CORL antmaze)"""
    reward_scale: Optional[float] = None
    """r' = reward_scale * r + reward_bias per low-level step; default 10 with CQL (CORL's CQL on antmaze: 10, -5),
    1 with IQL (CORL's and IQL's antmaze: r - 1)"""
    reward_bias: Optional[float] = None
    """see --reward-scale; default -5 with CQL, -1 with IQL"""
    policy_bc_steps: int = 0
    """first gradient steps in which the task policy imitates the dataset's choices instead of maximising Q"""

    def __post_init__(self):
        for name in ("total_steps", "batch_size", "hidden_dim", "policy_layers", "critic_layers", "cql_n_actions",
                     "save_every", "log_every", "eval_every", "eval_episodes", "num_envs", "relabel_stride"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.policy_bc_steps < 0 or self.eval_episodes_during < 0 or self.prior_kl_weight < 0:
            fail("--policy-bc-steps, --eval-episodes-during and --prior-kl-weight cannot be negative.")
        if self.latent_bound_std <= 0:
            fail(f"--latent-bound-std must be positive, got {self.latent_bound_std}.")
        if self.primitives == "opal" and not self.vae_ckpt and not self.resume:
            fail("--primitives opal needs --vae-ckpt runs/<opal_vae run>/opal_vae.pt (train one with opal_vae.py), "
                 "or use --primitives none for the value method on raw actions.")
        if self.lagrange is None:
            self.lagrange = self.primitives == "none"
        if not 0 < self.iql_expectile < 1 or self.iql_temperature < 0 or self.iql_max_weight <= 0:
            fail("--iql-expectile must lie in (0, 1), --iql-temperature be non-negative and --iql-max-weight "
                 "positive.")
        shaping = {"cql": (10.0, -5.0), "iql": (1.0, -1.0)}[self.algorithm]
        self.reward_scale = shaping[0] if self.reward_scale is None else self.reward_scale
        self.reward_bias = shaping[1] if self.reward_bias is None else self.reward_bias
        if self.vae_ckpt:  # saved in opal_cql.pt: resuming from another folder still finds it
            self.vae_ckpt = str(Path(self.vae_ckpt).resolve())

    def fill_budget(self, dataset_id: str):
        """Unset budget flags: CORL's antmaze configuration on D4RL data, else ours (a CPU's; IQL keeps CORL's nets)."""
        paper_scale = dataset_id.startswith("D4RL/")
        wide = paper_scale or self.algorithm == "iql"  # CQL is 3-4x slower a step at 256 x 5 (docs/maze_family.md)
        self.total_steps = self.total_steps or (1_000_000 if paper_scale else 30_000)
        self.hidden_dim = self.hidden_dim or (256 if wide else 128)
        self.critic_layers = self.critic_layers or (5 if wide else 3)
        self.eval_every = self.eval_every or max(1, self.total_steps // 6)


# ======================================================================================================================
# ALGORITHM: what to study. OPAL's relabelling (§4.1: the slicer, the encoder, the high-level transitions), the task's
# reward, the latent action space, the other networks (shared word for word with the other scripts), the CQL update
# and the test-time execution.
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


# --- shared: relabeller ---
@torch.no_grad()
def encode_windows(encoder, observations, actions, starts, c):
    """z = μ_φ(τ), the posterior mean of the length-c window starting at each row of `starts` (OPAL's relabelling)."""
    return torch.cat([encoder(observations[r], actions[r])[0] for r in window_rows(starts, c).split(4096)])
# --- end shared ---


def relabel(starts, c, rewards, dones, gamma):
    """High-level transitions of the windows starting at `starts` (OPAL §4.1).

    rewards[t], dones[t]: reward and termination of the low-level transition s_t -> s_{t+1} (rows as in the flat
    dataset). Returns (discounted reward sums R = Σ_{t<k} γ^t r_t, done flags, next-state rows, k), where k is c, or
    the step after the first termination inside the window: a window that reaches the goal ends there, it is marked
    done and its backup does not bootstrap, so what follows in the data never counts.
    """
    rows = window_rows(starts, c)  # (N, c)
    window_dones = dones[rows] > 0
    alive = torch.cumprod(torch.cat([torch.ones_like(window_dones[:, :1]), ~window_dones[:, :-1]], 1), 1)
    discounts = gamma ** torch.arange(c, dtype=torch.float32, device=starts.device)
    returns = (rewards[rows] * alive * discounts).sum(1)
    done = window_dones.any(1)
    steps = torch.where(done, window_dones.float().argmax(1) + 1, torch.full_like(starts, c))
    return returns, done.float(), starts + steps, steps


SUCCESS_RADIUS = 0.45  # gymnasium-robotics maze v4 success radius


def task_rewards(data, eval_env, scale=1.0, bias=0.0):
    """Per-step reward and termination of the *evaluation* task, as D4RL defines it; the reward comes back shaped,
    r' = scale r + bias (CORL's antmaze shaping: 10 r - 5), the termination unshaped.

    Mazes: 1 when the next achieved_goal is within 0.45 of the evaluation goal cell's centre (Minari's maze
    datasets store rewards for each episode's own random goal, so we relabel); reaching it ends the episode.
    Kitchen and others: the dataset's rewards and terminations.
    """
    maze = getattr(eval_env.unwrapped, "maze", None)
    if maze is None or "achieved_goal" not in data:
        return scale * data["rewards"] + bias, data["terminations"]
    goal = torch.as_tensor(np.asarray(maze.unique_goal_locations[0]), dtype=torch.float32,
                           device=data["rewards"].device)
    reached = (data["achieved_goal"] - goal).norm(dim=-1) <= SUCCESS_RADIUS
    rewards = torch.zeros_like(data["rewards"])
    rewards[:-1] = reached[1:].float()  # r_t refers to s_{t+1}; the last row of each episode is padding
    last_rows = torch.cumsum(data["episode_lengths"] + 1, 0) - 1
    rewards[last_rows.to(rewards.device)] = 0.0
    return scale * rewards + bias, rewards


# --- shared: latent_action_space ---
def backup_discounts(steps, gamma: float, rule: str):
    """Discount of each high-level transition's Bellman backup. decision: γ per decision, as SPiRL, SUPE's OPAL skills
    and a public OPAL re-implementation back up; window: γ^k for a window of k low-level steps, the semi-MDP's exact
    discount, which keeps the horizon at ~1/(1-γ) low-level steps whatever c is."""
    return gamma ** (steps.float() if rule == "window" else torch.ones_like(steps, dtype=torch.float32))


def latent_box(latents, bound: str, stds: float, margin: float):
    """The task policy's latent action space, a box (the paper leaves it open; ours). minmax: the range of the
    relabelled latents, every choice where the encoder saw behaviour, tails included; std: their mean ± `stds`
    standard deviations, the bulk of the data's latents. `margin` widens either by that fraction of its width."""
    if bound == "minmax":
        low, high = latents.min(0).values, latents.max(0).values
    else:
        low, high = latents.mean(0) - stds * latents.std(0), latents.mean(0) + stds * latents.std(0)
    return low - margin * (high - low), high + margin * (high - low)
# --- end shared ---


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


# --- shared: task_policy ---
class TanhGaussianPolicy(nn.Module):
    """SAC's squashed Gaussian, scaled into the box [low, high]."""

    def __init__(self, obs_dim, act_dim, low, high, hidden_dim=256, layers=3):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        self.net = mlp(obs_dim, hidden_dim, 2 * act_dim, layers)
        self.register_buffer("center", (torch.as_tensor(high) + torch.as_tensor(low)).float() / 2)
        self.register_buffer("half_range", (torch.as_tensor(high) - torch.as_tensor(low)).float() / 2)

    def forward(self, states, deterministic=False):
        """Returns (action, log-probability of it)."""
        mean, log_std = gaussian_head(self.net(self.normalize(states)))
        pre_tanh = mean if deterministic else mean + log_std.exp() * torch.randn_like(mean)
        squashed = torch.tanh(pre_tanh)
        log_prob = gaussian_log_prob(pre_tanh, mean, log_std)
        log_prob = log_prob - (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)
        return self.center + self.half_range * squashed, log_prob

    def log_prob(self, states, actions):
        """log π(a|s) of given actions inside the box (for behaviour cloning)."""
        mean, log_std = gaussian_head(self.net(self.normalize(states)))
        squashed = ((actions - self.center) / self.half_range).clamp(-0.999, 0.999)
        pre_tanh = torch.atanh(squashed)
        log_prob = gaussian_log_prob(pre_tanh, mean, log_std)
        return log_prob - (torch.log1p(-squashed.pow(2) + 1e-6) + self.half_range.log()).sum(-1)
# --- end shared ---


# --- shared: critics ---
class VectorizedLinear(nn.Module):
    """`ensemble` independent linear layers applied as one batched matmul: (E, B, in) -> (E, B, out)."""

    def __init__(self, in_dim, out_dim, ensemble):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(ensemble, in_dim, out_dim))
        self.bias = nn.Parameter(torch.empty(ensemble, 1, out_dim))
        with torch.no_grad():  # each member starts like a fresh nn.Linear
            for member in range(ensemble):
                layer = nn.Linear(in_dim, out_dim)
                self.weight[member].copy_(layer.weight.T)
                self.bias[member, 0].copy_(layer.bias)

    def forward(self, x):
        return torch.baddbmm(self.bias, x, self.weight)


class Critics(nn.Module):
    """Twin (or more) Q(s, a) networks evaluated together; returns (ensemble, batch). `layer_norm`: each hidden
    layer's output normalised (no learned scale), as ReBRAC's critics (Tarasov et al., 2023), which bounds how far Q
    extrapolates away from the data."""

    def __init__(self, obs_dim, act_dim, hidden_dim=256, layers=5, ensemble=2, layer_norm=False):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        widths = [obs_dim + act_dim] + [hidden_dim] * layers
        blocks = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [VectorizedLinear(width_in, width_out, ensemble)]
            blocks += [nn.LayerNorm(width_out, elementwise_affine=False)] if layer_norm else []
            blocks += [nn.ReLU()]
        self.net = nn.Sequential(*blocks, VectorizedLinear(hidden_dim, 1, ensemble))
        self.ensemble = ensemble

    def forward(self, states, actions):
        x = torch.cat([self.normalize(states), actions], -1).unsqueeze(0).expand(self.ensemble, -1, -1)
        *hidden, last = self.net
        for layer in hidden:
            x = layer(x)
        with torch.autocast(x.device.type, enabled=False):  # Q in fp32: bf16 holds only even numbers in [256, 512)
            return last(x.float()).squeeze(-1)
# --- end shared ---


def policy_and_critics(obs_dim, choice_low, choice_high, args, all_states) -> tuple:
    """The task policy, the critics and their target copy, input normalisers fitted on the data's states (CQL's and
    IQL's alike); compiled in place with --compile (parameter names, and so checkpoints, stay the eager modules')."""
    task_policy = TanhGaussianPolicy(obs_dim, len(choice_low), choice_low, choice_high, args.hidden_dim,
                                     args.policy_layers).to(all_states.device)
    critics = Critics(obs_dim, len(choice_low), args.hidden_dim, args.critic_layers,
                      layer_norm=args.critic_layer_norm).to(all_states.device)
    for module in (task_policy, critics):
        module.normalize.fit(all_states)
    target_critics = copy.deepcopy(critics).requires_grad_(False)
    if args.compile:
        for module in (task_policy, critics, target_critics):
            module.compile()
    return task_policy, critics, target_critics


class CQL:
    """Conservative Q-learning (Kumar et al., 2020) over choices, as CORL runs it on antmaze: twin critics Q_1, Q_2
    with Polyak-averaged targets Q̄_i, a tanh-Gaussian task policy π with a tuned entropy temperature α (SAC), and the
    CQL(H) regulariser, whose weight α' a Lagrange multiplier tunes (--lagrange; by default only on raw actions: on
    the latent space the weight is fixed). `update` is one gradient step of all of them."""

    def __init__(self, obs_dim, choice_low, choice_high, args, all_states, prior=None):
        device, choice_dim = all_states.device, len(choice_low)
        self.args, self.low, self.high, self.prior = args, choice_low, choice_high, prior
        self.task_policy, self.critics, self.target_critics = policy_and_critics(obs_dim, choice_low, choice_high,
                                                                                 args, all_states)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)  # entropy temperature α
        self.log_alpha_prime = torch.zeros((), device=device, requires_grad=True)  # CQL weight multiplier α'
        self.target_entropy = -float(choice_dim)
        self.log_uniform_density = -(choice_high - choice_low).log().sum()  # log μ of the uniform proposal
        self.optimizers = {
            "policy_optimizer": torch.optim.Adam(self.task_policy.parameters(), lr=args.policy_lr, fused=True),
            "critic_optimizer": torch.optim.Adam(self.critics.parameters(), lr=args.critic_lr, fused=True),
            "alpha_optimizer": torch.optim.Adam([self.log_alpha], lr=args.policy_lr),
            "alpha_prime_optimizer": torch.optim.Adam([self.log_alpha_prime], lr=args.critic_lr)}
        # on a GPU the whole gradient step is recorded once as a CUDA graph and replayed (bookkeeping, below)
        self.graphed_step = GraphedUpdate(
            self.gradient_step, [self.task_policy, self.critics, self.target_critics],
            [self.log_alpha, self.log_alpha_prime], self.optimizers.values(), args.cudagraph and device.type == "cuda")

    def update(self, s, choice, reward, s_next, done, discount, step: int) -> dict:
        """Gradient step number `step` on B transitions (s, c, R, s', done, γ_hl); returns the losses (0-d tensors)."""
        imitate = step <= self.args.policy_bc_steps  # --policy-bc-steps: the first steps imitate the data's choices
        return self.graphed_step(s, choice, reward, s_next, done, discount, imitate)

    def gradient_step(self, s, choice, reward, s_next, done, discount, imitate: bool) -> dict:
        args, n, B, E = self.args, self.args.cql_n_actions, len(s), self.critics.ensemble  # E critics
        s_n, s_next_n = s.repeat_interleave(n, 0), s_next.repeat_interleave(n, 0)  # n copies of each: (B n, obs)
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():  # y = R + γ_hl (1 - done) max_j min_i Q̄_i(s', c'_j),  c'_j ~ π(·|s')
                if args.max_target_backup:
                    next_q = self.target_critics(s_next_n, self.task_policy(s_next_n)[0]).min(0).values
                    next_q = next_q.view(B, n).max(1).values  # (B,)
                else:
                    next_q = self.target_critics(s_next, self.task_policy(s_next)[0]).min(0).values
                target = reward + (1 - done) * discount * next_q
            # CQL(H)'s proposal distributions μ, n samples of each per state: uniform on the box, π(·|s), π(·|s')
            uniform = self.low + (self.high - self.low) * torch.rand(B * n, len(self.low), device=s.device)
            with torch.no_grad():
                from_policy, log_mu_policy = self.task_policy(s_n)
                from_next, log_mu_next = self.task_policy(s_next_n)
            q = self.critics(torch.cat([s, s_n, s_n, s_n]), torch.cat([choice, uniform, from_policy, from_next]))
        q_data, q_uniform, q_policy, q_next = q.split([B, B * n, B * n, B * n], dim=1)  # (E, B), 3 x (E, B n)
        td_loss = 0.5 * ((q_data - target) ** 2).mean(1).sum()  # Σ_i ½ E[(Q_i(s, c) - y)²]
        # CQL(H) with importance sampling (Kumar et al. 2020, App. F):
        # logsumexp_c Q(s, c) ≈ log Σ_j exp(Q(s, c_j) - log μ(c_j)) over the 3n proposals
        log_weights_uniform = (q_uniform - self.log_uniform_density).view(E, B, n)  # (E, B, n), and the two below
        log_weights_policy = (q_policy - log_mu_policy).view(E, B, n)
        log_weights_next = (q_next - log_mu_next).view(E, B, n)
        weighted = torch.cat([log_weights_uniform, log_weights_policy, log_weights_next], -1)  # (E, B, 3n)
        gap = (torch.logsumexp(weighted, -1) - q_data).mean(1)  # (E,): E_s[logsumexp Q] - E_data[Q] per critic
        if args.lagrange:  # α' rises while the gap exceeds the target and falls (to 0) below it
            alpha_prime = self.log_alpha_prime.exp().clamp(0.0, 1e6)
            cql_loss = (alpha_prime.detach() * args.cql_alpha * (gap - args.target_action_gap)).sum()
            self.step("alpha_prime_optimizer",
                      -(alpha_prime * args.cql_alpha * (gap.detach() - args.target_action_gap)).sum())
        else:
            alpha_prime = torch.ones((), device=s.device)
            cql_loss = (args.cql_alpha * gap).sum()
        self.step("critic_optimizer", td_loss + cql_loss)

        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            new_choice, log_prob = self.task_policy(s)  # c̃ ~ π(·|s), reparameterised
            alpha = self.log_alpha.exp().detach()
            # SAC's actor: min E[α log π(c̃|s) - min_i Q_i(s, c̃)], or imitate the data's choice at first
            value = self.task_policy.log_prob(s, choice) if imitate else self.critics(s, new_choice).min(0).values
            policy_loss = (alpha * log_prob - value).mean()
            if self.prior is not None:  # + λ KL(π(·|s) || ρ(·|s)), estimated with the same sample
                policy_loss = policy_loss + args.prior_kl_weight * (
                    log_prob - gaussian_log_prob(new_choice, *self.prior(s))).mean()
        self.step("policy_optimizer", policy_loss)
        self.step("alpha_optimizer", -(self.log_alpha * (log_prob.detach() + self.target_entropy)).mean())
        with torch.no_grad():  # Q̄ ← τ Q + (1 - τ) Q̄
            torch._foreach_lerp_(list(self.target_critics.parameters()), list(self.critics.parameters()), args.tau)
        return {"td_loss": td_loss, "cql_loss": cql_loss, "cql_gap": gap.mean(), "policy_loss": policy_loss,
                "q_data": q_data.mean(), "alpha": alpha, "alpha_prime": alpha_prime}

    def step(self, optimizer_name: str, loss):
        optimizer = self.optimizers[optimizer_name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # what a checkpoint holds (opal_utils.agent_state_dict): these modules and tensors, and the optimisers
    CHECKPOINTED = ("task_policy", "critics", "target_critics"), ("log_alpha", "log_alpha_prime")


class ValueNetwork(nn.Module):
    """V(s): IQL's state value."""

    def __init__(self, obs_dim, hidden_dim=256, layers=3):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        self.net = mlp(obs_dim, hidden_dim, 1, layers)

    def forward(self, states):
        with torch.autocast(states.device.type, enabled=False):  # in fp32, as Q
            return self.net(self.normalize(states).float()).squeeze(-1)


class IQL:
    """Implicit Q-learning (Kostrikov et al., 2022) over choices, the in-support alternative to CQL (--algorithm iql):
    V(s) is an upper expectile of Q̄(s, c) over the data's own choices c, the twin critics back up R + γ_hl V(s'),
    and the task policy is the data's choices weighted by exp(β (Q̄(s, c) - V(s))), clipped (advantage-weighted
    regression). No choice outside the data is scored by a critic, so nothing needs a conservative penalty. The
    prior's pull and --policy-bc-steps act as in CQL. `update` is one gradient step of all three: V first, then Q and
    π with the new V (the order of IQL's own code)."""

    def __init__(self, obs_dim, choice_low, choice_high, args, all_states, prior=None):
        device = all_states.device
        self.args, self.low, self.high, self.prior = args, choice_low, choice_high, prior
        self.task_policy, self.critics, self.target_critics = policy_and_critics(obs_dim, choice_low, choice_high,
                                                                                 args, all_states)
        self.value = ValueNetwork(obs_dim, args.hidden_dim, args.critic_layers).to(device)
        self.value.normalize.fit(all_states)
        if args.compile:
            self.value.compile()
        self.optimizers = {
            "policy_optimizer": torch.optim.Adam(self.task_policy.parameters(), lr=args.policy_lr, fused=True),
            "critic_optimizer": torch.optim.Adam(self.critics.parameters(), lr=args.critic_lr, fused=True),
            "value_optimizer": torch.optim.Adam(self.value.parameters(), lr=args.critic_lr, fused=True)}
        self.graphed_step = GraphedUpdate(
            self.gradient_step, [self.task_policy, self.critics, self.target_critics, self.value], [],
            self.optimizers.values(), args.cudagraph and device.type == "cuda")

    def update(self, s, choice, reward, s_next, done, discount, step: int) -> dict:
        """Gradient step number `step` on B transitions (s, c, R, s', done, γ_hl); returns the losses (0-d tensors)."""
        return self.graphed_step(s, choice, reward, s_next, done, discount, step <= self.args.policy_bc_steps)

    def gradient_step(self, s, choice, reward, s_next, done, discount, imitate: bool) -> dict:
        args = self.args
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():
                q_target = self.target_critics(s, choice).min(0).values  # min_i Q̄_i(s, c) of the data's choice
            # V: the expectile loss |τ - 1(u < 0)| u², u = Q̄(s, c) - V(s)
            value = self.value(s)
            u = q_target - value
            value_loss = ((args.iql_expectile - (u < 0).float()).abs() * u ** 2).mean()
        self.step("value_optimizer", value_loss)

        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            with torch.no_grad():  # y = R + γ_hl (1 - done) V(s')
                target = reward + (1 - done) * discount * self.value(s_next)
            q_data = self.critics(s, choice)  # (E, B)
            td_loss = 0.5 * ((q_data - target) ** 2).mean(1).sum()  # Σ_i ½ E[(Q_i(s, c) - y)²]
        self.step("critic_optimizer", td_loss)

        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            # advantage-weighted regression: max E[w log π(c|s)], w = min(exp(β (Q̄(s, c) - V(s))), max weight)
            with torch.no_grad():
                advantage = q_target - self.value(s)  # with V after its step, as IQL's code (CORL: before)
            weights = torch.ones_like(advantage) if imitate else (
                (args.iql_temperature * advantage).exp().clamp(max=args.iql_max_weight))
            policy_loss = -(weights * self.task_policy.log_prob(s, choice)).mean()
            if self.prior is not None:  # + λ KL(π(·|s) || ρ(·|s)), estimated with one reparameterised sample
                new_choice, log_prob = self.task_policy(s)
                policy_loss = policy_loss + args.prior_kl_weight * (
                    log_prob - gaussian_log_prob(new_choice, *self.prior(s))).mean()
        self.step("policy_optimizer", policy_loss)
        with torch.no_grad():  # Q̄ ← τ Q + (1 - τ) Q̄
            torch._foreach_lerp_(list(self.target_critics.parameters()), list(self.critics.parameters()), args.tau)
        return {"td_loss": td_loss, "value_loss": value_loss, "policy_loss": policy_loss, "q_data": q_data.mean(),
                "v_data": value.mean(), "advantage": advantage.mean()}

    step = CQL.step  # one optimiser's step on a loss, as CQL's

    CHECKPOINTED = ("task_policy", "critics", "target_critics", "value"), ()  # (no temperatures)


# --- shared: execution ---
class HierarchicalPolicy:
    """OPAL at test time: every c steps the task policy picks z (deterministically, tanh of its mean) in every
    environment, and the primitive policy's mean action acts for c steps; without primitives (None, c = 1) the task
    policy's action acts directly. `evaluate` calls it with the observations and the episodes' step t (numpy)."""

    def __init__(self, task_policy, primitive_policy, c: int):
        self.task_policy, self.primitive_policy, self.c, self.choice = task_policy, primitive_policy, c, None

    @torch.no_grad()
    def __call__(self, observations, t: int):
        states = torch.as_tensor(observations, device=next(self.task_policy.parameters()).device)
        if t % self.c == 0:  # a new high-level decision
            self.choice, _ = self.task_policy(states, deterministic=True)
        action = self.choice if self.primitive_policy is None else self.primitive_policy(states, self.choice)[0]
        return action.cpu().numpy()
# --- end shared ---


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = start_run(args, "opal_cql")  # --resume, or a new run

    # Setup: device, dataset, the budget's defaults (CORL's for D4RL data, a CPU's otherwise), the primitives
    device = setup_torch(args.seed, args.device, args.capture_video)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    args.fill_budget(dataset_id)
    vae = None if args.primitives == "none" else load_upstream(  # checked before the (possibly long) dataset load
        args.vae_ckpt, "opal_vae", args.allow_unfinished, dataset_id=dataset_id)
    dataset, layout, data = load_dataset(dataset_id, device)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    if vae is not None:
        check_checkpoint(vae, args.vae_ckpt, obs_layout=layout, obs_dim=obs_dim, act_dim=act_dim)
    c = vae["c"] if vae is not None else 1

    # OPAL §4.1: relabel into high-level transitions (s_0, z, R = Σ γ^t r'_t, s_k, done), windows inside one episode
    rewards, dones = task_rewards(data, evaluation_env(dataset), args.reward_scale, args.reward_bias)
    starts = window_starts(data["episode_lengths"], c, stride=args.relabel_stride or c).to(device)
    if len(starts) == 0:
        fail(f"every episode of {dataset_id} is shorter than c = {c} steps; there are no windows to relabel.")
    returns, done, next_rows, steps = relabel(starts, c, rewards, dones, args.gamma)
    states, next_states = data["observations"][starts], data["observations"][next_rows]
    discounts = backup_discounts(steps, args.gamma, args.high_level_discount)
    primitive_policy, prior = None, None
    if vae is None:  # plain CQL: the choice is the dataset's action, the box the action bounds
        choice_low = torch.as_tensor(dataset.action_space.low, dtype=torch.float32, device=device)
        choice_high = torch.as_tensor(dataset.action_space.high, dtype=torch.float32, device=device)
        choices = data["actions"][starts].clamp(choice_low, choice_high)
    else:  # CQL+OPAL: the choice is z = μ_φ(τ); the primitive policy stays fixed while the task policy learns
        encoder = Encoder(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"], vae["gru_layers"]).to(device)
        encoder.load_state_dict(vae["encoder"])
        choices = encode_windows(encoder, data["observations"], data["actions"], starts, c)
        choice_low, choice_high = latent_box(choices, args.latent_bound, args.latent_bound_std, args.latent_margin)
        primitive_policy = PrimitivePolicy(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
        primitive_policy.requires_grad_(False).load_state_dict(vae["primitive_policy"])
        if args.prior_kl_weight > 0:
            prior = Prior(obs_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
            prior.requires_grad_(False).load_state_dict(vae["prior"])
    method = {"cql": CQL, "iql": IQL}[args.algorithm]
    agent = method(obs_dim, choice_low, choice_high, args, data["observations"], prior)
    # bf16 autocast if a probe measures it faster: the critics on as many rows as the update's CQL term gives them
    rows = slice(0, args.batch_size * (1 + 3 * args.cql_n_actions))
    args.bf16 = use_bf16(args.bf16, device, lambda: agent.critics(states[rows], choices[rows]).sum(),
                         resumed=resumed is not None, graphed=agent.graphed_step.enabled)

    config = {**asdict(args), "dataset_id": dataset_id, "c": c, "transitions": len(starts),
              "successful_windows": int(done.sum()), "choice_low": choice_low.tolist(),
              "choice_high": choice_high.tolist()}
    run_dir, writer = open_run(args, config, resumed_dir)
    print(f"{dataset_id}: {len(starts)} {'high-level' if c > 1 else 'low-level'} transitions (c = {c}), "
          f"{int(done.sum())} of them reach the goal; {args.total_steps} {args.algorithm.upper()} steps; "
          f"run dir {run_dir}")
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    checkpoint_path, summary, first_step = run_dir / "opal_cql.pt", {}, 1
    if resumed is not None:  # networks, optimisers, temperatures, step counter and random number generators
        load_agent_state_dict(agent, resumed, *agent.CHECKPOINTED)
        summary, first_step = resume_progress(resumed, sampler)

    def checkpoint(step: int, finished: bool = False):
        stop_if_not_finite_module(f"CQL step {step}", checkpoint_path, writer, task_policy=agent.task_policy,
                                  critics=agent.critics)
        save_checkpoint(checkpoint_path, {
            "script": "opal_cql", "args": asdict(args), "seed": args.seed,
            **dataset_fields(dataset_id, dataset, layout, obs_dim, act_dim), "primitives": args.primitives, "c": c,
            "choice_dim": len(choice_low), "choice_low": choice_low.tolist(), "choice_high": choice_high.tolist(),
            "vae_ckpt": args.vae_ckpt if vae else None, "latent_dim": vae["latent_dim"] if vae else None,
            "hidden_dim": vae["hidden_dim"] if vae else None,
            "primitive_policy": primitive_policy.state_dict() if vae else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.policy_layers,
            **agent_state_dict(agent, *agent.CHECKPOINTED), "step": step, "finished": finished,
            "summary": dict(summary), "rng": random_state(sampler)})

    # CQL (or IQL) on the relabelled transitions; the task policy acts with its primitives every --eval-every steps
    evaluator = Evaluator(dataset, layout, args.num_envs, writer, summary)
    policy = HierarchicalPolicy(agent.task_policy, primitive_policy, c)  # what acts in the evaluation episodes
    loop = Loop(args.algorithm.upper(), first=first_step, last=args.total_steps, args=args, writer=writer,
                summary=summary, save=checkpoint, checkpoint_path=checkpoint_path, stop_requested=stop_requested,
                show=("q_data", "cql_gap", "v_data"), desc=f"{args.algorithm.upper()} ({args.primitives})")
    for step in loop:
        batch = torch.randint(len(starts), (args.batch_size,), device=device, generator=sampler)
        losses = agent.update(states[batch], choices[batch], returns[batch], next_states[batch], done[batch],
                              discounts[batch], step)
        loop.end_of_step(step, losses)
        if step % args.eval_every == 0 and step < args.total_steps and args.eval_episodes_during > 0:
            evaluator(policy, step, args.eval_episodes_during, args.seed + 10_000 + step)

    evaluator(policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    checkpoint(args.total_steps, finished=True)
    if args.capture_video:
        evaluator.video(policy, args.seed + 10_000, run_dir / "eval.mp4")
    print_summary(summary, checkpoint_path)
    evaluator.close()
    writer.close()

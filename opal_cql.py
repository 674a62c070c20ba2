"""OPAL, step 2: offline RL with primitives. CQL learns a task policy that picks a primitive z every c steps.

OPAL (Ajay et al., ICLR 2021, Section 4.1) relabels the dataset with the encoder of `opal_vae.py`: every length-c
window becomes one high-level transition (s_0, z = μ_φ(τ), Σ_{t<c} γ^t r_t, s_c). Conservative Q-learning (CQL;
Kumar et al., 2020) learns the task policy π_ψ(z|s) from these transitions; at test time the frozen primitive policy
π_θ(a|s,z) turns each z into c actions. `--primitives none` runs the same CQL on raw actions (c = 1): the baseline
column of the paper's Table 1. Three defaults are ours, chosen by measurement (docs/opal_cql.md, details 4, 13
and 14): each high-level transition is backed up with γ once per decision, the task policy pays λ KL(π_ψ ‖ ρ_ω)
toward the VAE's prior, as SPiRL does, and the CQL weight stays fixed on the latent space (CORL's Lagrange tuning
on raw actions); the paper fixes none of them.

A *choice* below is what the task policy outputs and the critics score: the latent z with primitives (held for c
steps), the raw action a without them (c = 1). The same code handles both.

Run:    python opal_cql.py --vae-ckpt runs/<vae run>/opal_vae.pt                 # CQL+OPAL on pointmaze-large
        python opal_cql.py --primitives none                                     # plain CQL
        python opal_cql.py --env antmaze-large-diverse --vae-ckpt runs/<vae run>/opal_vae.pt
Reads:  a Minari dataset (--env or --dataset-id) and, with primitives, a finished opal_vae.pt
Writes: runs/opal_cql__<env>__<seed>__<time>/  opal_cql.pt (task policy + the primitive policy it drives),
        TensorBoard events, config.json, eval.mp4 with --capture-video

Reading order: `Args`; then ALGORITHM: the task's reward, the relabelling, the latent action space, the networks and
the `CQL` update; then `__main__` at the bottom (setup → relabel → update loop → evaluation). The BOOKKEEPING section
between them (datasets, checkpoints, logging, evaluation episodes) can be skipped on a first reading.
"""

import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import farama_notifications
import gymnasium as gym
import minari
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# --- shared: quiet_robotics_import ---
# gymnasium-robotics prints a notice about its Adroit reward functions on import; no OPAL script uses Adroit
ROBOTICS_NOTICES = farama_notifications.notifications.get("gymnasium_robotics", {})
for version in [version for version, notice in ROBOTICS_NOTICES.items() if notice.startswith("AdroitHand")]:
    del ROBOTICS_NOTICES[version]
import gymnasium_robotics  # noqa: E402

gym.register_envs(gymnasium_robotics)
# --- end shared ---


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
    """opal: CQL over latent primitives; none: plain CQL over raw actions (c = 1), the baseline"""
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
    """width of the task policy's and critics' hidden layers; default 256 for D4RL aliases (CORL),
    128 otherwise (ours)"""
    policy_layers: int = 3
    """hidden layers of the task policy (CORL)"""
    critic_layers: Optional[int] = None
    """hidden layers of each critic; default 5 for D4RL aliases (CORL antmaze), 3 otherwise (ours)"""
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
    reward_scale: float = 10.0
    """r' = reward_scale * r + reward_bias per low-level step (CORL antmaze: 10, -5)"""
    reward_bias: float = -5.0
    """see --reward-scale"""
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
                 "or use --primitives none for plain CQL.")
        if self.lagrange is None:
            self.lagrange = self.primitives == "none"
        if self.vae_ckpt:  # saved in opal_cql.pt: resuming from another folder still finds it
            self.vae_ckpt = str(Path(self.vae_ckpt).resolve())

    def fill_budget(self, dataset_id: str):
        """The budget's flags left unset: CORL's antmaze configuration on D4RL data, ours (a CPU's) on any other."""
        paper_scale = dataset_id.startswith("D4RL/")
        self.total_steps = self.total_steps or (1_000_000 if paper_scale else 30_000)
        self.hidden_dim = self.hidden_dim or (256 if paper_scale else 128)
        self.critic_layers = self.critic_layers or (5 if paper_scale else 3)
        self.eval_every = self.eval_every or max(1, self.total_steps // 6)


# ======================================================================================================================
# ALGORITHM: what to study. The task's reward, OPAL's relabelling (§4.1), the latent action space, the networks
# (shared word for word with the other scripts) and the CQL update.
# ======================================================================================================================
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


@torch.no_grad()
def encode_windows(encoder, observations, actions, starts, c):
    """z = μ_φ(τ), the posterior mean of the length-c window starting at each row of `starts` (OPAL's relabelling)."""
    return torch.cat([encoder(observations[r], actions[r])[0] for r in window_rows(starts, c).split(4096)])
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
    """Twin (or more) Q(s, a) networks evaluated together; returns (ensemble, batch)."""

    def __init__(self, obs_dim, act_dim, hidden_dim=256, layers=5, ensemble=2):
        super().__init__()
        self.normalize = Normalizer(obs_dim)
        widths = [obs_dim + act_dim] + [hidden_dim] * layers
        blocks = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            blocks += [VectorizedLinear(width_in, width_out, ensemble), nn.ReLU()]
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


class CQL:
    """Conservative Q-learning (Kumar et al., 2020) over choices, as CORL runs it on antmaze: twin critics Q_1, Q_2
    with Polyak-averaged targets Q̄_i, a tanh-Gaussian task policy π with a tuned entropy temperature α (SAC), and the
    CQL(H) regulariser whose weight α' a Lagrange multiplier tunes. `update` is one gradient step of all of them; the
    script and benchmarks/bench_speed.py both call it."""

    def __init__(self, obs_dim, choice_low, choice_high, args, all_states, prior=None):
        device, choice_dim = all_states.device, len(choice_low)
        self.args, self.low, self.high, self.prior = args, choice_low, choice_high, prior
        self.task_policy = TanhGaussianPolicy(obs_dim, choice_dim, choice_low, choice_high, args.hidden_dim,
                                              args.policy_layers).to(device)
        self.critics = Critics(obs_dim, choice_dim, args.hidden_dim, args.critic_layers).to(device)
        for module in (self.task_policy, self.critics):
            module.normalize.fit(all_states)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        if args.compile:  # in place: parameter names, and so checkpoints, stay those of the eager modules
            for module in (self.task_policy, self.critics, self.target_critics):
                module.compile()
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
        args, n, B = self.args, self.args.cql_n_actions, len(s)
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
        q_data, q_uniform, q_policy, q_next = q.split([B, B * n, B * n, B * n], dim=1)  # (2, B), 3 x (2, B n)
        td_loss = 0.5 * ((q_data - target) ** 2).mean(1).sum()  # Σ_i ½ E[(Q_i(s, c) - y)²]
        # CQL(H) with importance sampling (Kumar et al. 2020, App. F):
        # logsumexp_c Q(s, c) ≈ log Σ_j exp(Q(s, c_j) - log μ(c_j)) over the 3n proposals
        weighted = torch.cat([(q_uniform - self.log_uniform_density).view(2, B, n),
                              (q_policy - log_mu_policy).view(2, B, n), (q_next - log_mu_next).view(2, B, n)], -1)
        gap = (torch.logsumexp(weighted, -1) - q_data).mean(1)  # (2,): E_s[logsumexp Q] - E_data[Q] per critic
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

    def state_dict(self) -> dict:
        return {"task_policy": self.task_policy.state_dict(), "critics": self.critics.state_dict(),
                "target_critics": self.target_critics.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                "log_alpha_prime": self.log_alpha_prime.detach().clone(),
                **{name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}}

    def load_state_dict(self, saved: dict):
        for name in ("task_policy", "critics", "target_critics"):
            getattr(self, name).load_state_dict(saved[name])
        with torch.no_grad():
            self.log_alpha.copy_(saved["log_alpha"])
            self.log_alpha_prime.copy_(saved["log_alpha_prime"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved[name])
        self.graphed_step.reset()  # the optimisers' state tensors are new: record the graph again


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. Datasets, checkpoints, run setup and logging, evaluation.
# ======================================================================================================================
# --- shared: datasets ---
ENV_ALIASES = {
    "antmaze-medium-diverse": "D4RL/antmaze/medium-diverse-v1",
    "antmaze-large-diverse": "D4RL/antmaze/large-diverse-v1",
    "kitchen-mixed": "D4RL/kitchen/mixed-v2",
    "kitchen-partial": "D4RL/kitchen/partial-v2",
    "pointmaze-umaze": "opal/pointmaze-umaze-diverse-v0",
    "pointmaze-medium": "opal/pointmaze-medium-diverse-v0",
    "pointmaze-large": "opal/pointmaze-large-diverse-v0",
    "metaworld-pick-place": "opal/metaworld-pick-place-expert-v0",
}
GENERATED = re.compile(r"opal/(pointmaze-(?:umaze|medium|large)|metaworld-pick-place)-(diverse|expert)(-anywhere)?-v0")


def fail(message: str):
    """Stop with one readable paragraph instead of a traceback."""
    raise SystemExit(f"error: {message}")


def resolve_dataset_id(env: str, dataset_id: Optional[str]) -> str:
    if dataset_id:
        return dataset_id
    if env not in ENV_ALIASES:
        fail(f"unknown --env {env!r}. Valid aliases: {', '.join(ENV_ALIASES)}; "
             "or pass any Minari id with --dataset-id.")
    return ENV_ALIASES[env]


def load_minari_dataset(dataset_id: str):
    """The dataset from the local Minari store; pointmaze data is generated, D4RL data downloaded."""
    try:
        return minari.load_dataset(dataset_id)
    except FileNotFoundError:
        pass
    except OSError as error:  # the store itself is unusable: not a folder, not writable
        fail(f"cannot use the Minari store {os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')} "
             f"({error.strerror}). Set MINARI_DATASETS_PATH to a writable folder.")
    except Exception as error:  # a folder that exists but does not read as a dataset
        fail(f"the local copy of {dataset_id} cannot be read ({type(error).__name__}: {error}). Delete it and retry.")
    generated = GENERATED.fullmatch(dataset_id)
    if generated:
        collector = Path(__file__).with_name("collect_data.py")
        print(f"{dataset_id} is not in the local Minari store: generating it with {collector.name} (about a minute)")
        if not collector.exists():
            fail(f"{dataset_id} is missing and {collector} is not beside this script to make it.")
        command = [sys.executable, str(collector), "--env", generated[1], "--kind", generated[2],
                   *(["--starts", "anywhere"] if generated[3] else [])]
        if subprocess.run(command).returncode != 0:
            fail(f"generating {dataset_id} failed (command: {' '.join(command)}); its output is above.")
        return minari.load_dataset(dataset_id)
    try:
        return minari.load_dataset(dataset_id, download=True)
    except ImportError:
        fail(f"{dataset_id} is not stored locally and downloading it needs huggingface_hub: "
             "pip install 'minari[hf]' (requirements.txt has it).")
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        fail(f"{dataset_id} is not stored locally and could not be downloaded ({reason}). "
             f"If you are offline, download it elsewhere with `minari download {dataset_id}` and copy the folder "
             f"into {os.environ.get('MINARI_DATASETS_PATH', '~/.minari/datasets')}, or train on data made here: "
             "--env pointmaze-large. If the id is mistyped, `minari list remote` shows the valid ones.")


def observation_layout(dataset) -> list:
    """Keys of a dict observation, concatenated in this order, that give the state D4RL used."""
    space = dataset.observation_space
    if not isinstance(space, gym.spaces.Dict):
        return []
    env_id = dataset.env_spec.id if dataset.env_spec is not None else ""
    if "AntMaze" in env_id:
        return ["achieved_goal", "observation"]  # D4RL antmaze state: torso x,y + 27-d observation = 29-d
    if "observation" in space.spaces:
        return ["observation"]  # pointmaze: x, y, vx, vy; kitchen: the 59-d robot and object state
    return sorted(k for k, v in space.spaces.items() if isinstance(v, gym.spaces.Box))


def flatten_observation(observation, layout: list) -> np.ndarray:
    if not layout:
        return np.asarray(observation, dtype=np.float32)
    return np.concatenate([np.asarray(observation[k], dtype=np.float32) for k in layout], axis=-1)
# --- end shared ---


# --- shared: offline_data ---
def load_flat_dataset(dataset, layout: list, device) -> dict:
    """All episodes as flat tensors, T+1 rows per episode: row t holds s_t, a_t, r_t (a, r padded at t = T)."""
    columns = {"observations": [], "actions": [], "rewards": [], "terminations": [], "achieved_goal": [],
               "qpos": [], "qvel": []}
    lengths = []
    for episode in dataset.iterate_episodes():
        steps = len(episode.actions)
        lengths.append(steps)
        pad = lambda x: np.concatenate([x, np.zeros_like(x[:1])], axis=0)
        columns["observations"].append(flatten_observation(episode.observations, layout))
        columns["actions"].append(pad(np.asarray(episode.actions, dtype=np.float32).reshape(steps, -1)))
        columns["rewards"].append(pad(np.asarray(episode.rewards, dtype=np.float32)))
        columns["terminations"].append(pad(np.asarray(episode.terminations, dtype=np.float32)))
        if isinstance(episode.observations, dict) and isinstance(episode.observations.get("achieved_goal"), np.ndarray):
            columns["achieved_goal"].append(np.asarray(episode.observations["achieved_goal"], dtype=np.float32))
        for key in ("qpos", "qvel"):
            if key in (episode.infos or {}) and len(episode.infos[key]) == steps + 1:
                columns[key].append(np.asarray(episode.infos[key], dtype=np.float64))
    data = {k: torch.as_tensor(np.concatenate(v)).to(device) for k, v in columns.items() if len(v) == len(lengths)}
    data["episode_lengths"] = torch.as_tensor(lengths, dtype=torch.long)
    for key, value in data.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            fail(f"the dataset's {key} contain NaN or inf; OPAL cannot learn from them.")
    return data


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


# --- shared: checkpoint ---
CHECKPOINT_FORMAT_VERSION = 1


def library_versions() -> dict:
    import mujoco
    return {"torch": str(torch.__version__), "gymnasium": gym.__version__, "minari": minari.__version__,
            "mujoco": mujoco.__version__, "numpy": np.__version__, "python": sys.version.split()[0]}


def save_checkpoint(path: Path, payload: dict):
    """Atomic: write a temporary file beside the target, then rename it over the target."""
    payload = {"format": "opal", "format_version": CHECKPOINT_FORMAT_VERSION, "versions": library_versions(), **payload}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def load_checkpoint(path, script: str) -> dict:
    """Load a checkpoint written by `script` (e.g. "opal_vae") or stop with a message saying what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / f"{script}.pt"
    if not path.is_file():
        fail(f"checkpoint {path} does not exist.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        if "Weights only load failed" in str(error):
            fail(f"{path} holds Python objects besides tensors and plain values, so it is not an OPAL checkpoint "
                 "(ours load with torch.load(weights_only=True)); it was not unpickled.")
        fail(f"{path} is not a readable checkpoint: it is truncated, corrupted or not a torch file "
             f"({type(error).__name__}).")
    if not isinstance(payload, dict) or payload.get("format") != "opal":
        fail(f"{path} is a torch file but not an OPAL checkpoint.")
    if payload.get("format_version", 0) > CHECKPOINT_FORMAT_VERSION:
        fail(f"{path} has checkpoint format {payload['format_version']}, newer than this script's "
             f"{CHECKPOINT_FORMAT_VERSION}: update the script.")
    if payload.get("script") != script:
        fail(f"{path} was written by {payload.get('script')}.py, but a {script}.py checkpoint is needed here.")
    return payload


def stop_signals() -> list:
    """SIGINT and SIGTERM append to the returned list instead of killing the process: the training loop
    sees the list is non-empty, writes its checkpoint and exits (code 130); a second signal is also caught."""
    received = []
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda signum, frame: received.append(signum))
    return received


def resumed_args(args, script: str):
    """For --resume: (checkpoint payload, the run's saved Args, its run directory), or stop with a reason."""
    payload = load_checkpoint(args.resume, script)
    path = Path(args.resume)
    run_dir = path if path.is_dir() else path.parent
    try:
        saved = type(args)(**{**payload["args"], "resume": args.resume})
    except TypeError as error:
        fail(f"{args.resume} was written with other arguments than this script knows ({error}); it cannot be resumed.")
    if payload.get("finished"):
        print(f"{run_dir} is a finished run; nothing to resume.")
        sys.exit(0)
    print(f"resuming {run_dir} at step {payload['step']} ({payload.get('phase', 'training')}) with the arguments "
          "saved in its checkpoint; other flags on this command line are ignored")
    return payload, saved, run_dir


def check_checkpoint(payload: dict, path, **expected):
    """Refuse a checkpoint whose fields differ from what this run expects, naming the first that differs."""
    for field, value in expected.items():
        if payload.get(field) != value:
            fail(f"{path} does not fit this run: its {field} is {payload.get(field)!r}, this run has {value!r}.")


def load_upstream(path, script: str, allow_unfinished: bool, **expected) -> dict:
    """The checkpoint of an earlier step of the pipeline (e.g. opal_vae.pt for opal_cql.py): refused if its run did
    not finish (part of its training never ran) unless `allow_unfinished`, or if a field differs from `expected`."""
    payload = load_checkpoint(path, script)
    if not payload.get("finished") and not allow_unfinished:
        run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
        fail(f"{path} comes from a run of {script}.py that did not finish: it stopped in its "
             f"{payload.get('phase', 'training')} phase at step {payload.get('step')}, so the rest of its training "
             f"never ran. Finish it with `python {script}.py --resume {run_dir}`, or pass --allow-unfinished to use "
             "it as it is.")
    check_checkpoint(payload, path, **expected)
    return payload
# --- end shared ---


# --- shared: run ---
def setup_torch(seed: int, device_name: str) -> torch.device:
    """Seed torch and numpy, flush subnormal floats to zero, and pick the device ("auto": CUDA if available).

    Subnormal floats (e.g. CQL's softmax weights of far-off Q-values) take a slow path on CPUs: flushing them
    made opal_cql.py 1.7x faster here, with no effect on the learning signal."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_flush_denormal(True)
    if device_name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device_name)


def use_bf16(requested: bool, device: torch.device, work, resumed: bool = False, probe=None,
             graphed: bool = False) -> bool:
    """Whether to autocast to bf16: only if requested and measured faster than fp32 here. A probe at start-up
    decides, on a CPU and on a CUDA GPU alike, because neither the CPU's flags nor the GPU's name tell: on two CPUs
    with the same AVX-512 BF16 flags and no AMX, bf16 ran the CQL update at 0.7x and at 2.2-3.3x fp32; with AMX at
    1.8-2.8x; on an H200 at 0.6-0.9x eager (bound by kernel launches) and 1.5-2.0x as a CUDA graph (docs/speed.md).
    `bf16_probe` times `work` (a forward pass of the script's costliest piece on a batch of its own data,
    returning a loss) both ways, as a CUDA graph if the run replays its updates as one (`graphed`); bf16 is used
    if it takes at most 0.8 of fp32's time, so that a near tie stays in fp32. The choice is printed and kept in
    the run's args (config.json, checkpoint); a resumed run keeps the choice it started with, so that it goes on
    bit for bit. `probe`: a stand-in for `bf16_probe` (the tests give it fixed timings)."""
    if not requested or resumed:
        return requested
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        print("bf16 autocast off: this GPU has no bf16")
        return False
    if device.type not in ("cpu", "cuda"):
        print(f"bf16 autocast off: not measured on {device.type}")
        return False
    fp32, bf16 = (probe or bf16_probe)(work, device, graphed=graphed)
    faster = bf16 <= 0.8 * fp32
    print(f"bf16 autocast {'on' if faster else 'off'}: a probe measured bf16 at {fp32 / bf16:.2f}x the speed of "
          f"fp32 on this {'GPU' if device.type == 'cuda' else 'CPU'} ({fp32 * 1e3:.2f} against {bf16 * 1e3:.2f} ms "
          f"a forward and backward pass{', in a CUDA graph' if graphed else ''}; on from 1.25x)")
    return faster


def bf16_probe(work, device: torch.device, repeats: int = 5, graphed: bool = False) -> tuple:
    """(fp32, bf16) seconds of a forward pass `work()` and the backward pass of the loss it returns, the forward
    under bf16 autocast the second time, as in the training loop; each the fastest of `repeats` after a warm-up,
    the two precisions taking turns. On a GPU each pass is timed to its end (synchronised), and `graphed` times
    it recorded as a CUDA graph, as a run that replays its updates pays for it. Its random numbers are its own:
    the run's stay as its seed set them. The gradients it leaves are cleared by the optimiser's zero_grad before
    the first update's backward."""
    def forward_backward(bf16: bool):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = work()
        loss.backward()

    cuda = device.type == "cuda"
    finish = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)  # a GPU runs asynchronously
    passes = {bf16: (lambda bf16=bf16: forward_backward(bf16)) for bf16 in (False, True)}
    seconds = {False: [], True: []}
    with torch.random.fork_rng(devices=[device] if cuda else []):
        if graphed:  # each pass recorded after a warm-up on a side stream, then replayed
            graphs = {bf16: torch.cuda.CUDAGraph() for bf16 in (False, True)}
            for bf16, graph in graphs.items():
                stream = torch.cuda.Stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    forward_backward(bf16)
                torch.cuda.current_stream(device).wait_stream(stream)
                with torch.cuda.graph(graph):
                    forward_backward(bf16)
            passes = {bf16: graph.replay for bf16, graph in graphs.items()}
        for _ in range(repeats + 1):
            for bf16 in (False, True):
                finish()
                start = time.perf_counter()
                passes[bf16]()
                finish()
                seconds[bf16].append(time.perf_counter() - start)
    return min(seconds[False][1:]), min(seconds[True][1:])


def open_run(args, config: dict, resumed_dir=None, env_name=None):
    """The run directory runs/<exp_name>__<env>__<seed>__<unix time>/ (or the resumed run's), its config.json,
    a TensorBoard writer with the configuration as text, and wandb (syncing TensorBoard) behind --track. <env>:
    `env_name`, or --dataset-id (its slashes as dashes) or --env."""
    if resumed_dir is not None:
        run_dir = Path(resumed_dir)
    else:
        env_name = env_name or (args.dataset_id.replace("/", "-") if args.dataset_id else args.env)
        run_dir = Path(args.runs_dir) / f"{args.exp_name}__{env_name}__{args.seed}__{int(time.time())}"
        run_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, **{f"version_{k}": v for k, v in library_versions().items()}}
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    if args.track:
        import wandb
        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=config, name=run_dir.name, save_code=True)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in config.items()))
    return run_dir, writer


def stop_if_not_finite(values: dict, where: str, checkpoint_path: Path, writer):
    """A NaN or inf stops the run. Checkpoints are only written from finite parameters (stop_if_not_finite_module),
    so the file on disk stays the last good one."""
    for name, value in values.items():
        if not math.isfinite(value):
            writer.close()
            fail(f"{name} became {value} at {where}; stopped. The last good checkpoint is "
                 f"{checkpoint_path if checkpoint_path.exists() else 'not written yet (none was saved)'}. "
                 "Lower the learning rates or check the dataset.")


def stop_if_not_finite_module(where: str, checkpoint_path: Path, writer, **modules):
    """Called before every save: a module with a NaN or inf parameter stops the run instead of being written."""
    for name, module in modules.items():
        if not all(torch.isfinite(p.detach()).all() for p in module.parameters()):
            stop_if_not_finite({f"a parameter of the {name}": math.nan}, where, checkpoint_path, writer)


class Loop:
    """One training phase's bookkeeping, so that the loop body holds only the algorithm: a progress bar; the losses
    averaged between log lines, written under losses/ every --log-every steps with charts/SPS and kept in the run's
    summary; a stop on NaN or inf; the checkpoint every --save-every steps and when Ctrl-C or SIGTERM arrives (then
    exit code 130). `stride`: steps per iteration (opal_online_sac.py counts environment steps, --num-envs of them
    per iteration); an iteration may report no losses (no update ran in it)."""

    def __init__(self, phase, first, last, args, writer, summary, save, checkpoint_path, stop_requested, show=(),
                 desc=None, prefix="", log_offset=0, optimizer=None, stride=1):
        self.phase, self.first, self.last, self.args, self.stride = phase, first, last, args, stride
        self.writer, self.summary = writer, summary
        self.save, self.checkpoint_path, self.stop_requested, self.show = save, checkpoint_path, stop_requested, show
        self.desc, self.prefix, self.log_offset, self.optimizer = desc or phase, prefix, log_offset, optimizer
        self.sums, self.names, self.count = None, [], 0

    def __iter__(self):
        self.start_time = time.time()
        self.progress = tqdm(desc=self.desc, mininterval=2, initial=self.first - 1, total=self.last)
        for step in range(self.first + self.stride - 1, self.last + 1, self.stride):
            yield step
            self.progress.update(self.stride)
        self.progress.close()

    def passes(self, step: int, every: int) -> bool:
        """Whether the iteration ending at `step` passed a multiple of `every` (step % every == 0 at stride 1)."""
        return step // every > (step - self.stride) // every

    def end_of_step(self, step: int, losses: dict):
        if losses:
            values = torch.stack([value.detach().float() for value in losses.values()])  # summed on the device
            self.sums = values if self.sums is None else self.sums + values
            self.names, self.count = list(losses), self.count + 1
        stop = bool(self.stop_requested)  # read once: a signal arriving later is handled at the next step
        save_now = self.passes(step, self.args.save_every) or stop
        if self.passes(step, self.args.log_every) or step + self.stride > self.last or save_now:
            means = dict(zip(self.names, (self.sums / self.count).tolist())) if self.count else {}
            self.sums, self.count = None, 0
            stop_if_not_finite({f"losses/{k}": v for k, v in means.items()}, f"{self.phase} step {step}",
                               self.checkpoint_path, self.writer)
            sps = (step - self.first + 1) / (time.time() - self.start_time)
            for name, value in means.items():
                self.writer.add_scalar(f"losses/{name}", value, self.log_offset + step)
            self.writer.add_scalar("charts/SPS", sps, self.log_offset + step)
            if self.optimizer is not None:
                learning_rate = self.optimizer.param_groups[0]["lr"]
                self.writer.add_scalar("charts/learning_rate", learning_rate, self.log_offset + step)
            shown = {name: f"{means[name]:.3f}" for name in self.show if name in means}
            self.progress.set_postfix({**shown, "sps": f"{sps:.0f}"})
            self.summary.update(means, **{f"{self.prefix}steps": step, f"{self.prefix}sps": sps})
        if save_now:
            self.save(step)
        if stop:
            print(f"stopped by signal at {self.phase} step {step}; checkpoint written to {self.checkpoint_path}")
            sys.exit(130)
# --- end shared ---


# --- shared: cuda_graph ---
class GraphedUpdate:
    """`update(*inputs)` recorded once as a CUDA graph and replayed at every later call (ours; LeanRL does the same
    for CleanRL's SAC): one launch instead of the hundreds of small kernels that bound the eager update on a GPU
    (docs/speed.md). Disabled (on a CPU, or --no-cudagraph) it calls `update` eagerly: the same function.

    `modules`, `tensors` and `optimizers` (Adam) hold everything the update changes in place. The first call for
    each combination of the non-tensor inputs and the tensors' shapes warms the update up on a side stream (Adam
    creates its state, cuBLAS its handles), puts every parameter, buffer, optimiser state and the random number
    generators back as they were, and records it; so no step is taken twice, and the recorded update draws the
    random numbers the eager one would. Later calls copy their tensors into the graph's inputs and replay it. The
    returned tensors are the graph's own: read them before the next call. After loading a checkpoint into the
    optimisers, call `reset()` (their state tensors are new ones, which no recorded graph updates)."""

    def __init__(self, update, modules, tensors, optimizers, enabled: bool):
        self.update, self.modules, self.tensors = update, list(modules), list(tensors)
        self.optimizers, self.enabled, self.graphs = list(optimizers), enabled, {}

    def __call__(self, *inputs):
        if not self.enabled:
            return self.update(*inputs)
        key = tuple(tuple(x.shape) if torch.is_tensor(x) else x for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self.record(inputs)
        graph, graph_inputs, outputs = self.graphs[key]
        for graph_input, value in zip(graph_inputs, inputs):
            if torch.is_tensor(value):
                graph_input.copy_(value)
        graph.replay()
        return outputs

    def reset(self):
        self.graphs = {}

    def changed_tensors(self) -> list:
        return [*(t for module in self.modules for t in (*module.parameters(), *module.buffers())), *self.tensors]

    def warm_up(self, inputs, steps: int = 3):
        """Run the update `steps` times, then put back every tensor it changed and the generators it drew from."""
        saved = [tensor.detach().clone() for tensor in self.changed_tensors()]
        saved_states = {id(state): {name: value.clone() for name, value in state.items()}
                        for optimizer in self.optimizers for state in optimizer.state.values()}
        devices = [inputs[0].device] if inputs[0].device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True")  # Adam: "step() is running without graph"
            for _ in range(steps):
                self.update(*inputs)
        with torch.no_grad():
            for tensor, value in zip(self.changed_tensors(), saved):
                tensor.copy_(value)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
                for state in optimizer.state.values():
                    before = saved_states.get(id(state))
                    for name, value in state.items():
                        if before is None:  # a state born in the warm-up goes back to Adam's start: zeros
                            value.zero_()
                        else:
                            value.copy_(before[name])

    def record(self, inputs):
        graph_inputs = [x.clone() if torch.is_tensor(x) else x for x in inputs]
        groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]
        capturable = [group["capturable"] for group in groups]
        for group in groups:  # Adam's recordable form: its step counts live on the GPU
            group["capturable"] = True
        for optimizer in self.optimizers:
            for parameter, state in optimizer.state.items():
                state["step"] = state["step"].to(parameter.device, torch.float32)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.warm_up(graph_inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = self.update(*graph_inputs)
        for group, flag in zip(groups, capturable):  # as before, so that checkpoints stay those of an eager run
            group["capturable"] = flag
        return graph, graph_inputs, outputs
# --- end shared ---


# --- shared: evaluation ---
def evaluation_env(dataset, **make_kwargs):
    """The dataset's evaluation environment, or a refusal where the dataset stores none."""
    if dataset.env_spec is None:
        fail(f"{dataset.spec.dataset_id} stores no environment to act in (Meta-World's data cannot: its environments "
             "are not serialisable), so no policy can be evaluated on it here; it is data for opal_vae.py.")
    return dataset.recover_environment(eval_env=True, **make_kwargs)


def make_eval_envs(dataset, num_envs, **make_kwargs):
    return gym.vector.SyncVectorEnv([lambda: evaluation_env(dataset, **make_kwargs)] * num_envs)


@torch.no_grad()
def evaluate(envs, layout, task_policy, primitive_policy, c, episodes, seed, act_low, act_high, frames=None):
    """Run `episodes` evaluation episodes; returns (success rate, mean undiscounted return, mean over episodes of
    the closest xy distance to the goal, NaN for environments without a goal position).

    Every c steps the task policy picks z (deterministically, tanh of its mean) in every environment, then the
    primitive policy's mean action, clipped to the action bounds, acts for c steps. Without primitives
    (primitive_policy None, c = 1) the task policy's action acts directly. An episode succeeds when any of
    its steps reports success. `frames`, a list, receives the first environment's picture after every step.
    """
    device = next(task_policy.parameters()).device
    successes, returns, closest_distances = [], [], []
    for round_index in range(math.ceil(episodes / envs.num_envs)):
        obs, _ = envs.reset(seed=[seed + round_index * envs.num_envs + i for i in range(envs.num_envs)])
        running = np.ones(envs.num_envs, dtype=bool)
        success = np.zeros(envs.num_envs, dtype=bool)
        episode_return = np.zeros(envs.num_envs)
        closest = np.full(envs.num_envs, np.nan)
        while running.any():
            states = torch.as_tensor(flatten_observation(obs, layout), device=device)
            choice, _ = task_policy(states, deterministic=True)
            for _ in range(c):
                action = choice if primitive_policy is None else primitive_policy(states, choice)[0]
                obs, reward, terminated, truncated, info = envs.step(np.clip(action.cpu().numpy(), act_low, act_high))
                if frames is not None:
                    frames.append(envs.render()[0])
                episode_return += reward * running
                success |= np.asarray(info.get("success", np.zeros(envs.num_envs, dtype=bool)), dtype=bool) & running
                if isinstance(obs, dict) and isinstance(obs.get("achieved_goal"), np.ndarray):
                    distance = np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"], axis=-1)
                    closest = np.where(running, np.fmin(closest, distance), closest)
                running &= ~(terminated | truncated)
                if not running.any():
                    break
                states = torch.as_tensor(flatten_observation(obs, layout), device=device)
        successes.extend(success.tolist())
        returns.extend(episode_return.tolist())
        closest_distances.extend(closest.tolist())
    return (float(np.mean(successes[:episodes])), float(np.mean(returns[:episodes])),
            float(np.mean(closest_distances[:episodes])))


def normalized_score(dataset, eval_env, success_rate, mean_return):
    """D4RL's normalised score: 100 x success rate for mazes; otherwise 100 x (return - ref min) / (ref max - ref
    min) with the dataset's reference scores (kitchen: 0 and 4 tasks), NaN when the dataset has none."""
    if hasattr(eval_env.unwrapped, "maze"):
        return 100.0 * success_rate
    try:
        return 100.0 * float(minari.get_normalized_score(dataset, np.array([mean_return]))[0])
    except ValueError:
        return math.nan


class Evaluator:
    """Evaluation episodes of a task policy and its primitives in --num-envs copies of the dataset's evaluation env;
    the success rate, return, normalised score and (mazes) closest approach to the goal are written under eval/ and
    kept in the run's summary with the best score so far."""

    def __init__(self, dataset, layout, c, num_envs, writer, summary):
        self.dataset, self.layout, self.c, self.writer, self.summary = dataset, layout, c, writer, summary
        self.envs = make_eval_envs(dataset, num_envs)
        self.eval_env = self.envs.envs[0]  # for normalized_score: a maze or not, the dataset's reference scores
        self.act_low, self.act_high = dataset.action_space.low, dataset.action_space.high

    def __call__(self, task_policy, primitive_policy, step, episodes, seed):
        success_rate, mean_return, goal_distance = evaluate(self.envs, self.layout, task_policy, primitive_policy,
                                                            self.c, episodes, seed, self.act_low, self.act_high)
        score = normalized_score(self.dataset, self.eval_env, success_rate, mean_return)
        for name, value in (("success_rate", success_rate), ("return", mean_return), ("normalized_score", score)):
            self.writer.add_scalar(f"eval/{name}", value, step)
        if math.isfinite(goal_distance):  # mazes: how close the agent came to the goal, a signal below success
            self.writer.add_scalar("eval/closest_goal_distance", goal_distance, step)
        best = max(self.summary.get("best_normalized_score", -math.inf), score) if math.isfinite(score) else score
        self.summary.update(last_normalized_score=score, best_normalized_score=best, last_success_rate=success_rate,
                            last_closest_goal_distance=goal_distance)
        tqdm.write(f"step {step}: normalized score {score:.1f} (success {success_rate:.2f}, return {mean_return:.2f}, "
                   f"closest to goal {goal_distance:.2f}, {episodes} episodes); best so far {best:.1f}")

    def video(self, task_policy, primitive_policy, seed, path):
        """`path` (mp4) of one evaluation episode, acted as in evaluation (--capture-video)."""
        import imageio
        envs, frames = make_eval_envs(self.dataset, 1, render_mode="rgb_array"), []
        evaluate(envs, self.layout, task_policy, primitive_policy, self.c, 1, seed, self.act_low, self.act_high, frames)
        imageio.mimsave(path, frames, fps=30)
        envs.close()

    def close(self):
        self.envs.close()
# --- end shared ---


# --- shared: policy_checkpoint ---
def policies_from_checkpoint(payload: dict):
    """(task policy, primitive policy or None) rebuilt from an opal_cql.pt payload alone, no VAE file needed."""
    task_policy = TanhGaussianPolicy(payload["obs_dim"], payload["choice_dim"], torch.tensor(payload["choice_low"]),
                                     torch.tensor(payload["choice_high"]), payload["policy_hidden_dim"],
                                     payload["policy_layers"])
    task_policy.load_state_dict(payload["task_policy"])
    primitive_policy = None
    if payload["primitives"] == "opal":
        primitive_policy = PrimitivePolicy(payload["obs_dim"], payload["act_dim"], payload["latent_dim"],
                                           payload["hidden_dim"])
        primitive_policy.load_state_dict(payload["primitive_policy"])
    return task_policy, primitive_policy
# --- end shared ---


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = resumed_args(args, "opal_cql") if args.resume else (None, args, None)

    # Setup: device, dataset, the budget's defaults (CORL's for D4RL data, a CPU's otherwise), the primitives
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering without a display
    device = setup_torch(args.seed, args.device)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    args.fill_budget(dataset_id)
    vae = None  # checked before the (possibly long) dataset load
    if args.primitives == "opal":
        vae = load_upstream(args.vae_ckpt, "opal_vae", args.allow_unfinished, dataset_id=dataset_id)
    dataset = load_minari_dataset(dataset_id)
    layout = observation_layout(dataset)
    data = load_flat_dataset(dataset, layout, device)
    obs_dim, act_dim = data["observations"].shape[1], data["actions"].shape[1]
    act_low, act_high = dataset.action_space.low, dataset.action_space.high
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
        choice_low = torch.as_tensor(act_low, dtype=torch.float32, device=device)
        choice_high = torch.as_tensor(act_high, dtype=torch.float32, device=device)
        choices = data["actions"][starts].clamp(choice_low, choice_high)
    else:  # CQL+OPAL: the choice is z = μ_φ(τ); the primitive policy stays fixed while the task policy learns
        encoder = Encoder(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"], vae["gru_layers"]).to(device)
        encoder.load_state_dict(vae["encoder"])
        choices = encode_windows(encoder, data["observations"], data["actions"], starts, c)
        choice_low, choice_high = latent_box(choices, args.latent_bound, args.latent_bound_std, args.latent_margin)
        primitive_policy = PrimitivePolicy(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
        primitive_policy.load_state_dict(vae["primitive_policy"])
        primitive_policy.requires_grad_(False)
        if args.prior_kl_weight > 0:
            prior = Prior(obs_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
            prior.load_state_dict(vae["prior"])
            prior.requires_grad_(False)
    agent = CQL(obs_dim, choice_low, choice_high, args, data["observations"], prior)
    # bf16 autocast if a probe measures it faster: the critics on as many rows as the update's CQL term gives them
    rows = slice(0, args.batch_size * (1 + 3 * args.cql_n_actions))
    args.bf16 = use_bf16(args.bf16, device, lambda: agent.critics(states[rows], choices[rows]).sum(),
                         resumed=resumed is not None, graphed=agent.graphed_step.enabled)

    config = {**asdict(args), "dataset_id": dataset_id, "c": c, "transitions": len(starts),
              "successful_windows": int(done.sum()), "choice_low": choice_low.tolist(),
              "choice_high": choice_high.tolist()}
    run_dir, writer = open_run(args, config, resumed_dir)
    print(f"{dataset_id}: {len(starts)} {'high-level' if c > 1 else 'low-level'} transitions (c = {c}), "
          f"{int(done.sum())} of them reach the goal; {args.total_steps} CQL steps; run dir {run_dir}")
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    checkpoint_path, summary, first_step = run_dir / "opal_cql.pt", {}, 1
    if resumed is not None:  # networks, optimisers, temperatures, step counter and random number generators
        agent.load_state_dict(resumed)
        torch.set_rng_state(resumed["rng"]["torch"])
        sampler.set_state(resumed["rng"]["sampler"])
        summary, first_step = dict(resumed["summary"]), resumed["step"] + 1

    def checkpoint(step: int, finished: bool = False):
        stop_if_not_finite_module(f"CQL step {step}", checkpoint_path, writer, task_policy=agent.task_policy,
                                  critics=agent.critics)
        save_checkpoint(checkpoint_path, {
            "script": "opal_cql", "args": asdict(args), "seed": args.seed, "dataset_id": dataset_id,
            "env_id": dataset.env_spec.id if dataset.env_spec is not None else None, "obs_layout": layout,
            "obs_dim": obs_dim, "act_dim": act_dim, "act_low": act_low.tolist(), "act_high": act_high.tolist(),
            "primitives": args.primitives, "c": c, "choice_dim": len(choice_low), "choice_low": choice_low.tolist(),
            "choice_high": choice_high.tolist(), "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.policy_layers, **agent.state_dict(),
            "step": step, "finished": finished, "summary": dict(summary),
            "rng": {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}})

    # CQL on the relabelled transitions, evaluating the task policy with its primitives every --eval-every steps
    evaluator = Evaluator(dataset, layout, c, args.num_envs, writer, summary)
    loop = Loop("CQL", first_step, args.total_steps, args, writer, summary, checkpoint, checkpoint_path,
                stop_requested, show=("q_data", "cql_gap"), desc=f"CQL ({args.primitives})")
    for step in loop:
        batch = torch.randint(len(starts), (args.batch_size,), device=device, generator=sampler)
        losses = agent.update(states[batch], choices[batch], returns[batch], next_states[batch], done[batch],
                              discounts[batch], step)
        loop.end_of_step(step, losses)
        if step % args.eval_every == 0 and step < args.total_steps and args.eval_episodes_during > 0:
            evaluator(agent.task_policy, primitive_policy, step, args.eval_episodes_during, args.seed + 10_000 + step)

    evaluator(agent.task_policy, primitive_policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    checkpoint(args.total_steps, finished=True)
    if args.capture_video:
        evaluator.video(agent.task_policy, primitive_policy, args.seed + 10_000, run_dir / "eval.mp4")
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    print(f"checkpoint: {checkpoint_path}")
    evaluator.close()
    writer.close()

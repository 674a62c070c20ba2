"""OPAL, step 2 online: SAC on the latent space. A task policy picks a primitive every c steps and learns by trial.

OPAL (Ajay et al., ICLR 2021, Section 4.3) lets primitives learned offline carry online exploration where a flat
agent finds no reward: soft actor-critic (SAC; Haarnoja et al., 2018) learns a task policy π_ψ(z|s) whose action is
a latent z, held for c environment steps through the frozen primitive policy π_θ(a|s,z) of `opal_vae.py`. Each
high-level step is one transition of a semi-MDP, (s, z, R = Σ_{t<k} γ^t r_t, s', done, k), where k ≤ c counts the
steps the primitive really ran (fewer when the episode ends inside it); it is backed up with the same high-level
discount as `opal_cql.py`. `--primitives none` is the identical SAC on raw actions (c = 1), the baseline.
The environment is the dataset's evaluation task with a sparse reward (1 at the goal, which ends the episode),
trained on as r - 1 (every step costs 1: see --reward-bias); the dataset serves only the primitives' latent box
(as in `opal_cql.py`), the networks' state statistics and the states on which the task policy is first fitted to
the prior ρ(z|s) (as SPiRL starts from its skill prior). Ours: the SAC defaults are CleanRL's, the budget is a
CPU's; the paper gives neither for this use.

A *choice* below is what the task policy outputs and the critics score: the latent z with primitives (held for c
steps), the raw action a without them (c = 1). The same code handles both.

Run:    python opal_online_sac.py --vae-ckpt runs/<vae run>/opal_vae.pt          # SAC+OPAL, pointmaze-large's task
        python opal_online_sac.py --primitives none                              # plain SAC
        python opal_online_sac.py --env antmaze-large-diverse --vae-ckpt runs/<vae run>/opal_vae.pt
Reads:  a Minari dataset (--env or --dataset-id: its evaluation env, state statistics, and with primitives the
        latent box) and, with primitives, a finished opal_vae.pt
Writes: runs/opal_online_sac__<env>__<seed>__<time>/  opal_online_sac.pt (task policy, critics, replay buffer, the
        training environments' episodes, the primitive policy), TensorBoard events, config.json, eval.mp4

Reading order: `Args`; then ALGORITHM: the latent action space, the networks, the semi-MDP step `smdp_step`, the
replay buffer and the `SAC` update; then `__main__` at the bottom (setup → collect a high-level step → update →
evaluation). The BOOKKEEPING section between them (datasets, checkpoints, logging, training and evaluation
environments) can be skipped on a first reading.
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
    exp_name: str = "opal_online_sac"
    """name of this experiment, the first part of the run directory's name"""
    seed: int = 1
    """seed of torch, numpy, the batch sampler and the training episodes (evaluation episodes use seed + 10,000
    onward, training episodes seed + 1,000,000 onward)"""
    env: str = "pointmaze-large"
    """dataset alias whose evaluation task is learned: antmaze-medium-diverse, antmaze-large-diverse,
    pointmaze-umaze, pointmaze-medium, pointmaze-large"""
    dataset_id: Optional[str] = None
    """any Minari dataset id, local or remote; overrides --env"""
    vae_ckpt: Optional[str] = None
    """opal_vae.pt (or its run directory) trained on the same dataset; required with --primitives opal"""
    allow_unfinished: bool = False
    """accept a --vae-ckpt whose run did not finish (stopped before its last step); refused otherwise"""
    primitives: Literal["opal", "none"] = "opal"
    """opal: SAC over latent primitives; none: plain SAC over raw actions (c = 1), the baseline"""
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
    bf16: bool = False
    """run the forward passes under torch.autocast(bfloat16), Q values in fp32; honoured only where a probe at
    start-up measures bf16 1.25x faster than fp32 or more, on a CPU or a GPU (ours)"""
    cudagraph: bool = True
    """on a CUDA device, record the whole SAC update once as a CUDA graph and replay it at every update (ours:
    several times faster on an H200, docs/speed.md); no effect on a CPU"""
    runs_dir: str = "runs"
    """folder that receives the run directory"""
    save_every: int = 50_000
    """write the checkpoint (with the replay buffer) every this many environment steps, at the end and on Ctrl-C"""
    log_every: int = 2_000
    """log losses (averaged since the last log), environment steps/s and updates/s every this many environment
    steps"""
    eval_every: Optional[int] = None
    """evaluate every this many environment steps with --eval-episodes-during episodes; default total_steps // 10"""
    eval_episodes: int = 100
    """evaluation episodes at the end (D4RL uses 100)"""
    eval_episodes_during: int = 10
    """evaluation episodes at each intermediate evaluation"""
    eval_num_envs: int = 10
    """parallel evaluation environments"""
    num_envs: int = 4
    """parallel training environments that collect experience (gymnasium.vector.SyncVectorEnv)"""
    resume: Optional[str] = None
    """continue an interrupted run from its opal_online_sac.pt (or run directory), replay buffer included, with the
    arguments saved in it"""

    # The task
    dense_reward: bool = False
    """mazes: the environment's dense reward exp(-distance to the goal) instead of the sparse 1 at the goal"""
    reward_scale: float = 1.0
    """training reward r' = reward_scale * r + reward_bias per environment step (evaluation reports the task's own
    return); opal_cql.py uses CORL's antmaze shaping 10 r - 5"""
    reward_bias: float = -1.0
    """see --reward-scale. Every step costs 1 (ours; IQL's antmaze reward r - 1): with the task's 0/1, SAC's soft
    bonus, positive while α is large, pays for staying, and reaching the goal, which ends the episode, stops it;
    measured in docs/opal_online_sac.md. 0: the task's reward"""
    max_episode_steps: Optional[int] = None
    """time limit of a training episode; default the evaluation task's (pointmaze-large: 800); evaluation keeps
    the task's"""

    # OPAL's high level, as opal_cql.py defines it
    high_level_discount: Literal["decision", "window"] = "decision"
    """decision: γ per high-level decision (SPiRL, SUPE; opal_cql.py's default); window: γ^k for a primitive that
    ran k steps (the exact semi-MDP)"""
    latent_bound: Literal["minmax", "std"] = "minmax"
    """the task policy's latent box: min/max of the dataset's relabelled latents, or their mean ± --latent-bound-std
    stds (as opal_cql.py)"""
    latent_bound_std: float = 2.0
    """half-width of the std box, in standard deviations of the relabelled latents (ours)"""
    latent_margin: float = 0.0
    """widen the latent box by this fraction of its width on each side (ours)"""
    prior_start_steps: int = 2_000
    """with primitives: before RL, fit the task policy to the prior ρ(z|s) on the dataset's states for this many
    gradient steps, so that it starts where the primitives are plausible (SPiRL starts from the prior; 0: a fresh
    policy)"""
    prior_kl_target: Optional[float] = None
    """with primitives: replace SAC's entropy bonus by a KL penalty toward the VAE's prior ρ(z|s), its weight tuned
    so that KL(π(z|s) || ρ(z|s)) stays near this many nats (SPiRL's skill-prior RL); default: SAC's entropy bonus"""

    # SAC; defaults follow CleanRL's sac_continuous_action.py unless marked "ours"
    total_steps: int = 200_000
    """environment steps, summed over the training environments (ours: a CPU budget; rounded down to a multiple of
    --num-envs)"""
    learning_starts: int = 5_000
    """environment steps of warm-up before the first update: random actions, or with primitives latents drawn from
    the prior ρ(z|s) (CleanRL: 5,000)"""
    buffer_size: int = 1_000_000
    """replay buffer capacity in (high-level) transitions (CleanRL)"""
    updates_per_step: int = 1
    """gradient updates per high-level transition collected (CleanRL: one per environment step, c = 1)"""
    batch_size: int = 256
    """transitions per gradient step (CleanRL)"""
    gamma: float = 0.99
    """per-step discount γ inside a primitive's reward sum, and of the backup as --high-level-discount says
    (CleanRL)"""
    tau: float = 0.005
    """Polyak rate of the target critics (CleanRL)"""
    policy_lr: float = 3e-4
    """Adam learning rate of the task policy (CleanRL)"""
    critic_lr: float = 1e-3
    """Adam learning rate of the critics and the temperature α (CleanRL)"""
    hidden_dim: Optional[int] = None
    """width of the task policy's and critics' hidden layers; default 256 for D4RL aliases (CleanRL), 128 otherwise
    (ours: a CPU's budget, as opal_cql.py)"""
    layers: int = 2
    """hidden layers of the task policy and of each critic (CleanRL)"""

    def __post_init__(self):
        for name in ("total_steps", "learning_starts", "buffer_size", "updates_per_step", "batch_size", "hidden_dim",
                     "layers", "max_episode_steps", "save_every", "log_every", "eval_every", "eval_episodes",
                     "eval_num_envs", "num_envs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.total_steps < self.num_envs:
            fail(f"--total-steps ({self.total_steps}) must be at least --num-envs ({self.num_envs}).")
        if self.eval_episodes_during < 0 or self.latent_margin < 0 or self.prior_start_steps < 0:
            fail("--eval-episodes-during, --latent-margin and --prior-start-steps cannot be negative.")
        if self.latent_bound_std <= 0 or not (0 < self.gamma <= 1) or not (0 < self.tau <= 1):
            fail("--latent-bound-std must be positive, --gamma and --tau in (0, 1].")
        if self.primitives == "opal" and not self.vae_ckpt and not self.resume:
            fail("--primitives opal needs --vae-ckpt runs/<opal_vae run>/opal_vae.pt (train one with opal_vae.py), "
                 "or use --primitives none for plain SAC.")
        if self.prior_kl_target is not None and self.primitives == "none":
            fail("--prior-kl-target needs the VAE's prior: it applies only with --primitives opal.")
        if self.vae_ckpt:  # saved in the checkpoint: resuming from another folder still finds it
            self.vae_ckpt = str(Path(self.vae_ckpt).resolve())


# ======================================================================================================================
# ALGORITHM: what to study. The latent action space (shared with opal_cql.py), the networks (shared word for word
# with the other scripts), the semi-MDP step that turns c environment steps into one transition, and SAC.
# ======================================================================================================================
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


def smdp_step(returns, steps, rewards, ended, gamma: float, c: int):
    """One environment step of every open high-level transition: R ← R + γ^k r, k ← k + 1. A transition closes
    when its primitive has run c steps or its episode ended inside it (k < c then). Returns (R, k, closed)."""
    returns = returns + gamma ** steps.float() * rewards
    steps = steps + 1
    return returns, steps, ended | (steps == c)


class ReplayBuffer:
    """High-level transitions (s, choice, R, s', done, k) in preallocated tensors on the device, written as a ring
    and sampled uniformly by index."""

    def __init__(self, capacity: int, obs_dim: int, choice_dim: int, device):
        shapes = {"states": (obs_dim,), "choices": (choice_dim,), "returns": (), "next_states": (obs_dim,),
                  "dones": (), "steps": ()}
        self.data = {name: torch.zeros(capacity, *shape, device=device) for name, shape in shapes.items()}
        self.capacity, self.size, self.position = capacity, 0, 0

    def add(self, **rows):
        rows_added = len(rows["states"])
        index = (self.position + torch.arange(rows_added, device=rows["states"].device)) % self.capacity
        for name, value in rows.items():
            self.data[name][index] = value.float()
        self.position = (self.position + rows_added) % self.capacity
        self.size = min(self.size + rows_added, self.capacity)

    def sample(self, batch_size: int, generator) -> dict:
        index = torch.randint(self.size, (batch_size,), device=self.data["states"].device, generator=generator)
        return {name: values[index] for name, values in self.data.items()}

    def state_dict(self) -> dict:
        return {"size": self.size, "position": self.position,
                **{name: values[:self.size].clone() for name, values in self.data.items()}}

    def load_state_dict(self, saved: dict):
        self.size, self.position = saved["size"], saved["position"]
        for name, values in self.data.items():
            values[:self.size] = saved[name].to(values.device)


class SAC:
    """Soft actor-critic in CleanRL's shape over choices: twin critics Q_1, Q_2 (one batched module, as in
    opal_cql.py) with Polyak-averaged targets Q̄_i, a tanh-Gaussian task policy π and a tuned temperature α. The
    policy pays α·log π(c|s) (SAC's entropy bonus), or with a prior α·(log π(z|s) - log ρ(z|s)), a one-sample
    KL(π || ρ) toward the VAE's prior (SPiRL); α is tuned so that the paid quantity stays near its target
    (-H̄ = dim of the choice, or the KL target δ). `update` is one gradient step of all of them."""

    def __init__(self, obs_dim, choice_low, choice_high, args, all_states, prior=None):
        device, choice_dim = all_states.device, len(choice_low)
        self.args, self.prior = args, prior
        self.task_policy = TanhGaussianPolicy(obs_dim, choice_dim, choice_low, choice_high, args.hidden_dim,
                                              args.layers).to(device)
        self.critics = Critics(obs_dim, choice_dim, args.hidden_dim, args.layers).to(device)
        for module in (self.task_policy, self.critics):
            module.normalize.fit(all_states)
        self.target_critics = copy.deepcopy(self.critics).requires_grad_(False)
        self.log_alpha = torch.zeros((), device=device, requires_grad=True)  # temperature α = 1 at first (CleanRL)
        # the level α holds the paid quantity near: E[log π] = -H̄ with SAC's H̄ = -dim, or E[KL(π || ρ)] = δ
        self.penalty_target = float(choice_dim) if prior is None else args.prior_kl_target
        self.optimizers = {
            "policy_optimizer": torch.optim.Adam(self.task_policy.parameters(), lr=args.policy_lr, fused=True),
            "critic_optimizer": torch.optim.Adam(self.critics.parameters(), lr=args.critic_lr, fused=True),
            "alpha_optimizer": torch.optim.Adam([self.log_alpha], lr=args.critic_lr)}
        # on a GPU the whole gradient step is recorded once as a CUDA graph and replayed (bookkeeping, below)
        self.graphed_step = GraphedUpdate(
            self.gradient_step, [self.task_policy, self.critics, self.target_critics], [self.log_alpha],
            self.optimizers.values(), args.cudagraph and device.type == "cuda")

    def penalty(self, s, choice, log_prob):
        """What the policy pays per choice: log π(c|s), or log π(z|s) - log ρ(z|s) toward the prior."""
        return log_prob if self.prior is None else log_prob - gaussian_log_prob(choice, *self.prior(s))

    def update(self, s, choice, reward, s_next, done, discount) -> dict:
        """One gradient step on B transitions (s, c, R, s', done, γ_hl); returns the losses (0-d tensors)."""
        return self.graphed_step(s, choice, reward, s_next, done, discount)

    def gradient_step(self, s, choice, reward, s_next, done, discount) -> dict:
        alpha = self.log_alpha.exp().detach()
        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            with torch.no_grad():  # y = R + γ_hl (1 - done) (min_i Q̄_i(s', c') - α penalty(c'|s')),  c' ~ π(·|s')
                next_choice, next_log_prob = self.task_policy(s_next)
                next_value = self.target_critics(s_next, next_choice).min(0).values
                next_value = next_value - alpha * self.penalty(s_next, next_choice, next_log_prob)
                target = reward + (1 - done) * discount * next_value
            q = self.critics(s, choice)  # (2 critics, B)
        critic_loss = ((q - target) ** 2).mean(1).sum()  # Σ_i E[(Q_i(s, c) - y)²]
        self.step("critic_optimizer", critic_loss)

        with torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=self.args.bf16):
            new_choice, log_prob = self.task_policy(s)  # c̃ ~ π(·|s), reparameterised
            penalty = self.penalty(s, new_choice, log_prob)
            policy_loss = (alpha * penalty - self.critics(s, new_choice).min(0).values).mean()
        self.step("policy_optimizer", policy_loss)
        # α rises while the policy pays more than its target (too little entropy, or too far from the prior)
        self.step("alpha_optimizer", -(self.log_alpha * (penalty.detach() - self.penalty_target)).mean())
        with torch.no_grad():  # Q̄ ← τ Q + (1 - τ) Q̄
            torch._foreach_lerp_(list(self.target_critics.parameters()), list(self.critics.parameters()),
                                 self.args.tau)
        return {"critic_loss": critic_loss, "policy_loss": policy_loss, "q": q.mean(), "alpha": alpha,
                "penalty": penalty.mean()}

    def step(self, optimizer_name: str, loss):
        optimizer = self.optimizers[optimizer_name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def state_dict(self) -> dict:
        return {"task_policy": self.task_policy.state_dict(), "critics": self.critics.state_dict(),
                "target_critics": self.target_critics.state_dict(), "log_alpha": self.log_alpha.detach().clone(),
                **{name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}}

    def load_state_dict(self, saved: dict):
        for name in ("task_policy", "critics", "target_critics"):
            getattr(self, name).load_state_dict(saved[name])
        with torch.no_grad():
            self.log_alpha.copy_(saved["log_alpha"])
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(saved[name])
        self.graphed_step.reset()  # the optimisers' state tensors are new: record the graph again


def start_from_prior(task_policy, prior, states, steps: int, batch_size: int, lr: float, seed: int):
    """Start π(z|s) as the prior ρ(z|s): SPiRL initialises its high-level policy with the skill prior's weights.
    Our π is a tanh-Gaussian in the latent box, another network, so it is fitted instead (ours): maximum likelihood
    of the prior's samples z ~ ρ(z|s) (kept inside the box) on the dataset's states. Returns E[log π(z|s)] on the
    first batch (before any step) and on the last."""
    optimizer = torch.optim.Adam(task_policy.parameters(), lr=lr)
    generator = torch.Generator(device=states.device).manual_seed(seed)
    low, high = task_policy.center - task_policy.half_range, task_policy.center + task_policy.half_range
    first = None
    for _ in range(steps):
        s = states[torch.randint(len(states), (batch_size,), device=states.device, generator=generator)]
        with torch.no_grad():
            mean, log_std = prior(s)
            noise = torch.randn(mean.shape, device=mean.device, generator=generator)
            z = (mean + log_std.exp() * noise).clamp(low, high)  # as the warm-up draws them
        loss = -task_policy.log_prob(s, z).mean()  # forward KL(ρ || π) up to ρ's entropy
        first = -loss.item() if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return first, -loss.item()


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. Datasets, checkpoints, run setup and logging, evaluation, and
# the training environments (seeded episodes that a resumed run replays).
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


class TrainingEnvs:
    """--num-envs copies of the evaluation task that collect experience. An episode ends at the goal (success), on
    the environment's termination or at its time limit; the ended copies are reset at once, each new episode from
    the next seed of a counter. Every copy keeps its current episode's seed and actions, so that a checkpoint stores
    where each one is and a resumed run replays them to the same MuJoCo state (`restore`): resuming continues the
    uninterrupted run exactly."""

    def __init__(self, dataset, layout, num_envs: int, first_seed: int, device, **make_kwargs):
        make = lambda: evaluation_env(dataset, **make_kwargs)
        self.envs = gym.vector.SyncVectorEnv([make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.layout, self.device, self.next_seed = layout, device, first_seed
        self.act_low, self.act_high = dataset.action_space.low, dataset.action_space.high
        self.episode_seeds, self.episode_actions = [None] * num_envs, [[] for _ in range(num_envs)]

    def states(self, observations) -> torch.Tensor:
        return torch.as_tensor(flatten_observation(observations, self.layout), device=self.device)

    def reset(self, mask: np.ndarray) -> torch.Tensor:
        """New episodes in the copies where `mask` holds; returns every copy's state."""
        seeds = [None] * len(mask)
        for i in np.flatnonzero(mask):
            seeds[i], self.episode_seeds[i], self.episode_actions[i] = self.next_seed, self.next_seed, []
            self.next_seed += 1
        observations, _ = self.envs.reset(seed=seeds, options={"reset_mask": mask})
        return self.states(observations)

    def step(self, actions: torch.Tensor):
        """(next states, rewards, dones, ended): done when the goal is reached or the env terminates (no bootstrap),
        ended also at the time limit."""
        actions = np.clip(actions.cpu().numpy(), self.act_low, self.act_high)
        for episode_actions, action in zip(self.episode_actions, actions):
            episode_actions.append(action)
        observations, rewards, terminated, truncated, info = self.envs.step(actions)
        success = np.asarray(info.get("success", np.zeros(len(actions), dtype=bool)), dtype=bool)
        done = terminated | success
        return (self.states(observations), torch.as_tensor(rewards, dtype=torch.float32, device=self.device),
                torch.as_tensor(done, dtype=torch.float32, device=self.device), done | truncated)

    def state_dict(self) -> dict:
        return {"next_seed": self.next_seed, "episode_seeds": list(self.episode_seeds),
                "episode_actions": [torch.as_tensor(np.array(actions, dtype=np.float32).reshape(len(actions),
                                                                                                 len(self.act_low)))
                                    for actions in self.episode_actions]}

    def restore(self, saved: dict) -> torch.Tensor:
        """Replay every copy's current episode from its seed: MuJoCo is deterministic, so each copy ends in the
        state it was saved in. Returns every copy's state."""
        self.next_seed = saved["next_seed"]
        observations = []
        for env, seed, actions in zip(self.envs.envs, saved["episode_seeds"], saved["episode_actions"]):
            observation, _ = env.reset(seed=seed)
            for action in actions.numpy():
                observation = env.step(action)[0]
            observations.append(flatten_observation(observation, self.layout))
        self.episode_seeds = list(saved["episode_seeds"])
        self.episode_actions = [list(actions.numpy()) for actions in saved["episode_actions"]]
        return torch.as_tensor(np.stack(observations), device=self.device)

    def close(self):
        self.envs.close()


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = resumed_args(args, "opal_online_sac") if args.resume else (None, args, None)

    # Setup: device, the task's dataset (its evaluation env and state statistics), the primitives
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering without a display
    device = setup_torch(args.seed, args.device)
    args.total_steps -= args.total_steps % args.num_envs
    args.eval_every = args.eval_every or max(1, args.total_steps // 10)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    args.hidden_dim = args.hidden_dim or (256 if dataset_id.startswith("D4RL/") else 128)
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
    make_kwargs = {}
    if args.dense_reward:
        if "reward_type" not in (dataset.env_spec.kwargs if dataset.env_spec is not None else {}):
            fail(f"--dense-reward needs a maze task with a reward_type; {dataset_id}'s environment has none.")
        make_kwargs["reward_type"] = "dense"
    if args.max_episode_steps:
        make_kwargs["max_episode_steps"] = args.max_episode_steps

    # The choice space: raw actions, or OPAL's latent box around the dataset's relabelled latents (as opal_cql.py)
    primitive_policy, prior = None, None
    if vae is None:
        choice_low = torch.as_tensor(act_low, dtype=torch.float32, device=device)
        choice_high = torch.as_tensor(act_high, dtype=torch.float32, device=device)
    else:
        encoder = Encoder(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"], vae["gru_layers"]).to(device)
        encoder.load_state_dict(vae["encoder"])
        starts = window_starts(data["episode_lengths"], c, stride=c).to(device)
        latents = encode_windows(encoder, data["observations"], data["actions"], starts, c)
        choice_low, choice_high = latent_box(latents, args.latent_bound, args.latent_bound_std, args.latent_margin)
        primitive_policy = PrimitivePolicy(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
        primitive_policy.load_state_dict(vae["primitive_policy"])
        prior = Prior(obs_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)  # warm-up latents, --prior-kl-target
        prior.load_state_dict(vae["prior"])
        for module in (primitive_policy, prior):
            module.requires_grad_(False)

    agent = SAC(obs_dim, choice_low, choice_high, args, data["observations"],
                prior if args.prior_kl_target is not None else None)
    # bf16 autocast if a probe measures it faster: the critics on a batch (states of the data, the box's middle)
    middle = ((choice_low + choice_high) / 2).expand(args.batch_size, -1)
    args.bf16 = use_bf16(args.bf16, device, lambda: agent.critics(data["observations"][:args.batch_size], middle).sum(),
                         resumed=resumed is not None, graphed=agent.graphed_step.enabled)

    config = {**asdict(args), "dataset_id": dataset_id, "c": c, "choice_low": choice_low.tolist(),
              "choice_high": choice_high.tolist()}
    run_dir, writer = open_run(args, config, resumed_dir)
    print(f"{dataset_id}'s evaluation task, {'dense' if args.dense_reward else 'sparse'} reward: SAC over "
          f"{'latent primitives' if vae is not None else 'raw actions'} (c = {c}), {args.total_steps} environment "
          f"steps on {args.num_envs} environments; run dir {run_dir}")
    if prior is not None and args.prior_start_steps and resumed is None:
        before, after = start_from_prior(agent.task_policy, prior, data["observations"], args.prior_start_steps,
                                         args.batch_size, args.policy_lr, args.seed + 1)
        print(f"task policy fitted to the prior ρ(z|s) in {args.prior_start_steps} steps: E[log π(z|s)] of the "
              f"prior's latents {before:.2f} -> {after:.2f}")
    buffer = ReplayBuffer(args.buffer_size, obs_dim, len(choice_low), device)
    envs = TrainingEnvs(dataset, layout, args.num_envs, args.seed + 1_000_000, device, **make_kwargs)
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    # each training env's open high-level transition: its first state s, choice, reward sum R and steps k so far
    start_states = torch.zeros(args.num_envs, obs_dim, device=device)
    choices = torch.zeros(args.num_envs, len(choice_low), device=device)
    returns = torch.zeros(args.num_envs, device=device)
    steps = torch.zeros(args.num_envs, dtype=torch.long, device=device)
    needs_choice = torch.ones(args.num_envs, dtype=torch.bool, device=device)
    checkpoint_path, summary, first_step, updates = run_dir / "opal_online_sac.pt", {}, 1, 0
    if resumed is None:
        states = envs.reset(np.ones(args.num_envs, dtype=bool))
    else:  # networks, optimisers, buffer, the open transitions, the envs' episodes, counters and generators
        agent.load_state_dict(resumed)
        buffer.load_state_dict(resumed["buffer"])
        start_states, choices, returns, steps, needs_choice = (resumed["open"][name].to(device) for name in (
            "start_states", "choices", "returns", "steps", "needs_choice"))
        states = envs.restore(resumed["envs"])
        torch.set_rng_state(resumed["rng"]["torch"])
        sampler.set_state(resumed["rng"]["sampler"])
        summary, first_step, updates = dict(resumed["summary"]), resumed["step"] + 1, resumed["updates"]

    def checkpoint(step: int, finished: bool = False):
        stop_if_not_finite_module(f"SAC step {step}", checkpoint_path, writer, task_policy=agent.task_policy,
                                  critics=agent.critics)
        save_checkpoint(checkpoint_path, {
            "script": "opal_online_sac", "args": asdict(args), "seed": args.seed, "dataset_id": dataset_id,
            "env_id": dataset.env_spec.id if dataset.env_spec is not None else None, "obs_layout": layout,
            "obs_dim": obs_dim, "act_dim": act_dim, "act_low": act_low.tolist(), "act_high": act_high.tolist(),
            "primitives": args.primitives, "c": c, "choice_dim": len(choice_low), "choice_low": choice_low.tolist(),
            "choice_high": choice_high.tolist(), "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.layers, **agent.state_dict(),
            "buffer": buffer.state_dict(), "envs": envs.state_dict(),
            "open": {"start_states": start_states, "choices": choices, "returns": returns, "steps": steps,
                     "needs_choice": needs_choice},
            "step": step, "updates": updates, "finished": finished, "summary": dict(summary),
            "rng": {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}})

    # SAC: every iteration steps all training envs once; a high-level transition closes after c steps (or at the
    # end of its episode), goes to the buffer and pays for --updates-per-step gradient updates
    evaluator = Evaluator(dataset, layout, c, args.eval_num_envs, writer, summary)
    loop = Loop("SAC", first_step, args.total_steps, args, writer, summary, checkpoint, checkpoint_path,
                stop_requested, show=("q", "alpha"), desc=f"SAC ({args.primitives})", stride=args.num_envs)
    update_time, start_time, start_updates = 0.0, time.time(), updates
    for global_step in loop:  # environment steps so far, over all training envs
        if needs_choice.any():  # a new high-level decision where the last one closed
            with torch.no_grad():
                if global_step <= args.learning_starts and prior is not None:  # warm-up: primitives the prior expects
                    mean, log_std = prior(states)
                    fresh = (mean + log_std.exp() * torch.randn_like(mean)).clamp(choice_low, choice_high)
                elif global_step <= args.learning_starts:  # warm-up without primitives: uniform random actions
                    fresh = choice_low + (choice_high - choice_low) * torch.rand_like(choices)
                else:
                    fresh = agent.task_policy(states)[0]
            start_states = torch.where(needs_choice[:, None], states, start_states)
            choices = torch.where(needs_choice[:, None], fresh, choices)
            returns, steps = returns.masked_fill(needs_choice, 0.0), steps.masked_fill(needs_choice, 0)
        with torch.no_grad():  # the primitive's mean action, as in evaluation; without primitives the choice itself
            actions = choices if primitive_policy is None else primitive_policy(states, choices)[0]
        next_states, rewards, dones, ended = envs.step(actions)
        ended_mask = torch.as_tensor(ended, device=device)
        rewards = args.reward_scale * rewards + args.reward_bias
        returns, steps, closed = smdp_step(returns, steps, rewards, ended_mask, args.gamma, c)
        buffer.add(states=start_states[closed], choices=choices[closed], returns=returns[closed],
                   next_states=next_states[closed], dones=dones[closed], steps=steps[closed])
        states = envs.reset(ended) if ended.any() else next_states
        needs_choice = closed

        losses = {}
        if global_step > args.learning_starts:
            update_start = time.time()
            for _ in range(args.updates_per_step * int(closed.sum())):
                batch = buffer.sample(args.batch_size, sampler)
                discounts = backup_discounts(batch["steps"], args.gamma, args.high_level_discount)
                losses = agent.update(batch["states"], batch["choices"], batch["returns"], batch["next_states"],
                                      batch["dones"], discounts)
                updates += 1
            update_time += time.time() - update_start
        if loop.passes(global_step, args.log_every):
            writer.add_scalar("charts/updates_per_second", (updates - start_updates) / (time.time() - start_time),
                              global_step)
            writer.add_scalar("charts/buffer_size", buffer.size, global_step)
        if loop.passes(global_step, args.eval_every) and global_step < args.total_steps and args.eval_episodes_during:
            evaluator(agent.task_policy, primitive_policy, global_step, args.eval_episodes_during,
                      args.seed + 10_000 + global_step)
        loop.end_of_step(global_step, losses)

    evaluator(agent.task_policy, primitive_policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    summary.update(updates=updates, updates_per_second=(updates - start_updates) / max(update_time, 1e-9))
    checkpoint(args.total_steps, finished=True)
    if args.capture_video:
        evaluator.video(agent.task_policy, primitive_policy, args.seed + 10_000, run_dir / "eval.mp4")
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    print(f"checkpoint: {checkpoint_path}")
    envs.close()
    evaluator.close()
    writer.close()

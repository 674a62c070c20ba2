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
CPU's; the paper gives neither for this use. A *choice* below is what the task policy outputs and the critics
score: the latent z with primitives (held for c steps), the raw action a without them (c = 1).

Run:    python opal_online_sac.py --vae-ckpt runs/<vae run>/opal_vae.pt          # SAC+OPAL, pointmaze-large's task
        python opal_online_sac.py --primitives none                              # plain SAC
        python opal_online_sac.py --env antmaze-large-diverse --vae-ckpt runs/<vae run>/opal_vae.pt
Reads:  a Minari dataset (--env or --dataset-id: its evaluation env, state statistics, and with primitives the
        latent box) and, with primitives, a finished opal_vae.pt
Writes: runs/opal_online_sac__<env>__<seed>__<time>/  opal_online_sac.pt (task policy, critics, replay buffer, the
        training environments' episodes, the primitive policy), TensorBoard events, config.json, eval.mp4

Reading order: `Args`; then ALGORITHM: the slicer and the networks, the latent action space, the semi-MDP step
`smdp_step`, the `SAC` update and the test-time execution; then `__main__` (setup → collect a high-level step →
update → evaluation). The bookkeeping (datasets, checkpoints, logging, replay buffer, environments): opal_utils.py.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import tyro

from opal_utils import (
    Evaluator, GraphedUpdate, Loop, ReplayBuffer, TrainingEnvs, agent_state_dict, check_checkpoint, dataset_fields,
    fail, load_agent_state_dict, load_dataset, load_upstream, open_run, print_summary, random_state,
    resolve_dataset_id, resume_progress, start_run, save_checkpoint, setup_torch, stop_if_not_finite_module,
    stop_signals, use_bf16
)


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
    """log losses (averaged since the last log), env steps/s and updates/s every this many environment steps"""
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
    """continue an interrupted run from its opal_online_sac.pt (or run directory), with its arguments and buffer"""

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
    gradient steps, so that it starts where the primitives are plausible (as SPiRL; 0: a fresh policy)"""
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
    """per-step discount γ inside a primitive's reward sum, and of the backup as --high-level-discount says (CleanRL)"""
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
# ALGORITHM: what to study. The slicer, the networks (shared word for word with the other scripts), the latent action
# space (shared with opal_cql.py), the semi-MDP step that turns c environment steps into one transition, and SAC.
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


def smdp_step(returns, steps, rewards, ended, gamma: float, c: int):
    """One environment step of every open high-level transition: R ← R + γ^k r, k ← k + 1. A transition closes
    when its primitive has run c steps or its episode ended inside it (k < c then). Returns (R, k, closed)."""
    returns = returns + gamma ** steps.float() * rewards
    steps = steps + 1
    return returns, steps, ended | (steps == c)


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

    # what a checkpoint holds (opal_utils.agent_state_dict): these modules and tensors, and the optimisers
    CHECKPOINTED = ("task_policy", "critics", "target_critics"), ("log_alpha",)


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
    resumed, args, resumed_dir = start_run(args, "opal_online_sac")  # --resume, or a new run

    # Setup: device, the task's dataset (its evaluation env and state statistics), the primitives
    device = setup_torch(args.seed, args.device, args.capture_video)
    args.total_steps -= args.total_steps % args.num_envs
    args.eval_every = args.eval_every or max(1, args.total_steps // 10)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    args.hidden_dim = args.hidden_dim or (256 if dataset_id.startswith("D4RL/") else 128)
    vae = None  # checked before the (possibly long) dataset load
    if args.primitives == "opal":
        vae = load_upstream(args.vae_ckpt, "opal_vae", args.allow_unfinished, dataset_id=dataset_id)
    dataset, layout, data = load_dataset(dataset_id, device)
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
        load_agent_state_dict(agent, resumed, *agent.CHECKPOINTED)
        buffer.load_state_dict(resumed["buffer"])
        start_states, choices, returns, steps, needs_choice = (resumed["open"][name].to(device) for name in (
            "start_states", "choices", "returns", "steps", "needs_choice"))
        states = envs.restore(resumed["envs"])
        (summary, first_step), updates = resume_progress(resumed, sampler), resumed["updates"]

    def checkpoint(step: int, finished: bool = False):
        stop_if_not_finite_module(f"SAC step {step}", checkpoint_path, writer, task_policy=agent.task_policy,
                                  critics=agent.critics)
        save_checkpoint(checkpoint_path, {
            "script": "opal_online_sac", "args": asdict(args), "seed": args.seed,
            **dataset_fields(dataset_id, dataset, layout, obs_dim, act_dim), "primitives": args.primitives, "c": c,
            "choice_dim": len(choice_low), "choice_low": choice_low.tolist(),
            "choice_high": choice_high.tolist(), "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.layers,
            **agent_state_dict(agent, *agent.CHECKPOINTED),
            "buffer": buffer.state_dict(), "envs": envs.state_dict(),
            "open": {"start_states": start_states, "choices": choices, "returns": returns, "steps": steps,
                     "needs_choice": needs_choice},
            "step": step, "updates": updates, "finished": finished, "summary": dict(summary),
            "rng": random_state(sampler)})

    # SAC: every iteration steps all training envs once; a high-level transition closes after c steps (or at the
    # end of its episode), goes to the buffer and pays for --updates-per-step gradient updates
    evaluator = Evaluator(dataset, layout, args.eval_num_envs, writer, summary)
    policy = HierarchicalPolicy(agent.task_policy, primitive_policy, c)  # what acts in the evaluation episodes
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
        next_states, rewards, dones, ended, episodes = envs.step(actions)
        for episode_return, reached in episodes:  # the training episodes that ended, as CleanRL logs them
            writer.add_scalar("charts/episodic_return", episode_return, global_step)
            writer.add_scalar("charts/episode_success", float(reached), global_step)
            summary["train_episodes"] = summary.get("train_episodes", 0) + 1
            summary["train_episodes_at_goal"] = summary.get("train_episodes_at_goal", 0) + int(reached)
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
            evaluator(policy, global_step, args.eval_episodes_during, args.seed + 10_000 + global_step)
        loop.end_of_step(global_step, losses)

    evaluator(policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    summary.update(updates=updates, updates_per_second=(updates - start_updates) / max(update_time, 1e-9))
    checkpoint(args.total_steps, finished=True)
    if args.capture_video:
        evaluator.video(policy, args.seed + 10_000, run_dir / "eval.mp4")
    print_summary(summary, checkpoint_path)
    envs.close()
    evaluator.close()
    writer.close()

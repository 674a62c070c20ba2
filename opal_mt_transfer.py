"""OPAL, transfer: multi-task PPO on Meta-World MT10 / MT50 with primitives learned from pick-and-place data.

OPAL (Ajay et al., ICLR 2021, Section 4.4 and its Meta-World table) learns primitives (c = 5) from expert
pick-and-place episodes with `opal_vae.py`, then trains one multi-task policy on many manipulation tasks whose
action is a latent z, held for c steps through the frozen primitive policy π_θ(a|s,z). Proximal policy optimisation
(PPO; Schulman et al., 2017) learns that task policy π_ψ(z|s, task) from on-policy rollouts of all tasks at once:
each high-level step is (s, z, R = Σ_{t<c} γ^t r_t, s'), its advantage computed by GAE over high-level steps.
`--primitives none` is the same PPO on raw actions (c = 1), the baseline. The task policy sees Meta-World's state and
the one-hot task id; the primitive policy sees the state alone, as in pick-and-place (see `held_choice_actions`).
The task policy's output is read relative to the VAE's prior ρ(z|s), z = μ_ρ(s) + σ_ρ(s) u (`ChoiceSpace`; ours),
so that the untrained policy draws the primitives the pick-and-place data would use from each state.

A *choice* below is what the task policy outputs: the latent z with primitives (held for c steps), the raw action a
without them (c = 1). The same code handles both. The PPO is CleanRL's `ppo_continuous_action.py` (its defaults
unless marked "ours"); the paper gives the transfer's algorithm, not its settings.

Run:    python collect_data.py --env metaworld-pick-place                       # (or let opal_vae.py make it)
        python opal_vae.py --env metaworld-pick-place --c 5
        python opal_mt_transfer.py --benchmark MT10 --vae-ckpt runs/<vae run>/opal_vae.pt    # PPO+OPAL
        python opal_mt_transfer.py --benchmark MT10 --primitives none                        # plain multi-task PPO
Reads:  with primitives, a finished opal_vae.pt of Meta-World data and that dataset (for the latent box)
Writes: runs/opal_mt_transfer__<benchmark>__<seed>__<time>/  opal_mt_transfer.pt (task policy, critic, the
        primitive policy it drives), TensorBoard events, config.json, eval.mp4 with --capture-video

Reading order: `Args`; then ALGORITHM: the slicer, the networks, the latent action space, one rollout of held
choices (`collect_rollout`), GAE (`generalized_advantages`), the PPO losses (`ppo_update`) and the test-time execution
(`HeldChoicePolicy`); then `__main__` (setup → rollout → advantages → update → evaluation). A short BOOKKEEPING
section loads the primitives; Meta-World's environments, checkpoints, logging and evaluation are in opal_utils.py.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro

from opal_utils import (
    Loop, MetaWorldEvaluator, environment_rngs, fail, load_dataset, load_upstream, make_benchmark, open_run,
    print_summary, random_state, record_video, restore_environment_rngs, resume_progress, start_run,
    save_checkpoint, setup_torch, stop_if_not_finite, stop_if_not_finite_module, stop_signals, task_names
)


STATE_DIM, ACTION_DIM = 39, 4  # Meta-World v3: every task's state and the arm's action (x, y, z, gripper)
EPISODE_LENGTH = 500  # Meta-World's episode length


@dataclass
class Args:
    exp_name: str = "opal_mt_transfer"
    """name of this experiment, the first part of the run directory's name"""
    seed: int = 1
    """seed of torch and numpy, and of the training environments (evaluation environments use seed + 10,000)"""
    benchmark: Literal["MT10", "MT50"] = "MT10"
    """Meta-World's multi-task benchmark: 10 or 50 tasks, one environment each, a new goal drawn every episode"""
    vae_ckpt: Optional[str] = None
    """opal_vae.pt trained on Meta-World data (e.g. --env metaworld-pick-place --c 5); required with --primitives opal"""
    allow_unfinished: bool = False
    """accept a --vae-ckpt whose run did not finish (stopped before its last step); refused otherwise"""
    primitives: Literal["opal", "none"] = "opal"
    """opal: PPO over latent primitives; none: plain multi-task PPO over raw actions (c = 1), the baseline"""
    track: bool = False
    """log to Weights & Biases (WANDB_MODE=offline works without an account)"""
    wandb_project_name: str = "opal"
    """the wandb project"""
    wandb_entity: Optional[str] = None
    """the wandb entity (team)"""
    capture_video: bool = False
    """write eval.mp4 of one evaluation episode of --video-task at the end (headless: MUJOCO_GL=egl)"""
    video_task: str = "pick-place-v3"
    """the benchmark's task shown by --capture-video"""
    device: str = "auto"
    """torch device: auto (cuda if available), cpu, cuda, ..."""
    runs_dir: str = "runs"
    """folder that receives the run directory"""
    save_every: int = 500_000
    """write the checkpoint every this many environment steps (and at the end or on Ctrl-C)"""
    log_every: int = 50_000
    """log losses and steps/s every this many environment steps (at the end of a PPO iteration)"""
    eval_every: Optional[int] = None
    """evaluate every this many environment steps with --eval-episodes-during episodes per task; default
    total_steps // 10"""
    eval_episodes: int = 50
    """evaluation episodes per task at the end (Meta-World's protocol: one per training goal, 50 per task)"""
    eval_episodes_during: int = 10
    """evaluation episodes per task at each intermediate evaluation (ours: a fifth of the protocol's, for a CPU)"""
    vector_strategy: Literal["sync", "async"] = "sync"
    """how the benchmark's environments step: in this process, or one subprocess each"""
    episode_length: int = EPISODE_LENGTH
    """steps per training and evaluation episode (Meta-World: 500; lower only for quick tests); a multiple of c"""
    resume: Optional[str] = None
    """continue an interrupted run from its opal_mt_transfer.pt (or run directory), with the arguments saved in it"""

    # the latent action space: as opal_cql.py builds it from the VAE's own data
    latent_bound: Literal["minmax", "std"] = "minmax"
    """the choices' latent box: min/max of the relabelled latents, or their mean ± --latent-bound-std stds"""
    latent_bound_std: float = 2.0
    """half-width of the std box, in standard deviations of the relabelled latents (ours)"""
    latent_margin: float = 0.0
    """widen the latent box by this fraction of its width on each side (ours)"""
    choice_space: Literal["prior", "box"] = "prior"
    """prior: the task policy's output u means z = μ_ρ(s) + σ_ρ(s) u, relative to the VAE's prior, so the untrained
    policy draws z ~ ρ(z|s) (ours, by measurement); box: z = u; either clipped into the latent box"""
    high_level_discount: Literal["decision", "window"] = "decision"
    """decision: γ per high-level decision (SPiRL, SUPE; as opal_cql.py); window: γ^c for a window of c steps"""

    # PPO; defaults are CleanRL's ppo_continuous_action.py unless marked "ours"
    total_steps: int = 2_000_000
    """environment steps over all tasks (ours: a CPU's budget; each PPO iteration is one episode of every task)"""
    learning_rate: float = 3e-4
    """Adam learning rate, annealed linearly to 0 with --anneal-lr (CleanRL)"""
    anneal_lr: bool = True
    """anneal the learning rate linearly over the run (CleanRL)"""
    gamma: float = 0.99
    """per-step discount γ inside a window's reward sum, and of the advantage as --high-level-discount says (CleanRL)"""
    gae_lambda: float = 0.95
    """λ of generalised advantage estimation (CleanRL)"""
    num_minibatches: int = 32
    """minibatches per epoch over one iteration's high-level steps (CleanRL)"""
    update_epochs: int = 10
    """epochs over each iteration's rollout (CleanRL)"""
    clip_coef: float = 0.2
    """clip ε of the surrogate objective and of the value loss (CleanRL)"""
    ent_coef: float = 0.0
    """entropy bonus weight (CleanRL)"""
    vf_coef: float = 0.5
    """value loss weight (CleanRL)"""
    max_grad_norm: float = 0.5
    """gradient norm clip (CleanRL)"""
    target_kl: Optional[float] = None
    """stop an iteration's epochs early when the approximate KL to the rollout policy exceeds this (CleanRL: off)"""
    hidden_dim: int = 256
    """width of the two hidden layers of the actor and of the critic (ours; CleanRL: 64 for one task; Meta-World's
    MT-SAC reference uses 400)"""

    def __post_init__(self):
        for name in ("total_steps", "save_every", "log_every", "eval_every", "eval_episodes", "num_minibatches",
                     "update_epochs", "hidden_dim", "episode_length"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.eval_episodes_during < 0 or not 0 < self.gamma <= 1 or not 0 <= self.gae_lambda <= 1:
            fail("--eval-episodes-during cannot be negative, --gamma must be in (0, 1] and --gae-lambda in [0, 1].")
        if self.primitives == "opal" and not self.vae_ckpt and not self.resume:
            fail("--primitives opal needs --vae-ckpt runs/<opal_vae run>/opal_vae.pt, trained on Meta-World data "
                 "(python opal_vae.py --env metaworld-pick-place --c 5), or use --primitives none for plain PPO.")
        if self.vae_ckpt:  # saved in opal_mt_transfer.pt: resuming from another folder still finds it
            self.vae_ckpt = str(Path(self.vae_ckpt).resolve())


# ======================================================================================================================
# ALGORITHM: what to study. The slicer, the networks, the latent action space (shared with opal_cql.py), a rollout of
# choices held for c steps, GAE over high-level steps, the PPO update and the test-time execution.
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


def layer_init(layer: nn.Linear, std: float = math.sqrt(2), bias=0.0) -> nn.Linear:
    """CleanRL's initialisation: orthogonal weights of gain `std`, constant biases."""
    nn.init.orthogonal_(layer.weight, std)
    with torch.no_grad():
        layer.bias.copy_(torch.as_tensor(bias, dtype=layer.bias.dtype).expand_as(layer.bias))
    return layer


class RunningNormalizer(nn.Module):
    """Running mean and variance of everything passed to `update` (Chan et al.'s parallel update, as CleanRL's
    NormalizeObservation wrapper keeps them); `forward` standardises and clips to ±10."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("count", torch.tensor(1e-4))

    def update(self, x: torch.Tensor):  # (B, dim)
        batch_mean, batch_var, batch_count = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, total = batch_mean - self.mean, self.count + batch_count
        self.var.copy_((self.var * self.count + batch_var * batch_count + delta ** 2 * self.count * batch_count / total)
                       / total)
        self.mean.add_(delta * batch_count / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var + 1e-8).sqrt()).clamp(-10.0, 10.0)


class ActorCritic(nn.Module):
    """CleanRL's continuous PPO agent: an actor MLP for the mean of a Gaussian over choices with a state-independent
    log-std, and a critic MLP for V(s), both with tanh and orthogonal initialisation. It reads states standardised
    by the rollout's `RunningNormalizer`, as CleanRL's agent reads its wrapper's. The actor's mean starts at
    `centre` (ours): 0 for choices relative to the prior and for raw actions, the latent box's centre otherwise."""

    def __init__(self, obs_dim: int, choice_dim: int, hidden_dim: int, centre: torch.Tensor):
        super().__init__()
        hidden = lambda: [layer_init(nn.Linear(obs_dim, hidden_dim)), nn.Tanh(),
                          layer_init(nn.Linear(hidden_dim, hidden_dim)), nn.Tanh()]
        self.critic = nn.Sequential(*hidden(), layer_init(nn.Linear(hidden_dim, 1), std=1.0))
        self.actor_mean = nn.Sequential(*hidden(), layer_init(nn.Linear(hidden_dim, choice_dim), std=0.01,
                                                               bias=centre))
        self.actor_logstd = nn.Parameter(torch.zeros(1, choice_dim))

    def choice_and_value(self, states, choices=None):
        """(choice ~ π(·|s) unless given, log π(choice|s), entropy, V(s)) for a batch of standardised states."""
        mean = self.actor_mean(states)
        # (validate_args=False: a NaN reaches the losses, where the training loop stops on it with a message)
        policy = torch.distributions.Normal(mean, self.actor_logstd.expand_as(mean).exp(), validate_args=False)
        choices = policy.sample() if choices is None else choices
        return choices, policy.log_prob(choices).sum(-1), policy.entropy().sum(-1), self.critic(states).squeeze(-1)


class RewardScaler(nn.Module):
    """CleanRL's NormalizeReward: each environment's rewards are divided by the running standard deviation of its
    discounted return Σ γ_hl^k R_k (kept per environment, restarted at episode ends) and clipped to ±10."""

    def __init__(self, num_envs: int):
        super().__init__()
        self.stats = RunningNormalizer(1)
        self.register_buffer("returns", torch.zeros(num_envs))

    def forward(self, rewards, discounts, dones):
        self.returns.copy_(self.returns * discounts + rewards)
        self.stats.update(self.returns[:, None])
        self.returns.mul_(1.0 - dones)
        return (rewards / (self.stats.var[0] + 1e-8).sqrt()).clamp(-10.0, 10.0)


class ChoiceSpace:
    """How the task policy's output u becomes the choice that is held. With primitives and --choice-space prior,
    u is read relative to the VAE's prior: z = μ_ρ(s) + σ_ρ(s) ⊙ u (ours), so the untrained policy (u ~ N(0, I))
    draws z ~ ρ(z|s), the primitives the pick-and-place data would use from s; with --choice-space box (and for raw
    actions) the choice is u. Either is clipped into its box: the latent box, or the action bounds."""

    def __init__(self, low, high, prior=None):
        self.low, self.high, self.prior = low, high, prior

    def __call__(self, states, choices):
        if self.prior is not None:
            mean, log_std = self.prior(states[:, :STATE_DIM])
            choices = mean + log_std.exp() * choices
        return choices.clamp(self.low, self.high)


def held_choice_actions(primitive_policy, states, choices):
    """The environment action for a held choice: the primitive policy's mean action π_θ(a|s, z) on Meta-World's
    39-d state, without the one-hot task id the benchmark appends (ours, as the public OPAL re-implementation
    does: the primitives were learnt on pick-and-place, which had no task id, and a primitive says how to move
    the arm from where it is, whatever the task; which primitive, the task policy decides from the id); without
    primitives the choice itself. Clipped to the action bounds [-1, 1]."""
    actions = choices if primitive_policy is None else primitive_policy(states[:, :STATE_DIM], choices)[0]
    return actions.clamp(-1.0, 1.0)


@torch.no_grad()
def collect_rollout(envs, agent, obs_normalizer, reward_scaler, primitive_policy, c, choice_space, gamma, discount,
                    device):
    """One episode in every environment of the benchmark. At every high-level step k the task policy samples a
    choice per environment, `choice_space` makes it a latent (or an action) in its box, which is held for c
    environment steps, and the step's reward is R_k = Σ_{t<c} γ^t r_t. Training episodes last a multiple of c steps
    and never end early, so every environment's decisions and episode end align. Returns the high-level steps as
    tensors (T, N, ·): standardised states, the policy's outputs, log π_old(output|s), V_old(s), scaled rewards and
    dones; and every environment's episode return and success (at any step)."""
    observations, _ = envs.reset()
    states = torch.as_tensor(observations, dtype=torch.float32, device=device)
    num_envs = len(states)
    rollout = {name: [] for name in ("states", "choices", "log_probs", "values", "rewards", "dones")}
    episode_return, success = np.zeros(num_envs), np.zeros(num_envs, dtype=bool)
    ended = np.zeros(num_envs, dtype=bool)
    while not ended.any():
        obs_normalizer.update(states)  # as CleanRL's NormalizeObservation: the statistics first see the state
        normalized = obs_normalizer(states)
        choices, log_probs, _, values = agent.choice_and_value(normalized)
        held = choice_space(states, choices)
        window_reward = torch.zeros(num_envs, device=device)
        for t in range(c):  # the primitive runs c steps: R = Σ_{t<c} γ^t r_t
            actions = held_choice_actions(primitive_policy, states, held)
            observations, rewards, terminated, truncated, info = envs.step(actions.cpu().numpy())
            states = torch.as_tensor(observations, dtype=torch.float32, device=device)
            window_reward += gamma ** t * torch.as_tensor(rewards, dtype=torch.float32, device=device)
            episode_return += rewards
            success |= np.asarray(info["success"]) > 0
            ended = terminated | truncated
            if ended.any() and (t < c - 1 or not ended.all()):
                raise RuntimeError("an episode ended inside a high-level step: episodes must last a multiple of c")
        dones = torch.as_tensor(ended, dtype=torch.float32, device=device)
        rewards = reward_scaler(window_reward, discount, dones)
        for name, value in zip(rollout, (normalized, choices, log_probs, values, rewards, dones)):
            rollout[name].append(value)
    return {name: torch.stack(values) for name, values in rollout.items()}, episode_return, success


def generalized_advantages(rewards, values, dones, discount, last_values, lam: float):
    """GAE (Schulman et al., 2016) over high-level steps k of (T, N) tensors, d_k: the episode ended after step k:
        δ_k = R_k + γ_hl (1 - d_k) V(s_{k+1}) - V(s_k),   A_k = δ_k + γ_hl λ (1 - d_k) A_{k+1}
    V(s_T) = `last_values`. An episode's end, Meta-World's time limit included, is not bootstrapped (as CleanRL).
    Returns (advantages, the value targets A + V)."""
    advantages = torch.zeros_like(rewards)
    next_advantage, next_values = torch.zeros_like(last_values), last_values
    for k in reversed(range(len(rewards))):
        not_done = 1.0 - dones[k]
        delta = rewards[k] + discount * not_done * next_values - values[k]
        next_advantage = delta + discount * lam * not_done * next_advantage
        advantages[k], next_values = next_advantage, values[k]
    return advantages, advantages + values


def clipped_surrogate_loss(advantages, log_ratio, clip: float):
    """PPO's clipped objective (Schulman et al., 2017, Eq. 7), negated to a loss: with ρ = π(c|s) / π_old(c|s),
    E[max(-A ρ, -A clip(ρ, 1 - ε, 1 + ε))]."""
    ratio = log_ratio.exp()
    return torch.max(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)).mean()


def clipped_value_loss(values, old_values, targets, clip: float):
    """CleanRL's clipped value loss: ½ E[max((V - G)², (V_old + clip(V - V_old, -ε, ε) - G)²)]."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    return 0.5 * torch.max((values - targets) ** 2, (clipped - targets) ** 2).mean()


def annealed_learning_rate(iteration: int, num_iterations: int, learning_rate: float) -> float:
    """CleanRL's linear annealing for iteration i = 1 .. I: lr_i = (1 - (i - 1) / I) lr, from lr down to lr / I."""
    return (1.0 - (iteration - 1) / num_iterations) * learning_rate


def ppo_update(agent, optimizer, batch: dict, args) -> dict:
    """--update-epochs passes over one iteration's high-level steps (flat (T N, ·) tensors), each in
    --num-minibatches shuffled minibatches: loss = L_clip - c_ent H + c_v L_V with advantages standardised per
    minibatch and the gradient norm clipped (CleanRL). Returns the losses of the last minibatch (0-d tensors)."""
    size = len(batch["states"])
    minibatch = max(2, size // args.num_minibatches)
    bounds = list(range(0, size, minibatch)) + [size]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:  # a last minibatch of one row (its advantages' std is NaN)
        del bounds[-2]  # joins the one before it
    for _ in range(args.update_epochs):
        order = torch.randperm(size, device=batch["states"].device)
        for start, end in zip(bounds[:-1], bounds[1:]):
            index = order[start:end]
            _, log_probs, entropy, values = agent.choice_and_value(batch["states"][index], batch["choices"][index])
            log_ratio = log_probs - batch["log_probs"][index]
            advantages = batch["advantages"][index]
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
            policy_loss = clipped_surrogate_loss(advantages, log_ratio, args.clip_coef)
            value_loss = clipped_value_loss(values, batch["values"][index], batch["returns"][index], args.clip_coef)
            loss = policy_loss - args.ent_coef * entropy.mean() + args.vf_coef * value_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(agent.parameters(), args.max_grad_norm)
            optimizer.step()
            with torch.no_grad():  # CleanRL's estimator of KL(π_old || π): E[(ρ - 1) - log ρ]
                approx_kl = ((log_ratio.exp() - 1.0) - log_ratio).mean()
                clip_fraction = ((log_ratio.exp() - 1.0).abs() > args.clip_coef).float().mean()
        if args.target_kl is not None and approx_kl > args.target_kl:
            break
    return {"policy_loss": policy_loss.detach(), "value_loss": value_loss.detach(), "entropy": entropy.mean().detach(),
            "approx_kl": approx_kl, "clip_fraction": clip_fraction}


class HeldChoicePolicy:
    """The task policy as Meta-World's evaluation expects an agent (`eval_action`, `reset`): the actor's mean choice
    (deterministic), held for c steps per environment through the primitive policy; a new choice where an episode
    starts or the last choice has run its c steps."""

    def __init__(self, agent, obs_normalizer, primitive_policy, c, choice_space, device):
        self.agent, self.obs_normalizer, self.primitive_policy, self.c = agent, obs_normalizer, primitive_policy, c
        self.choice_space, self.device, self.held_for, self.choices = choice_space, device, None, None

    def reset(self, env_mask):
        mask = np.asarray(env_mask, dtype=bool)
        if self.held_for is None or len(self.held_for) != len(mask):  # another set of environments
            self.held_for, self.choices = np.full(len(mask), self.c), None
        self.held_for[mask] = self.c

    @torch.no_grad()
    def eval_action(self, observations):
        states = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=self.device)
        due = self.held_for >= self.c
        if due.any():  # the task policy runs only at a decision (for every environment at once)
            fresh = self.choice_space(states, self.agent.actor_mean(self.obs_normalizer(states)))
            mask = torch.as_tensor(due, device=self.device)[:, None]
            self.choices = fresh if self.choices is None else torch.where(mask, fresh, self.choices)
        self.held_for = np.where(due, 1, self.held_for + 1)
        return held_choice_actions(self.primitive_policy, states, self.choices).cpu().numpy()


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. The primitives and their latent box, loaded from a VAE
# checkpoint and its dataset (the rest of the bookkeeping is in opal_utils.py).
# ======================================================================================================================
def primitives_and_latent_box(vae: dict, args, device):
    """The frozen primitive policy and prior of `vae` and the latent box, computed as opal_cql.py computes it:
    the VAE's own dataset relabelled with its encoder, windows of stride c, z = μ_φ(τ)."""
    _, _, data = load_dataset(vae["dataset_id"], device)
    starts = window_starts(data["episode_lengths"], vae["c"], stride=vae["c"]).to(device)
    encoder = Encoder(STATE_DIM, ACTION_DIM, vae["latent_dim"], vae["hidden_dim"], vae["gru_layers"]).to(device)
    encoder.load_state_dict(vae["encoder"])
    latents = encode_windows(encoder, data["observations"], data["actions"], starts, vae["c"])
    choice_low, choice_high = latent_box(latents, args.latent_bound, args.latent_bound_std, args.latent_margin)
    primitive_policy = PrimitivePolicy(STATE_DIM, ACTION_DIM, vae["latent_dim"], vae["hidden_dim"]).to(device)
    primitive_policy.load_state_dict(vae["primitive_policy"])
    prior = Prior(STATE_DIM, vae["latent_dim"], vae["hidden_dim"]).to(device)
    prior.load_state_dict(vae["prior"])
    return primitive_policy.requires_grad_(False), prior.requires_grad_(False), choice_low, choice_high


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = start_run(args, "opal_mt_transfer")  # --resume, or a new run

    # Setup: device, the primitives and their latent box, the benchmark's training and evaluation environments
    device = setup_torch(args.seed, args.device, args.capture_video)
    vae, primitive_policy, prior, c = None, None, None, 1
    if args.primitives == "opal":
        vae = load_upstream(args.vae_ckpt, "opal_vae", args.allow_unfinished)
        if (vae["obs_dim"], vae["act_dim"]) != (STATE_DIM, ACTION_DIM):
            fail(f"{args.vae_ckpt} was trained on {vae['dataset_id']} ({vae['obs_dim']}-d states, {vae['act_dim']}-d "
                 f"actions); Meta-World's primitives need its {STATE_DIM}-d states and {ACTION_DIM}-d actions: train "
                 "one with python opal_vae.py --env metaworld-pick-place --c 5.")
        c = vae["c"]
    if args.episode_length % c:
        fail(f"--episode-length {args.episode_length} is not a multiple of the primitives' c = {c}: every episode "
             "must end where a primitive ends.")
    if vae is not None:
        primitive_policy, prior, choice_low, choice_high = primitives_and_latent_box(vae, args, device)
    else:  # plain PPO: the choice is the action, its box the action bounds
        choice_low, choice_high = -torch.ones(ACTION_DIM, device=device), torch.ones(ACTION_DIM, device=device)
    print(f"making Meta-World {args.benchmark} twice (training, evaluation); this takes a while")
    envs = make_benchmark(args.benchmark, args.seed, args.episode_length, args.vector_strategy,
                          gym.vector.AutoresetMode.DISABLED)
    eval_envs = make_benchmark(args.benchmark, args.seed + 10_000, args.episode_length, args.vector_strategy,
                               gym.vector.AutoresetMode.SAME_STEP)  # (what Meta-World's evaluation expects)
    names, obs_dim, num_envs = task_names(envs), envs.single_observation_space.shape[0], envs.num_envs
    if args.capture_video and args.video_task not in names:
        fail(f"--video-task {args.video_task} is not a task of {args.benchmark}: {', '.join(names)}.")
    steps_per_iteration = num_envs * args.episode_length  # one episode of every task
    args.total_steps = max(steps_per_iteration, args.total_steps - args.total_steps % steps_per_iteration)
    args.eval_every = args.eval_every or max(1, args.total_steps // 10)
    num_iterations = args.total_steps // steps_per_iteration

    config = {**asdict(args), "c": c, "tasks": names, "obs_dim": obs_dim, "choice_low": choice_low.tolist(),
              "choice_high": choice_high.tolist(), "iterations": num_iterations}
    run_dir, writer = open_run(args, config, resumed_dir, env_name=args.benchmark)
    print(f"{args.benchmark}: {num_envs} tasks, state {obs_dim}-d with the task id, c = {c}; {args.total_steps} "
          f"environment steps = {num_iterations} PPO iterations of {steps_per_iteration // c} high-level steps; "
          f"run dir {run_dir}")
    choice_space = ChoiceSpace(choice_low, choice_high, prior if args.choice_space == "prior" else None)
    centre = torch.zeros_like(choice_low) if choice_space.prior is not None else (choice_low + choice_high) / 2
    agent = ActorCritic(obs_dim, len(choice_low), args.hidden_dim, centre).to(device)
    obs_normalizer, reward_scaler = RunningNormalizer(obs_dim).to(device), RewardScaler(num_envs).to(device)
    optimizer = torch.optim.Adam(agent.parameters(), lr=args.learning_rate, eps=1e-5, fused=True)  # CleanRL's eps
    discount = backup_discounts(torch.tensor(c, device=device), args.gamma, args.high_level_discount)
    checkpoint_path, summary, first_step = run_dir / "opal_mt_transfer.pt", {}, 1
    if resumed is not None:  # networks, statistics, optimiser, the environments' generators, the step counter
        for module, key in ((agent, "agent"), (obs_normalizer, "obs_normalizer"), (reward_scaler, "reward_scaler"),
                            (optimizer, "optimizer")):
            module.load_state_dict(resumed[key])
        restore_environment_rngs(envs, resumed["envs"])
        restore_environment_rngs(eval_envs, resumed["eval_envs"])
        summary, first_step = resume_progress(resumed)

    def checkpoint(step: int, finished: bool = False):
        stop_if_not_finite_module(f"PPO step {step}", checkpoint_path, writer, agent=agent)
        save_checkpoint(checkpoint_path, {
            "script": "opal_mt_transfer", "args": asdict(args), "seed": args.seed, "benchmark": args.benchmark,
            "env_id": f"Meta-World/{args.benchmark}", "tasks": names, "obs_layout": [], "obs_dim": obs_dim,
            "act_dim": ACTION_DIM, "act_low": [-1.0] * ACTION_DIM, "act_high": [1.0] * ACTION_DIM,
            "primitives": args.primitives, "c": c,
            "choice_dim": len(choice_low), "choice_low": choice_low.tolist(), "choice_high": choice_high.tolist(),
            "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "dataset_id": vae["dataset_id"] if vae is not None else None,  # the primitives' data; PPO has none
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "prior": prior.state_dict() if choice_space.prior is not None else None,
            "policy_hidden_dim": args.hidden_dim, "agent": agent.state_dict(),
            "obs_normalizer": obs_normalizer.state_dict(), "reward_scaler": reward_scaler.state_dict(),
            "optimizer": optimizer.state_dict(), "envs": environment_rngs(envs), "eval_envs": environment_rngs(eval_envs),
            "step": step, "finished": finished, "summary": dict(summary), "rng": random_state()})

    # PPO: every iteration collects one episode of every task, computes GAE over its high-level steps and updates
    policy = HeldChoicePolicy(agent, obs_normalizer, primitive_policy, c, choice_space, device)
    evaluator = MetaWorldEvaluator(eval_envs, names, writer, summary)
    loop = Loop("PPO", first_step, args.total_steps, args, writer, summary, checkpoint, checkpoint_path,
                stop_requested, show=("value_loss", "approx_kl"), desc=f"PPO ({args.primitives}, {args.benchmark})",
                stride=steps_per_iteration, optimizer=optimizer)
    for global_step in loop:  # environment steps so far, over all tasks
        iteration = global_step // steps_per_iteration
        if args.anneal_lr:
            optimizer.param_groups[0]["lr"] = annealed_learning_rate(iteration, num_iterations, args.learning_rate)
        rollout, episode_return, success = collect_rollout(envs, agent, obs_normalizer, reward_scaler,
                                                           primitive_policy, c, choice_space, args.gamma, discount,
                                                           device)
        advantages, returns = generalized_advantages(rollout["rewards"], rollout["values"], rollout["dones"],
                                                     discount, torch.zeros(num_envs, device=device), args.gae_lambda)
        batch = {name: value.flatten(0, 1) for name, value in  # (T N, ·): high-level steps of all tasks
                 {**rollout, "advantages": advantages, "returns": returns}.items()}
        losses = ppo_update(agent, optimizer, batch, args)
        stop_if_not_finite({name: value.item() for name, value in losses.items()}, f"PPO iteration {iteration}",
                           checkpoint_path, writer)  # (one check an iteration: an iteration is thousands of steps)
        writer.add_scalar("charts/train_success_rate", success.mean(), global_step)
        writer.add_scalar("charts/episodic_return", episode_return.mean(), global_step)
        if loop.passes(global_step, args.eval_every) and global_step < args.total_steps and args.eval_episodes_during:
            evaluator(policy, global_step, args.eval_episodes_during)
        loop.end_of_step(global_step, losses)

    evaluator(policy, args.total_steps, args.eval_episodes)
    checkpoint(args.total_steps, finished=True)
    if args.capture_video:
        record_video(args.video_task, names, policy, args.seed + 10_000, args.episode_length, run_dir / "eval.mp4")
    print_summary(summary, checkpoint_path)
    envs.close()
    eval_envs.close()
    writer.close()

"""OPAL, step 2 without rewards: few-shot imitation. A handful of demonstrations, imitated as primitives.

OPAL (Ajay et al., ICLR 2021, Section 4.2 and Table 2) imitates a task from a few demonstrations and the undirected
dataset its primitives were learned on: every length-c window τ of the demonstrations (stride 1) is relabelled with
the encoder of `opal_vae.py` as z = μ_φ(τ); the primitive policy π_θ(a|s,z) is fine-tuned on the demonstrations'
(s_t, a_t, z) by behaviour cloning; and the task policy π_ψ(z|s) is trained by maximum likelihood on (s_0, z), so
that it picks one primitive every c steps. `--primitives none` is plain BC of π_ψ(a|s) on the same demonstrations'
raw actions (c = 1), the paper's baseline. Ours: the task policy is a tanh-Gaussian in a box around the
demonstrations' latents, the fine-tuning's budget and learning rate (the paper gives neither).

A *choice* below is what the task policy outputs: the latent z with primitives (held for c steps), the raw action a
without them (c = 1). The same code handles both.

Run:    python opal_fewshot_il.py --vae-ckpt runs/<vae run>/opal_vae.pt        # BC+OPAL, pointmaze-large, 10 demos
        python opal_fewshot_il.py --primitives none                            # plain BC on the same demos
        python opal_fewshot_il.py --env antmaze-large-diverse --vae-ckpt ... --demo-dataset-id <Minari id of demos>
Reads:  a Minari dataset of demonstrations (--demo-dataset-id; for pointmaze made by collect_data.py --kind expert
        on first use), and with primitives a finished opal_vae.pt; --demos-from-policy makes demonstrations from
        an opal_cql.pt first (antmaze has no D4RL demonstration set)
Writes: runs/opal_fewshot_il__<env>__<seed>__<time>/  opal_fewshot_il.pt (task policy + its primitive policy),
        TensorBoard events, config.json, eval.mp4 with --capture-video

Reading order: `Args`; then ALGORITHM: the slicer, the networks, the relabelling of the demonstrations, the two
imitation losses and the test-time execution; then `__main__` at the bottom (setup → demonstrations → relabel →
fine-tune π_θ → imitate with π_ψ → evaluation). A short BOOKKEEPING section before it makes demonstrations from a
trained policy when asked; the rest of the bookkeeping (datasets, checkpoints, logging, evaluation) is opal_utils.py.
"""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import minari
import numpy as np
import torch
import torch.nn as nn
import tyro

from opal_utils import (
    Evaluator, Loop, check_checkpoint, dataset_fields, evaluation_env, fail, flatten_observation, load_checkpoint,
    load_flat_dataset, load_minari_dataset, load_upstream, observation_layout, open_run, policies_from_checkpoint,
    print_summary, random_state, resolve_dataset_id, resume_progress, start_run, save_checkpoint, setup_torch,
    stop_if_not_finite_module, stop_signals, use_bf16
)


@dataclass
class Args:
    exp_name: str = "opal_fewshot_il"
    """name of this experiment, the first part of the run directory's name"""
    seed: int = 1
    """seed of torch, numpy, the batch sampler and the choice of demonstrations (evaluation episodes use
    seed + 10,000 onward)"""
    env: str = "pointmaze-large"
    """dataset alias: antmaze-medium-diverse, antmaze-large-diverse, kitchen-mixed, kitchen-partial,
    pointmaze-umaze, pointmaze-medium, pointmaze-large; names the undirected dataset the VAE was trained on and the
    default demonstrations"""
    dataset_id: Optional[str] = None
    """the undirected Minari dataset the VAE was trained on, if not --env's (only checked against the VAE)"""
    demo_dataset_id: Optional[str] = None
    """Minari dataset of demonstrations, local or remote; default: opal/pointmaze-*-expert-v0 for pointmaze (made
    by collect_data.py on first use), D4RL/kitchen/complete-v2 for kitchen; antmaze needs one (see
    --demos-from-policy)"""
    num_demos: int = 10
    """demonstrations to imitate, drawn without replacement (seeded by --seed) from the demonstration dataset
    (paper: 10)"""
    demos_from_policy: Optional[str] = None
    """opal_cql.pt (or its run directory): if --demo-dataset-id is not in the local store, make it first from this
    policy's successful evaluation episodes"""
    demo_attempts: int = 200
    """with --demos-from-policy: most episodes to try while collecting --num-demos successful ones"""
    vae_ckpt: Optional[str] = None
    """opal_vae.pt (or its run directory) trained on --env's dataset; required with --primitives opal"""
    allow_unfinished: bool = False
    """accept a --vae-ckpt whose run did not finish (stopped before its last step); refused otherwise"""
    primitives: Literal["opal", "none"] = "opal"
    """opal: imitate latent primitives (BC+OPAL); none: plain BC on raw actions (c = 1), the baseline"""
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
    """run the forward passes under torch.autocast(bfloat16); honoured only where a probe at start-up measures bf16
    1.25x faster than fp32 or more, on a CPU or a GPU (ours)"""
    runs_dir: str = "runs"
    """folder that receives the run directory"""
    save_every: int = 5_000
    """write the checkpoint every this many gradient steps (and at the end or on Ctrl-C)"""
    log_every: int = 250
    """log losses (averaged since the last log) and steps/s every this many gradient steps"""
    eval_every: Optional[int] = None
    """evaluate every this many imitation steps with --eval-episodes-during episodes; default total_steps // 5"""
    eval_episodes: int = 100
    """evaluation episodes at the end (D4RL uses 100)"""
    eval_episodes_during: int = 10
    """evaluation episodes at each intermediate evaluation"""
    num_envs: int = 10
    """parallel evaluation environments (gymnasium.vector.SyncVectorEnv)"""
    resume: Optional[str] = None
    """continue an interrupted run from its opal_fewshot_il.pt (or run directory), with the arguments saved in it"""

    # Imitation; the paper gives the method, not these numbers: every default here is ours
    total_steps: int = 10_000
    """gradient steps of the task policy's maximum likelihood (ours)"""
    batch_size: int = 256
    """windows (or steps, without primitives) per gradient step (ours)"""
    policy_lr: float = 3e-4
    """Adam learning rate of the task policy (ours; CORL's BC uses 3e-4)"""
    hidden_dim: Optional[int] = None
    """width of the task policy's hidden layers; default 256 for D4RL aliases, 128 otherwise (as opal_cql.py)"""
    policy_layers: int = 3
    """hidden layers of the task policy (as opal_cql.py)"""
    latent_margin: float = 0.1
    """the task policy's latent box: the demonstrations' latents' min/max, widened by this fraction of its width
    on each side (ours: keeps the demonstrated latents off the tanh's asymptotes)"""
    finetune_steps: int = 1_000
    """gradient steps of BC fine-tuning of the primitive policy on the demonstrations' (s_t, a_t, z) (paper: done;
    the number is ours); 0 skips it"""
    finetune_lr: float = 1e-4
    """Adam learning rate of the primitive policy's fine-tuning (ours: a tenth of the VAE's, the demonstrations
    are few)"""

    def __post_init__(self):
        for name in ("num_demos", "demo_attempts", "total_steps", "batch_size", "hidden_dim", "policy_layers",
                     "save_every", "log_every", "eval_every", "eval_episodes", "num_envs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")
        if self.finetune_steps < 0 or self.eval_episodes_during < 0 or self.latent_margin < 0:
            fail("--finetune-steps, --eval-episodes-during and --latent-margin cannot be negative.")
        if not (self.policy_lr > 0 and self.finetune_lr > 0):
            fail("--policy-lr and --finetune-lr must be positive.")
        if self.primitives == "opal" and not self.vae_ckpt and not self.resume:
            fail("--primitives opal needs --vae-ckpt runs/<opal_vae run>/opal_vae.pt (train one with opal_vae.py), "
                 "or use --primitives none for plain BC.")
        for name in ("vae_ckpt", "demos_from_policy"):  # saved in the checkpoint: resuming elsewhere still finds them
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))


# ======================================================================================================================
# ALGORITHM: what to study. The slicer, the networks (shared word for word with the other scripts), the relabelling
# of the demonstrations (§4.2), the two imitation losses and the test-time execution.
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


def relabel_demonstrations(encoder, demos, c):
    """(window starts, choices) to imitate: with primitives, every length-c window of the demonstrations at stride 1
    (OPAL §4.2) and its z = μ_φ(τ); without (encoder None, c = 1), every step and its action."""
    starts = window_starts(demos["episode_lengths"], c, stride=1).to(demos["observations"].device)
    if encoder is None:
        return starts, demos["actions"][starts]
    return starts, encode_windows(encoder, demos["observations"], demos["actions"], starts, c)


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


def demonstration_box(latents, margin: float):
    """The task policy's latent box (ours): the range of the demonstrations' z, widened on each side by `margin`
    of its width and by 10⁻³ (a box of one demonstration's single z would have no width)."""
    low, high = latents.min(0).values, latents.max(0).values
    return low - margin * (high - low) - 1e-3, high + margin * (high - low) + 1e-3


def task_policy_nll(task_policy, first_states, choices):
    """Maximum likelihood of the task policy: -log π_ψ(z|s_0) over relabelled windows (or -log π_ψ(a|s) over steps
    without primitives), averaged over the batch."""
    return -task_policy.log_prob(first_states, choices).mean()


def imitation_update(task_policy, optimizer, first_states, choices, bf16: bool):
    """One gradient step of the task policy's maximum likelihood on a batch of (s_0, z); returns the loss."""
    with torch.autocast(first_states.device.type, dtype=torch.bfloat16, enabled=bf16):
        policy_nll = task_policy_nll(task_policy, first_states, choices)
    optimizer.zero_grad(set_to_none=True)
    policy_nll.backward()
    optimizer.step()
    return policy_nll


def pick_demonstrations(demos: dict, num_demos: int, seed: int):
    """`num_demos` whole episodes of a flat dataset, drawn without replacement with `seed`: (their flat data, their
    episode indices). Flat rows of episode e: offset_e .. offset_e + T_e, as load_flat_dataset lays them out."""
    lengths = demos["episode_lengths"]
    if num_demos > len(lengths):
        fail(f"--num-demos {num_demos} asks for more demonstrations than the dataset holds ({len(lengths)}); lower "
             "it, or make more (e.g. collect_data.py --kind expert --episodes N --overwrite).")
    chosen = np.sort(np.random.default_rng(seed).choice(len(lengths), num_demos, replace=False))
    first_rows = torch.cumsum(lengths + 1, 0) - (lengths + 1)
    rows = torch.cat([torch.arange(first_rows[e], first_rows[e] + lengths[e] + 1) for e in chosen])
    picked = {key: value[rows.to(value.device)] for key, value in demos.items() if key != "episode_lengths"}
    picked["episode_lengths"] = lengths[chosen]
    return picked, chosen.tolist()


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


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. Demonstrations made by rolling out a trained policy (the rest of
# the bookkeeping is in opal_utils.py).
# ======================================================================================================================
DEFAULT_DEMOS = {"pointmaze-umaze": "opal/pointmaze-umaze-expert-v0", "pointmaze-medium": "opal/pointmaze-medium-expert-v0",
                 "pointmaze-large": "opal/pointmaze-large-expert-v0", "kitchen-mixed": "D4RL/kitchen/complete-v2",
                 "kitchen-partial": "D4RL/kitchen/complete-v2", "antmaze-medium-made": "opal/antmaze-medium-expert-v0",
                 "antmaze-large-made": "opal/antmaze-large-expert-v0"}


def demo_dataset_for(args) -> str:
    if args.demo_dataset_id:
        return args.demo_dataset_id
    if args.env not in DEFAULT_DEMOS or args.dataset_id:
        fail(f"there is no default demonstration dataset for {args.dataset_id or args.env}: pass --demo-dataset-id "
             "(a Minari dataset of demonstrations), and for antmaze make one with --demos-from-policy "
             "runs/<opal_cql run>/opal_cql.pt (docs/opal_fewshot_il.md).")
    return DEFAULT_DEMOS[args.env]


@torch.no_grad()
def demonstrations_from_policy(env, layout, task_policy, primitive_policy, c, wanted, attempts, seed):
    """Successful episodes of a trained policy in `env`, acted as `evaluate` acts, as Minari episode buffers: at most
    `wanted`, from at most `attempts` episodes. Every c steps π(z|s) picks z; π_θ's mean action acts."""
    from minari.data_collector import EpisodeBuffer
    device, buffers = next(task_policy.parameters()).device, []
    for attempt in range(attempts):
        obs, _ = env.reset(seed=seed + attempt)
        observations, actions, rewards, terminations, truncations, success = [obs], [], [], [], [], False
        done, step = False, 0
        while not done:
            state = torch.as_tensor(flatten_observation(obs, layout), device=device)[None]
            if step % c == 0:
                choice = task_policy(state, deterministic=True)[0]
            action = choice if primitive_policy is None else primitive_policy(state, choice)[0]
            action = np.clip(action[0].cpu().numpy(), env.action_space.low, env.action_space.high)
            obs, reward, terminated, truncated, info = env.step(action)
            success, step = success or bool(info.get("success", False)), step + 1
            terminated = terminated or success  # a demonstration ends where it reaches the goal
            done = terminated or truncated
            for column, value in ((observations, obs), (actions, action), (rewards, reward),
                                  (terminations, terminated), (truncations, truncated and not terminated)):
                column.append(value)
        if success:
            stacked = {key: np.stack([o[key] for o in observations]) for key in observations[0]} \
                if isinstance(obs, dict) else np.stack(observations)
            buffers.append(EpisodeBuffer(id=None, seed=seed + attempt, observations=stacked,
                                         actions=np.stack(actions).astype(np.float32), rewards=np.asarray(rewards),
                                         terminations=np.asarray(terminations), truncations=np.asarray(truncations)))
        if len(buffers) == wanted:
            break
    return buffers


def make_demonstrations(args, demo_id: str):
    """--demos-from-policy: write `demo_id` into the local Minari store from the successful episodes of the policy in
    its dataset's evaluation environment (the task the demonstrations will show)."""
    payload = load_checkpoint(args.demos_from_policy, "opal_cql")
    source = load_minari_dataset(payload["dataset_id"])
    env = evaluation_env(source)
    task_policy, primitive_policy = policies_from_checkpoint(payload, TanhGaussianPolicy, PrimitivePolicy)
    print(f"making {demo_id}: up to {args.num_demos} successful episodes of {args.demos_from_policy} in "
          f"{env.spec.id} ({args.demo_attempts} attempts at most)")
    buffers = demonstrations_from_policy(env, payload["obs_layout"], task_policy, primitive_policy, payload["c"],
                                         args.num_demos, args.demo_attempts, args.seed + 20_000)
    if not buffers:
        fail(f"{args.demos_from_policy} succeeded in none of {args.demo_attempts} episodes; it cannot demonstrate "
             "the task. Train it longer or pass --demo-dataset-id with demonstrations made otherwise.")
    minari.create_dataset_from_buffers(
        dataset_id=demo_id, buffer=buffers, env=env.spec, eval_env=env.spec, data_format="hdf5",
        algorithm_name=f"opal_fewshot_il.py --demos-from-policy (successful episodes of {payload['script']}.py)",
        author="opal", author_email="opal@example.invalid", code_permalink="opal_fewshot_il.py",
        description=f"successful episodes of {args.demos_from_policy}",
        ref_min_score=source.storage.metadata.get("ref_min_score"),
        ref_max_score=source.storage.metadata.get("ref_max_score"))
    print(f"wrote {demo_id}: {len(buffers)} demonstrations, {sum(len(b.actions) for b in buffers)} steps")
    env.close()


if __name__ == "__main__":
    args = tyro.cli(Args)
    stop_requested = stop_signals()
    resumed, args, resumed_dir = start_run(args, "opal_fewshot_il")  # --resume, or a new run

    # Setup: device, the primitives, the demonstrations (made first from a policy if asked)
    device = setup_torch(args.seed, args.device, args.capture_video)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    args.hidden_dim = args.hidden_dim or (256 if dataset_id.startswith("D4RL/") else 128)
    args.eval_every = args.eval_every or max(1, args.total_steps // 5)
    vae = None
    if args.primitives == "opal":
        vae = load_upstream(args.vae_ckpt, "opal_vae", args.allow_unfinished, dataset_id=dataset_id)
    demo_id = demo_dataset_for(args)
    if args.demos_from_policy and not resumed and demo_id not in minari.list_local_datasets():
        make_demonstrations(args, demo_id)
    demo_dataset = load_minari_dataset(demo_id)
    layout = observation_layout(demo_dataset)
    demos, demo_episodes = pick_demonstrations(load_flat_dataset(demo_dataset, layout, device), args.num_demos,
                                               args.seed)
    obs_dim, act_dim = demos["observations"].shape[1], demos["actions"].shape[1]
    act_low, act_high = demo_dataset.action_space.low, demo_dataset.action_space.high
    if vae is not None:  # the demonstrations must be states and actions of the kind the VAE learned from
        check_checkpoint(vae, args.vae_ckpt, obs_layout=layout, obs_dim=obs_dim, act_dim=act_dim)
    c = vae["c"] if vae is not None else 1

    # OPAL §4.2: relabel every window of the demonstrations (stride 1) with z = μ_φ(τ); without primitives, (s_t, a_t)
    encoder, primitive_policy = None, None
    if vae is not None:
        encoder = Encoder(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"], vae["gru_layers"]).to(device)
        encoder.load_state_dict(vae["encoder"])
        primitive_policy = PrimitivePolicy(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"]).to(device)
        primitive_policy.load_state_dict(vae["primitive_policy"])
    starts, choices = relabel_demonstrations(encoder, demos, c)
    if len(starts) == 0:
        fail(f"every chosen demonstration of {demo_id} is shorter than c = {c} steps; there is nothing to imitate.")
    if vae is None:  # the box of raw actions: the action bounds
        choice_low = torch.as_tensor(act_low, dtype=torch.float32, device=device)
        choice_high = torch.as_tensor(act_high, dtype=torch.float32, device=device)
        choices = choices.clamp(choice_low, choice_high)
    else:
        choice_low, choice_high = demonstration_box(choices, args.latent_margin)
    first_states = demos["observations"][starts]
    task_policy = TanhGaussianPolicy(obs_dim, len(choice_low), choice_low, choice_high, args.hidden_dim,
                                     args.policy_layers).to(device)
    task_policy.normalize.fit(demos["observations"])
    # bf16 autocast if a probe measures it faster: the task policy's imitation loss on a batch
    args.bf16 = use_bf16(args.bf16, device, resumed=resumed is not None, work=lambda: task_policy_nll(
        task_policy, first_states[:args.batch_size], choices[:args.batch_size]))

    config = {**asdict(args), "dataset_id": dataset_id, "demo_dataset_id": demo_id, "demo_episodes": demo_episodes,
              "c": c, "windows": len(starts), "demo_steps": int(demos["episode_lengths"].sum())}
    run_dir, writer = open_run(args, config, resumed_dir)
    print(f"{demo_id}: {args.num_demos} demonstrations (episodes {demo_episodes}), "
          f"{int(demos['episode_lengths'].sum())} steps, {len(starts)} {'windows' if c > 1 else 'steps'} to "
          f"imitate (c = {c}); run dir {run_dir}")
    policy_optimizer = torch.optim.Adam(task_policy.parameters(), lr=args.policy_lr, fused=True)
    finetune_optimizer = None
    if primitive_policy is not None:
        finetune_optimizer = torch.optim.Adam(primitive_policy.parameters(), lr=args.finetune_lr, fused=True)
    sampler = torch.Generator(device=device).manual_seed(args.seed)
    checkpoint_path, summary, phase, first_step = run_dir / "opal_fewshot_il.pt", {}, "finetune", 1
    if resumed is not None:  # networks, optimisers, phase, step counter and random number generators
        task_policy.load_state_dict(resumed["task_policy"])
        policy_optimizer.load_state_dict(resumed["policy_optimizer"])
        if primitive_policy is not None:
            primitive_policy.load_state_dict(resumed["primitive_policy"])
            finetune_optimizer.load_state_dict(resumed["finetune_optimizer"])
        (summary, first_step), phase = resume_progress(resumed, sampler), resumed["phase"]

    def checkpoint(phase: str, step: int):
        modules = {"task_policy": task_policy, **({"primitive_policy": primitive_policy} if vae is not None else {})}
        stop_if_not_finite_module(f"{phase} step {step}", checkpoint_path, writer, **modules)
        save_checkpoint(checkpoint_path, {
            "script": "opal_fewshot_il", "args": asdict(args), "seed": args.seed,
            **dataset_fields(dataset_id, demo_dataset, layout, obs_dim, act_dim), "demo_dataset_id": demo_id,
            "demo_episodes": demo_episodes, "primitives": args.primitives, "c": c,
            "choice_dim": len(choice_low), "choice_low": choice_low.tolist(),
            "choice_high": choice_high.tolist(), "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "finetune_optimizer": finetune_optimizer.state_dict() if vae is not None else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.policy_layers,
            "task_policy": task_policy.state_dict(), "policy_optimizer": policy_optimizer.state_dict(),
            "phase": phase, "step": step, "finished": phase == "done", "summary": dict(summary),
            "rng": random_state(sampler)})

    # Phase 1: fine-tune the primitive policy by BC on the demonstrations' (s_t, a_t, z), z fixed (paper)
    finetune_steps = args.finetune_steps if vae is not None else 0
    loop = Loop("fine-tuning", first_step if phase == "finetune" else finetune_steps + 1, finetune_steps, args,
                writer, summary, lambda step: checkpoint("finetune", step), checkpoint_path, stop_requested,
                show=("finetune_nll",), desc="fine-tuning π_θ", prefix="finetune_")
    for step in loop:
        batch = relabelled_batch(demos, starts, choices, c, args.batch_size, sampler)  # (s_t, a_t)_{t<c}, z
        losses = primitive_finetune_update(primitive_policy, finetune_optimizer, *batch, args.bf16)
        loop.end_of_step(step, {"finetune_nll": losses["nll"]})
    if primitive_policy is not None:
        primitive_policy.requires_grad_(False)  # fixed from here on, as in OPAL's downstream tasks

    # Phase 2: the task policy imitates the relabelled choices, max log π_ψ(z|s_0); evaluated with its primitives
    evaluator = Evaluator(demo_dataset, layout, args.num_envs, writer, summary)
    policy = HierarchicalPolicy(task_policy, primitive_policy, c)  # what acts in the evaluation episodes
    loop = Loop("imitation", first_step if phase == "imitate" else 1, args.total_steps, args, writer, summary,
                lambda step: checkpoint("imitate", step), checkpoint_path, stop_requested, show=("policy_nll",),
                desc=f"BC ({args.primitives})", log_offset=finetune_steps, optimizer=policy_optimizer)
    for step in loop:
        chosen = torch.randint(len(starts), (args.batch_size,), device=device, generator=sampler)
        policy_nll = imitation_update(task_policy, policy_optimizer, first_states[chosen], choices[chosen], args.bf16)
        loop.end_of_step(step, {"policy_nll": policy_nll})
        if step % args.eval_every == 0 and step < args.total_steps and args.eval_episodes_during > 0:
            evaluator(policy, step, args.eval_episodes_during, args.seed + 10_000 + step)

    evaluator(policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    checkpoint("done", args.total_steps)
    if args.capture_video:
        evaluator.video(policy, args.seed + 10_000, run_dir / "eval.mp4")
    print_summary(summary, checkpoint_path)
    evaluator.close()
    writer.close()

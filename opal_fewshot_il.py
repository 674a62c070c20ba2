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

Reading order: `Args`; then ALGORITHM: the networks, the relabelling of the demonstrations and the two imitation
losses; then `__main__` at the bottom (setup → demonstrations → relabel → fine-tune π_θ → imitate with π_ψ →
evaluation). The BOOKKEEPING section between them (datasets, checkpoints, logging, evaluation, demonstrations made
by a policy) can be skipped on a first reading.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
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
# ALGORITHM: what to study. The networks (shared word for word with the other scripts), the relabelling of the
# demonstrations (§4.2) and the two imitation losses.
# ======================================================================================================================
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
# --- end shared ---


def task_policy_nll(task_policy, first_states, choices):
    """Maximum likelihood of the task policy: -log π_ψ(z|s_0) over relabelled windows (or -log π_ψ(a|s) over steps
    without primitives), averaged over the batch."""
    return -task_policy.log_prob(first_states, choices).mean()


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


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. Datasets, checkpoints, run setup and logging, evaluation, and
# demonstrations made by rolling out a trained policy.
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


DEFAULT_DEMOS = {"pointmaze-umaze": "opal/pointmaze-umaze-expert-v0", "pointmaze-medium": "opal/pointmaze-medium-expert-v0",
                 "pointmaze-large": "opal/pointmaze-large-expert-v0", "kitchen-mixed": "D4RL/kitchen/complete-v2",
                 "kitchen-partial": "D4RL/kitchen/complete-v2"}


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
    task_policy, primitive_policy = policies_from_checkpoint(payload)
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
    resumed, args, resumed_dir = resumed_args(args, "opal_fewshot_il") if args.resume else (None, args, None)

    # Setup: device, the primitives, the demonstrations (made first from a policy if asked)
    if args.capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering without a display
    device = setup_torch(args.seed, args.device)
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
    else:  # the box of latents: the demonstrations' range, widened (ours)
        low, high = choices.min(0).values, choices.max(0).values
        choice_low = low - args.latent_margin * (high - low) - 1e-3
        choice_high = high + args.latent_margin * (high - low) + 1e-3
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
        torch.set_rng_state(resumed["rng"]["torch"])
        sampler.set_state(resumed["rng"]["sampler"])
        summary, phase, first_step = dict(resumed["summary"]), resumed["phase"], resumed["step"] + 1

    def checkpoint(phase: str, step: int):
        modules = {"task_policy": task_policy, **({"primitive_policy": primitive_policy} if vae is not None else {})}
        stop_if_not_finite_module(f"{phase} step {step}", checkpoint_path, writer, **modules)
        save_checkpoint(checkpoint_path, {
            "script": "opal_fewshot_il", "args": asdict(args), "seed": args.seed, "dataset_id": dataset_id,
            "demo_dataset_id": demo_id, "demo_episodes": demo_episodes,
            "env_id": demo_dataset.env_spec.id if demo_dataset.env_spec is not None else None, "obs_layout": layout,
            "obs_dim": obs_dim, "act_dim": act_dim, "act_low": act_low.tolist(), "act_high": act_high.tolist(),
            "primitives": args.primitives, "c": c, "choice_dim": len(choice_low), "choice_low": choice_low.tolist(),
            "choice_high": choice_high.tolist(), "vae_ckpt": args.vae_ckpt if vae is not None else None,
            "latent_dim": vae["latent_dim"] if vae is not None else None,
            "hidden_dim": vae["hidden_dim"] if vae is not None else None,
            "primitive_policy": primitive_policy.state_dict() if vae is not None else None,
            "finetune_optimizer": finetune_optimizer.state_dict() if vae is not None else None,
            "policy_hidden_dim": args.hidden_dim, "policy_layers": args.policy_layers,
            "task_policy": task_policy.state_dict(), "policy_optimizer": policy_optimizer.state_dict(),
            "phase": phase, "step": step, "finished": phase == "done", "summary": dict(summary),
            "rng": {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}})

    # Phase 1: fine-tune the primitive policy by BC on the demonstrations' (s_t, a_t, z), z fixed (paper)
    finetune_steps = args.finetune_steps if vae is not None else 0
    loop = Loop("fine-tuning", first_step if phase == "finetune" else finetune_steps + 1, finetune_steps, args,
                writer, summary, lambda step: checkpoint("finetune", step), checkpoint_path, stop_requested,
                show=("finetune_nll",), desc="fine-tuning π_θ", prefix="finetune_")
    for step in loop:
        chosen = torch.randint(len(starts), (args.batch_size,), device=device, generator=sampler)
        rows = window_rows(starts[chosen], c)  # (B, c)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            finetune_nll = primitive_bc_loss(primitive_policy, demos["observations"][rows], demos["actions"][rows],
                                             choices[chosen])
        finetune_optimizer.zero_grad(set_to_none=True)
        finetune_nll.backward()
        finetune_optimizer.step()
        loop.end_of_step(step, {"finetune_nll": finetune_nll})
    if primitive_policy is not None:
        primitive_policy.requires_grad_(False)  # fixed from here on, as in OPAL's downstream tasks

    # Phase 2: the task policy imitates the relabelled choices, max log π_ψ(z|s_0); evaluated with its primitives
    evaluator = Evaluator(demo_dataset, layout, c, args.num_envs, writer, summary)
    loop = Loop("imitation", first_step if phase == "imitate" else 1, args.total_steps, args, writer, summary,
                lambda step: checkpoint("imitate", step), checkpoint_path, stop_requested, show=("policy_nll",),
                desc=f"BC ({args.primitives})", log_offset=finetune_steps, optimizer=policy_optimizer)
    for step in loop:
        chosen = torch.randint(len(starts), (args.batch_size,), device=device, generator=sampler)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            policy_nll = task_policy_nll(task_policy, first_states[chosen], choices[chosen])
        policy_optimizer.zero_grad(set_to_none=True)
        policy_nll.backward()
        policy_optimizer.step()
        loop.end_of_step(step, {"policy_nll": policy_nll})
        if step % args.eval_every == 0 and step < args.total_steps and args.eval_episodes_during > 0:
            evaluator(task_policy, primitive_policy, step, args.eval_episodes_during, args.seed + 10_000 + step)

    evaluator(task_policy, primitive_policy, args.total_steps, args.eval_episodes, args.seed + 10_000)
    checkpoint("done", args.total_steps)
    if args.capture_video:
        evaluator.video(task_policy, primitive_policy, args.seed + 10_000, run_dir / "eval.mp4")
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    print(f"checkpoint: {checkpoint_path}")
    evaluator.close()
    writer.close()

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

Reading order: `Args`; then ALGORITHM: the networks q_φ, ρ_ω, π_θ and the two losses; then `__main__` at the bottom
(setup → β-VAE → relabel and BC fine-tuning → evaluation). The BOOKKEEPING section between them (datasets,
checkpoints, logging, the written-out GRU, the closed-loop check and the picture) can be skipped on a first reading.
"""

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
    4,000 at batch 256 otherwise (ours: about 20 minutes on 2 CPU cores for pointmaze-large)"""
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
# ALGORITHM: what to study. The three networks (shared word for word with the other scripts) and the two losses.
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


# --- shared: primitive_finetune ---
def primitive_bc_loss(primitive_policy, states, actions, latents):
    """BC fine-tuning of the primitive policy on relabelled windows: -Σ_{t<c} log π_θ(a_t|s_t,z), z = μ_φ(τ) fixed,
    averaged over the batch. states, actions: (B, c, ·); latents: (B, latent_dim)."""
    mean_a, log_std_a = primitive_policy(states, latents.unsqueeze(1).expand(-1, states.shape[1], -1))
    return -gaussian_log_prob(actions, mean_a, log_std_a).sum(1).mean()
# --- end shared ---


def action_mse(encoder, primitive_policy, states, actions):
    """How well the primitives reproduce the data: mean over windows, steps and dimensions of (μ_θ(s_t, z) - a_t)²
    with z = μ_φ(τ), the encoder's mean of each window. states, actions: (B, c, ·)."""
    mean_a, _ = primitive_policy(states, encoder(states, actions)[0].unsqueeze(1).expand(-1, states.shape[1], -1))
    return F.mse_loss(mean_a, actions)


# ======================================================================================================================
# BOOKKEEPING: a first reading may skip to __main__. Datasets, checkpoints, run setup and logging, the GRU written out
# for speed, and the evaluation of the primitives (a closed-loop check and a picture).
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
    resumed, args, resumed_dir = resumed_args(args, "opal_vae") if args.resume else (None, args, None)

    # Setup: device, dataset and its windows, the budget's defaults (the paper's for D4RL data, a CPU's otherwise)
    device = setup_torch(args.seed, args.device)
    dataset_id = resolve_dataset_id(args.env, args.dataset_id)
    dataset = load_minari_dataset(dataset_id)
    layout = observation_layout(dataset)
    data = load_flat_dataset(dataset, layout, device)
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
        torch.set_rng_state(resumed["rng"]["torch"])
        sampler.set_state(resumed["rng"]["sampler"])
        summary, phase, first_step = dict(resumed["summary"]), resumed["phase"], resumed["step"] + 1

    def checkpoint(phase: str, step: int):
        stop_if_not_finite_module(f"{phase} step {step}", checkpoint_path, writer, encoder=encoder, prior=prior,
                                  primitive_policy=primitive_policy)
        save_checkpoint(checkpoint_path, {
            "script": "opal_vae", "args": asdict(args), "seed": args.seed, "dataset_id": dataset_id,
            "env_id": dataset.env_spec.id if dataset.env_spec is not None else None, "obs_layout": layout,
            "obs_dim": obs_dim, "act_dim": act_dim, "act_low": dataset.action_space.low.tolist(),
            "act_high": dataset.action_space.high.tolist(), "c": args.c, "latent_dim": args.latent_dim,
            "hidden_dim": args.hidden_dim, "gru_layers": args.gru_layers, "encoder": encoder.state_dict(),
            "prior": prior.state_dict(), "primitive_policy": primitive_policy.state_dict(),
            "optimizer": optimizer.state_dict(), "bc_optimizer": bc_optimizer.state_dict(),
            "phase": phase, "step": step, "finished": phase == "done", "summary": dict(summary),
            "rng": {"torch": torch.get_rng_state(), "sampler": sampler.get_state()}})

    # Phase 1, Eq. (1): the β-VAE, encoder, prior and primitive policy trained jointly
    vae_loss = torch.compile(beta_vae_loss) if args.compile else beta_vae_loss

    def vae_step(states, actions):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss, reconstruction_nll, kl = vae_loss(encoder, prior, primitive_policy, states, actions, args.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"vae_loss": loss, "reconstruction_nll": reconstruction_nll, "kl": kl}

    vae_step = GraphedUpdate(vae_step, [encoder, prior, primitive_policy], [], [optimizer], graphed)  # on a GPU
    loop = Loop("β-VAE", first_step if phase == "vae" else num_steps + 1, num_steps, args, writer, summary,
                lambda step: checkpoint("vae", step), checkpoint_path, stop_requested,
                show=("reconstruction_nll", "kl"), prefix="vae_", optimizer=optimizer)
    for step in loop:
        rows = window_rows(starts[torch.randint(len(starts), (batch_size,), device=device, generator=sampler)], args.c)
        loop.end_of_step(step, vae_step(data["observations"][rows], data["actions"][rows]))

    # Phase 2 (§4.1): relabel the windows of stride c with z = μ_φ(τ) and fine-tune π_θ(a|s,z) by behaviour cloning
    relabel_starts = window_starts(data["episode_lengths"], args.c, stride=args.c).to(device)
    latents = encode_windows(encoder, data["observations"], data["actions"], relabel_starts, args.c)

    def bc_step(states, actions, latents):
        bc_nll = primitive_bc_loss(primitive_policy, states, actions, latents)
        bc_optimizer.zero_grad(set_to_none=True)
        bc_nll.backward()
        bc_optimizer.step()
        return {"bc_nll": bc_nll}

    bc_step = GraphedUpdate(bc_step, [primitive_policy], [], [bc_optimizer], graphed)  # one CUDA graph on a GPU
    loop = Loop("BC", first_step if phase == "bc" else 1, bc_steps, args, writer, summary,
                lambda step: checkpoint("bc", step), checkpoint_path, stop_requested, show=("bc_nll",),
                desc="BC fine-tuning", prefix="bc_", log_offset=num_steps)
    for step in loop:
        chosen = torch.randint(len(relabel_starts), (batch_size,), device=device, generator=sampler)
        rows = window_rows(relabel_starts[chosen], args.c)
        loop.end_of_step(step, bc_step(data["observations"][rows], data["actions"][rows], latents[chosen]))

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
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()))
    print(f"checkpoint: {checkpoint_path}")
    writer.close()

"""Bookkeeping shared by the OPAL scripts: what every script needs and no reader needs in order to learn OPAL.

CleanRL's scripts import their helpers from `cleanrl_utils`; ours import these by name
(`from opal_utils import load_dataset, Loop, ...`). The method itself (every network, the slicer, the relabeller,
each loss and update, the test-time execution) stays in each script. In this order:

  datasets      the --env aliases, the local Minari store, generation of the datasets made here on first use, the
                offline and download errors; `load_dataset`: a dataset's episodes as flat tensors on the device
  checkpoints   the one contract of every *.pt file: atomic save, load with its refusals, resume, upstream checks,
                the fields every script writes, an agent's state
  run           seeding and device, the bf16 decision (a start-up probe), the run directory with config.json,
                TensorBoard and wandb, `Loop` (progress, logging, SPS, signals, NaN guards, periodic checkpoints)
  CUDA graphs   `GraphedUpdate`: an update recorded once as a CUDA graph and replayed
  evaluation    evaluation episodes in vector environments, the normalised score, the video
  online        opal_online_sac.py's training environments (episodes a resumed run replays) and replay buffer
  Meta-World    opal_mt_transfer.py's MT10/MT50 environments, their generators in checkpoints, its evaluation

Importing it registers gymnasium-robotics' environments (quietly: without its notice about Adroit).
docs/opal_utils.md describes it; tests/test_opal_utils.py and the scripts' tests test it.
"""

import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Optional

import farama_notifications
import gymnasium as gym
import minari
import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

# gymnasium-robotics prints a notice about its Adroit reward functions on import; no OPAL script uses Adroit
ROBOTICS_NOTICES = farama_notifications.notifications.get("gymnasium_robotics", {})
for version in [version for version, notice in ROBOTICS_NOTICES.items() if notice.startswith("AdroitHand")]:
    del ROBOTICS_NOTICES[version]
import gymnasium_robotics  # noqa: E402

gym.register_envs(gymnasium_robotics)


# ======================================================================================================================
# Datasets: aliases, the local Minari store, datasets made here on first use, the flat loader
# ======================================================================================================================
ENV_ALIASES = {
    "antmaze-medium-diverse": "D4RL/antmaze/medium-diverse-v1",
    "antmaze-large-diverse": "D4RL/antmaze/large-diverse-v1",
    "kitchen-mixed": "D4RL/kitchen/mixed-v2",
    "kitchen-partial": "D4RL/kitchen/partial-v2",
    "pointmaze-umaze": "opal/pointmaze-umaze-diverse-v0",
    "pointmaze-medium": "opal/pointmaze-medium-diverse-v0",
    "pointmaze-large": "opal/pointmaze-large-diverse-v0",
    "metaworld-pick-place": "opal/metaworld-pick-place-expert-v0",
    # antmaze made here by D4RL's recipe with controllers/ant_goal_reacher.pt (issue 32; not the D4RL data)
    "antmaze-medium-made": "opal/antmaze-medium-diverse-v0",
    "antmaze-large-made": "opal/antmaze-large-diverse-v0",
}
GENERATED = re.compile(r"opal/(pointmaze-(?:umaze|medium|large|gen(\d+))|antmaze-(?:medium|large)|metaworld-pick-place)"
                       r"-(diverse|expert)(-anywhere)?-v0")
MAZE_FAMILY = re.compile(r"pointmaze-gen-(\d+)")  # --env pointmaze-gen-K: the generated maze of seed K


def fail(message: str):
    """Stop with one readable paragraph instead of a traceback."""
    raise SystemExit(f"error: {message}")


def resolve_dataset_id(env: str, dataset_id: Optional[str]) -> str:
    if dataset_id:
        return dataset_id
    generated_maze = MAZE_FAMILY.fullmatch(env)
    if generated_maze:
        return f"opal/pointmaze-gen{int(generated_maze[1])}-diverse-v0"
    if env not in ENV_ALIASES:
        fail(f"unknown --env {env!r}. Valid aliases: {', '.join(ENV_ALIASES)}, pointmaze-gen-K (K = 0, 1, ...); "
             "or pass any Minari id with --dataset-id.")
    return ENV_ALIASES[env]


@contextlib.contextmanager
def generation_lock(dataset_id: str):
    """Hold an exclusive lock on generating `dataset_id` (a file beside it in the store), so that of several runs
    started at once on a missing dataset one makes it and the others wait, then load it. Without fcntl (Windows)
    nothing is locked."""
    store = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        store.mkdir(parents=True, exist_ok=True)
        lock = open(store / f".{dataset_id.replace('/', '--')}.lock", "a")
    except OSError as error:
        fail(f"cannot use the Minari store {store} ({error.strerror}). Set MINARI_DATASETS_PATH to a writable folder.")
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"another run is generating {dataset_id}: waiting for it")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


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
        with generation_lock(dataset_id):
            try:  # made by another run while this one waited for the lock (a grid starts several runs at once)
                return minari.load_dataset(dataset_id)
            except FileNotFoundError:
                pass
            collector = Path(__file__).with_name("collect_data.py")
            print(f"{dataset_id} is not in the local Minari store: generating it with {collector.name} "
                  "(45 s on 2 idle cores)")
            if not collector.exists():
                fail(f"{dataset_id} is missing and {collector} is not beside this script to make it.")
            env = ["--env", "pointmaze-gen", "--maze-seed", generated[2]] if generated[2] else ["--env", generated[1]]
            command = [sys.executable, str(collector), *env, "--kind", generated[3],
                       *(["--starts", "anywhere"] if generated[4] else [])]
            returncode = subprocess.run(command).returncode
            if returncode in (130, -signal.SIGINT, 143, -signal.SIGTERM):  # Ctrl-C (or SIGTERM) reached both
                print(f"stopped while generating {dataset_id}: nothing was written; run the command again to start "
                      "over")
                sys.exit(130)
            if returncode != 0:
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


def load_dataset(dataset_id: str, device) -> tuple:
    """(the Minari dataset, its observation layout, all its episodes as flat tensors on `device`): what a script
    trains on, generated or refused as `load_minari_dataset` says."""
    dataset = load_minari_dataset(dataset_id)
    layout = observation_layout(dataset)
    return dataset, layout, load_flat_dataset(dataset, layout, device)


# ======================================================================================================================
# Checkpoints: one contract for every script's *.pt
# ======================================================================================================================
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


def start_run(args, script: str):
    """Before any work: with --resume, (checkpoint payload, the run's saved Args, its run directory); otherwise
    (None, args, None) once --runs-dir is known to be a directory this process can create and write in."""
    if args.resume:
        return resumed_args(args, script)
    runs_dir = existing = Path(args.runs_dir).absolute()
    while not existing.exists():  # the nearest folder that exists must take a new folder (none is left behind)
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.TemporaryDirectory(dir=existing):
            pass
    except OSError as error:
        fail(f"--runs-dir {runs_dir} cannot hold the run's files ({error.strerror or error}); pass a writable "
             "directory.")
    return None, args, None


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


def dataset_fields(dataset_id: str, dataset, layout: list, obs_dim: int, act_dim: int) -> dict:
    """What a checkpoint of a run on a Minari dataset records of it: its id, its environment's, the observation's
    layout and dimensions, the action bounds (checked by the scripts that read the checkpoint)."""
    return {"dataset_id": dataset_id, "env_id": dataset.env_spec.id if dataset.env_spec is not None else None,
            "obs_layout": layout, "obs_dim": obs_dim, "act_dim": act_dim,
            "act_low": dataset.action_space.low.tolist(), "act_high": dataset.action_space.high.tolist()}


def random_state(sampler=None) -> dict:
    """The random number generators a checkpoint keeps, so that a resumed run goes on as the uninterrupted one:
    torch's and (when given) the batch sampler's."""
    return {"torch": torch.get_rng_state(), **({"sampler": sampler.get_state()} if sampler is not None else {})}


def restore_random_state(saved: dict, sampler=None):
    torch.set_rng_state(saved["torch"])
    if sampler is not None:
        sampler.set_state(saved["sampler"])


def resume_progress(resumed: dict, sampler=None) -> tuple:
    """For --resume, once the networks and optimisers are loaded: the random number generators put back where the
    checkpoint found them; returns (the run's summary so far, the step to go on from)."""
    restore_random_state(resumed["rng"], sampler)
    return dict(resumed["summary"]), resumed["step"] + 1


def print_summary(summary: dict, checkpoint_path: Path):
    """The run's last lines: its summary (losses, scores, speed; not the per-task tables) and where its checkpoint
    is."""
    print("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in summary.items()
                                  if not isinstance(v, dict)))
    print(f"checkpoint: {checkpoint_path}")


def policies_from_checkpoint(payload: dict, task_policy_class, primitive_policy_class):
    """(task policy, primitive policy or None) rebuilt from an opal_cql.pt, opal_fewshot_il.pt or opal_online_sac.pt
    payload alone, no VAE file needed; the classes are the script's (TanhGaussianPolicy, PrimitivePolicy)."""
    task_policy = task_policy_class(payload["obs_dim"], payload["choice_dim"], torch.tensor(payload["choice_low"]),
                                    torch.tensor(payload["choice_high"]), payload["policy_hidden_dim"],
                                    payload["policy_layers"])
    task_policy.load_state_dict(payload["task_policy"])
    primitive_policy = None
    if payload["primitives"] == "opal":
        primitive_policy = primitive_policy_class(payload["obs_dim"], payload["act_dim"], payload["latent_dim"],
                                                  payload["hidden_dim"])
        primitive_policy.load_state_dict(payload["primitive_policy"])
    return task_policy, primitive_policy


def agent_state_dict(agent, modules: tuple, tensors: tuple) -> dict:
    """What a checkpoint holds of an agent (opal_cql.py's CQL, opal_online_sac.py's SAC): the state dicts of its
    `modules` and of its `optimizers`, and copies of its `tensors`, each under its attribute's name."""
    return {**{name: getattr(agent, name).state_dict() for name in modules},
            **{name: getattr(agent, name).detach().clone() for name in tensors},
            **{name: optimizer.state_dict() for name, optimizer in agent.optimizers.items()}}


def load_agent_state_dict(agent, saved: dict, modules: tuple, tensors: tuple):
    """Put what `agent_state_dict` saved back into the agent, in place. The update's recorded CUDA graphs are dropped:
    the optimisers' state tensors are new ones, which no recorded graph updates."""
    for name in modules:
        getattr(agent, name).load_state_dict(saved[name])
    with torch.no_grad():
        for name in tensors:
            getattr(agent, name).copy_(saved[name])
    for name, optimizer in agent.optimizers.items():
        optimizer.load_state_dict(saved[name])
    agent.graphed_step.reset()


# ======================================================================================================================
# Run setup, the bf16 decision, logging and the training loop's bookkeeping
# ======================================================================================================================
def setup_torch(seed: int, device_name: str, capture_video: bool = False) -> torch.device:
    """Seed torch and numpy, flush subnormal floats to zero, and pick the device ("auto": CUDA if available); for
    --capture-video, render headless (MUJOCO_GL=egl, unless it is set).

    Subnormal floats (e.g. CQL's softmax weights of far-off Q-values) take a slow path on CPUs: flushing them
    made opal_cql.py 1.7x faster here, with no effect on the learning signal."""
    if capture_video:
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering without a display
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
            self.progress.set_postfix({**shown, "sps": f"{sps:.3g}"})  # 0.85 early on, not 0
            self.summary.update(means, **{f"{self.prefix}steps": step, f"{self.prefix}sps": sps})
        if save_now:
            self.save(step)
        if stop:
            self.progress.close()  # the message goes on a line of its own, below the bar
            print(f"stopped by signal at {self.phase} step {step}; checkpoint written to {self.checkpoint_path}\n"
                  f"continue with: python {Path(sys.argv[0]).name} --resume {self.checkpoint_path}", flush=True)
            sys.exit(130)


# ======================================================================================================================
# An update replayed as one CUDA graph
# ======================================================================================================================
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


# ======================================================================================================================
# Evaluation episodes
# ======================================================================================================================
def evaluation_env(dataset, **make_kwargs):
    """The dataset's evaluation environment, or a refusal where the dataset stores none."""
    if dataset.env_spec is None:
        fail(f"{dataset.spec.dataset_id} stores no environment to act in (Meta-World's data cannot: its environments "
             "are not serialisable), so no policy can be evaluated on it here; it is data for opal_vae.py.")
    return dataset.recover_environment(eval_env=True, **make_kwargs)


def make_eval_envs(dataset, num_envs, **make_kwargs):
    return gym.vector.SyncVectorEnv([lambda: evaluation_env(dataset, **make_kwargs)] * num_envs)


@torch.no_grad()
def evaluate(envs, layout, policy, episodes, seed, act_low, act_high, frames=None):
    """Run `episodes` evaluation episodes; returns (success rate, mean undiscounted return, mean over episodes of
    the closest xy distance to the goal, NaN for environments without a goal position).

    `policy(observations, t)` gives the actions of all environments at step t of their episodes (a script's
    test-time execution, e.g. a task policy picking z every c steps and its primitive acting); they are clipped
    to the action bounds. An episode succeeds when any of its steps reports success; what follows its end is not
    counted. `frames`, a list, receives the first environment's picture after every step.
    """
    successes, returns, closest_distances = [], [], []
    for round_index in range(math.ceil(episodes / envs.num_envs)):
        obs, _ = envs.reset(seed=[seed + round_index * envs.num_envs + i for i in range(envs.num_envs)])
        running = np.ones(envs.num_envs, dtype=bool)
        success = np.zeros(envs.num_envs, dtype=bool)
        episode_return = np.zeros(envs.num_envs)
        closest = np.full(envs.num_envs, np.nan)
        t = 0
        while running.any():
            action = policy(flatten_observation(obs, layout), t)
            obs, reward, terminated, truncated, info = envs.step(np.clip(action, act_low, act_high))
            if frames is not None:
                frames.append(envs.render()[0])
            episode_return += reward * running
            success |= np.asarray(info.get("success", np.zeros(envs.num_envs, dtype=bool)), dtype=bool) & running
            if isinstance(obs, dict) and isinstance(obs.get("achieved_goal"), np.ndarray):
                distance = np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"], axis=-1)
                closest = np.where(running, np.fmin(closest, distance), closest)
            running &= ~(terminated | truncated)
            t += 1
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
    """Evaluation episodes of a policy (a script's test-time execution) in --num-envs copies of the dataset's
    evaluation env; the success rate, return, normalised score and (mazes) closest approach to the goal are written
    under eval/ and kept in the run's summary with the best score so far."""

    def __init__(self, dataset, layout, num_envs, writer, summary):
        self.dataset, self.layout, self.writer, self.summary = dataset, layout, writer, summary
        self.envs = make_eval_envs(dataset, num_envs)
        self.eval_env = self.envs.envs[0]  # for normalized_score: a maze or not, the dataset's reference scores
        self.act_low, self.act_high = dataset.action_space.low, dataset.action_space.high

    def __call__(self, policy, step, episodes, seed):
        success_rate, mean_return, goal_distance = evaluate(self.envs, self.layout, policy, episodes, seed,
                                                            self.act_low, self.act_high)
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

    def video(self, policy, seed, path):
        """`path` (mp4) of one evaluation episode, acted as in evaluation (--capture-video)."""
        import imageio
        envs, frames = make_eval_envs(self.dataset, 1, render_mode="rgb_array"), []
        evaluate(envs, self.layout, policy, 1, seed, self.act_low, self.act_high, frames)
        imageio.mimsave(path, frames, fps=30)
        envs.close()

    def close(self):
        self.envs.close()


# ======================================================================================================================
# Online training environments and their replay buffer (opal_online_sac.py)
# ======================================================================================================================
class TrainingEnvs:
    """--num-envs copies of the evaluation task that collect experience. An episode ends at the goal (success), on
    the environment's termination or at its time limit; the ended copies are reset at once, each new episode from
    the next seed of a counter. Every copy keeps its current episode's seed and actions, so that a checkpoint stores
    where each one is and a resumed run replays them to the same MuJoCo state (`restore`): resuming continues the
    uninterrupted run exactly. Each copy also sums its episode's task reward, reported when the episode ends."""

    def __init__(self, dataset, layout, num_envs: int, first_seed: int, device, **make_kwargs):
        make = lambda: evaluation_env(dataset, **make_kwargs)
        self.envs = gym.vector.SyncVectorEnv([make] * num_envs, autoreset_mode=gym.vector.AutoresetMode.DISABLED)
        self.layout, self.device, self.next_seed = layout, device, first_seed
        self.act_low, self.act_high = dataset.action_space.low, dataset.action_space.high
        self.episode_seeds, self.episode_actions = [None] * num_envs, [[] for _ in range(num_envs)]
        self.episode_returns = np.zeros(num_envs)

    def states(self, observations) -> torch.Tensor:
        return torch.as_tensor(flatten_observation(observations, self.layout), device=self.device)

    def reset(self, mask: np.ndarray) -> torch.Tensor:
        """New episodes in the copies where `mask` holds; returns every copy's state."""
        seeds = [None] * len(mask)
        for i in np.flatnonzero(mask):
            seeds[i], self.episode_seeds[i], self.episode_actions[i] = self.next_seed, self.next_seed, []
            self.next_seed += 1
        self.episode_returns[mask] = 0.0
        observations, _ = self.envs.reset(seed=seeds, options={"reset_mask": mask})
        return self.states(observations)

    def step(self, actions: torch.Tensor):
        """(next states, rewards, dones, ended, episodes): done when the goal is reached or the env terminates (no
        bootstrap), ended also at the time limit; episodes: (task return, reached the goal) of each episode that
        ended."""
        actions = np.clip(actions.cpu().numpy(), self.act_low, self.act_high)
        for episode_actions, action in zip(self.episode_actions, actions):
            episode_actions.append(action)
        observations, rewards, terminated, truncated, info = self.envs.step(actions)
        success = np.asarray(info.get("success", np.zeros(len(actions), dtype=bool)), dtype=bool)
        done = terminated | success
        self.episode_returns += rewards
        episodes = [(float(self.episode_returns[i]), bool(success[i])) for i in np.flatnonzero(done | truncated)]
        return (self.states(observations), torch.as_tensor(rewards, dtype=torch.float32, device=self.device),
                torch.as_tensor(done, dtype=torch.float32, device=self.device), done | truncated, episodes)

    def state_dict(self) -> dict:
        return {"next_seed": self.next_seed, "episode_seeds": list(self.episode_seeds),
                "episode_actions": [torch.as_tensor(np.array(actions, dtype=np.float32).reshape(len(actions),
                                                                                                 len(self.act_low)))
                                    for actions in self.episode_actions]}

    def restore(self, saved: dict) -> torch.Tensor:
        """Replay every copy's current episode from its seed: MuJoCo is deterministic, so each copy ends in the
        state it was saved in, with its episode's return so far. Returns every copy's state."""
        self.next_seed = saved["next_seed"]
        observations = []
        for i, (env, seed, actions) in enumerate(zip(self.envs.envs, saved["episode_seeds"], saved["episode_actions"])):
            observation, _ = env.reset(seed=seed)
            self.episode_returns[i] = 0.0
            for action in actions.numpy():
                observation, reward = env.step(action)[:2]
                self.episode_returns[i] += reward
            observations.append(flatten_observation(observation, self.layout))
        self.episode_seeds = list(saved["episode_seeds"])
        self.episode_actions = [list(actions.numpy()) for actions in saved["episode_actions"]]
        return torch.as_tensor(np.stack(observations), device=self.device)

    def close(self):
        self.envs.close()


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


# ======================================================================================================================
# Meta-World: MT10 / MT50 as vector environments, their generators in checkpoints, its evaluation protocol
# ======================================================================================================================
def make_benchmark(benchmark: str, seed: int, episode_length: int, strategy: str, autoreset_mode):
    """Meta-World's MT10 or MT50 as a vector environment, one environment per task, the one-hot task id appended to
    the state. Each environment draws one of its task's 50 goals at every reset from a generator seeded here."""
    import metaworld  # noqa: F401  (registers the Meta-World/ environments)
    return gym.make_vec(f"Meta-World/{benchmark}", vector_strategy=strategy, seed=seed, use_one_hot=True,
                        max_episode_steps=episode_length, autoreset_mode=autoreset_mode)


def task_names(envs) -> list:
    """The benchmark's task names (e.g. pick-place-v3), in the order of its environments and one-hot ids."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    name_of = {cls.__name__: name for name, cls in ALL_V3_ENVIRONMENTS.items()}
    return [name_of[cls_name] for cls_name in envs.get_attr("task_name")]


def environment_rngs(envs) -> str:
    """Where every environment's random number generators are (goal draws, positions), as JSON text for the
    checkpoint. Meta-World's own checkpoint also pickles its task list; that part is left out (the same seed
    rebuilds it), so that loading an opal_mt_transfer.pt never unpickles anything."""
    return json.dumps([(env_id, {k: v for k, v in state.items() if k != "tasks"})
                       for env_id, state in envs.call("get_checkpoint")])


def restore_environment_rngs(envs, saved: str):
    """Put every environment's generators back where `environment_rngs` found them, with this process's own copy
    of the task list: the next reset draws the goal the uninterrupted run drew."""
    tasks = {env_id: state["tasks"] for env_id, state in envs.call("get_checkpoint")}
    envs.call("load_checkpoint", [(env_id, {**state, "tasks": tasks[env_id]}) for env_id, state in json.loads(saved)])


class MetaWorldEvaluator:
    """Meta-World's evaluation protocol (`metaworld.evaluation.evaluation`) in a second copy of the benchmark: an
    episode ends at its first success or at the time limit, until every task has `episodes` of them; a task's
    success rate is its share of successful episodes, the benchmark's the mean over tasks. Written under eval/
    (success_rate, per task, return; normalized_score = 100 × success rate) and kept in the run's summary."""

    def __init__(self, envs, names, writer, summary):
        self.envs, self.names, self.writer, self.summary = envs, names, writer, summary

    def __call__(self, policy, step: int, episodes: int):
        from metaworld.evaluation import evaluation
        success_rate, mean_return, per_task, _ = evaluation(policy, self.envs, episodes)
        score = 100.0 * success_rate
        for name, value in (("success_rate", success_rate), ("return", mean_return), ("normalized_score", score)):
            self.writer.add_scalar(f"eval/{name}", value, step)
        for task, rate in per_task.items():
            self.writer.add_scalar(f"eval/success_rate_{task}", rate, step)
        best = max(self.summary.get("best_normalized_score", -math.inf), score)
        self.summary.update(last_normalized_score=score, best_normalized_score=best, last_success_rate=success_rate,
                            last_success_per_task={task: per_task[task] for task in self.names})
        tqdm.write(f"step {step}: success rate {success_rate:.3f} over {len(per_task)} tasks ({episodes} episodes "
                   f"each; " + ", ".join(f"{task} {per_task[task]:.2f}" for task in self.names) + f"); best so far "
                   f"{best / 100:.3f}")


def record_video(task: str, names: list, policy, seed: int, episode_length: int, path: Path):
    """`path` (mp4) of one evaluation episode of `task`, acted as in evaluation (--capture-video)."""
    import imageio
    import metaworld  # noqa: F401
    env = gym.make("Meta-World/MT1", env_name=task, seed=seed, render_mode="rgb_array",
                   max_episode_steps=episode_length)
    one_hot = np.eye(len(names), dtype=np.float32)[names.index(task)]
    observation, _ = env.reset()
    frames, done = [env.render()], False
    policy.reset(np.ones(1, dtype=bool))
    while not done:
        action = policy.eval_action(np.concatenate([observation, one_hot])[None])[0]
        observation, _, terminated, truncated, info = env.step(action)
        frames.append(env.render())
        done = terminated or truncated or bool(info["success"])
    imageio.mimsave(path, frames, fps=30)
    env.unwrapped.mujoco_renderer.close()  # (Meta-World's close leaves its renderer to the interpreter's exit)
    env.close()

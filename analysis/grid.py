"""Run a grid of OPAL runs (scripts × datasets × seeds × flags) on Ray, then report it with rliable.

A grid is a short TOML file (see grids/): experiments, each one script with its flags over a list of seeds. Every
run is a Ray task that runs the script exactly as a user would (same command line, its own run directory and log
file), with the CPUs (and GPUs) the grid asks for. A run that names a VAE experiment gets that experiment's
finished opal_vae.pt as --vae-ckpt, so the VAE runs first. Runs that fail are reported with the end of their log
and do not stop the others; a second invocation skips finished runs and resumes interrupted ones (--resume); a
task whose node dies is retried by Ray, and resumes from the run's last checkpoint.

The report reads every finished run's checkpoint (and the grid's records file, which keeps runs whose directories
are gone), checks that the run was made with the grid's flags, and writes, next to the runs: table.md (IQM and
mean over seeds with 95% stratified-bootstrap intervals, Agarwal et al. 2021, the rliable package),
intervals.png and curves.png (score over training steps, IQM per step with its interval), records.jsonl.

Run:  python analysis/grid.py --grid grids/pointmaze_large.toml                  # a local Ray cluster on this machine
      python analysis/grid.py --grid grids/pointmaze_large.toml --address auto   # join a running cluster (ray start)
      python analysis/grid.py --grid grids/pointmaze_large.toml --report-only    # tables and plots of finished runs
"""

import ctypes
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# flags that say where and how a run is kept, not what it computes: a run still belongs to the grid if they differ
# (bf16 too: a probe at start-up turns it off where it is not faster, so the same command saves either value)
BOOKKEEPING = {"seed", "exp_name", "runs_dir", "track", "wandb_project_name", "wandb_entity", "device", "save_every",
               "log_every", "resume", "vae_ckpt", "allow_unfinished", "capture_video", "picture_latents", "compile",
               "bf16"}
CHECKPOINT = {"opal_vae.py": "opal_vae.pt", "opal_cql.py": "opal_cql.pt", "opal_fewshot_il.py": "opal_fewshot_il.pt",
              "opal_online_sac.py": "opal_online_sac.pt", "opal_mt_transfer.py": "opal_mt_transfer.pt"}


@dataclass
class Args:
    grid: str
    """the grid file (TOML), e.g. grids/pointmaze_large.toml"""
    address: Optional[str] = None
    """a running Ray cluster to join ("auto" finds the local head of `ray start`); default: start one here"""
    num_cpus: Optional[int] = None
    """CPUs of the Ray cluster started here (default: all of this machine's)"""
    report_only: bool = False
    """run nothing: write the tables and plots of the runs already finished"""
    only: Optional[str] = None
    """run (and report) only the experiments whose name starts with this"""
    poll: float = 30.0
    """seconds between progress lines"""
    import_runs: tuple[str, ...] = ()
    """folders of runs made outside the grid (searched recursively): finished runs there whose script, seed,
    --exp-name and flags match one of the grid's runs join the report and the grid's records file"""

    def __post_init__(self):
        if self.num_cpus is not None and self.num_cpus < 1:
            raise SystemExit(f"error: --num-cpus must be at least 1 (a cluster without CPUs runs nothing), got "
                             f"{self.num_cpus}.")
        if not self.poll > 0:
            raise SystemExit(f"error: --poll must be a positive number of seconds, got {self.poll}.")


# ------------------------------------------------------------------------------------------------------------------
# The grid: experiments × seeds, each run a command line
# ------------------------------------------------------------------------------------------------------------------
def load_grid(path: Path, only: Optional[str] = None) -> dict:
    """The grid file as a dict, with every run listed: {"runs": [run, ...], ...}; each run a dict with its key
    ("<experiment>/seed<N>"), script, seed, flags, its own runs directory and, if it needs one, its VAE run."""
    if not path.is_file():
        raise SystemExit(f"error: no grid file {path} (the ones we use are in grids/)")
    try:
        grid = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SystemExit(f"error: {path} is not valid TOML: {error}")
    name = grid.get("name", path.stem)
    grid_dir = (ROOT / grid.get("runs_dir", f"runs/grids/{name}")).resolve()
    defaults = grid.get("defaults", {})
    experiments = grid.get("experiments", {})
    if not experiments:
        raise SystemExit(f"error: {path} has no [experiments.<name>] table")
    runs = []
    for exp_name, experiment in experiments.items():
        known = {"script", "seeds", "args", "label", "vae", "vae_seed", "cpus", "gpus", "group"}
        unknown = set(experiment) - known
        if unknown or "script" not in experiment or experiment["script"] not in CHECKPOINT:
            raise SystemExit(f"error: experiment {exp_name} in {path}: needs script = one of "
                             f"{sorted(CHECKPOINT)}, and knows only {', '.join(sorted(known))} (got {sorted(unknown)})")
        if "vae" in experiment and experiments.get(experiment["vae"], {}).get("script") != "opal_vae.py":
            raise SystemExit(f"error: experiment {exp_name}: vae = {experiment['vae']!r} is not an opal_vae.py "
                             "experiment")
        if only and not exp_name.startswith(only) and not any(
                other.startswith(only) and spec.get("vae") == exp_name for other, spec in experiments.items()):
            continue  # (a VAE experiment that a selected experiment needs stays in)
        flags = shlex.split(defaults.get(experiment["script"], "")) + shlex.split(experiment.get("args", ""))
        for seed in experiment.get("seeds", [1]):
            vae_seed = experiment.get("vae_seed", seed)
            runs.append({"key": f"{exp_name}/seed{seed}", "experiment": exp_name, "script": experiment["script"],
                         "seed": seed, "flags": flags, "label": experiment.get("label", exp_name),
                         "group": experiment.get("group"),
                         "vae": f"{experiment['vae']}/seed{vae_seed}" if "vae" in experiment else None,
                         "cpus": experiment.get("cpus", grid.get("cpus_per_run", 1)),
                         "gpus": experiment.get("gpus", grid.get("gpus_per_run", 0)),
                         "dir": str(grid_dir / exp_name / f"seed{seed}")})
    keys = {run["key"] for run in runs}
    for run in runs:
        if run["vae"] is not None and run["vae"] not in keys:
            raise SystemExit(f"error: {run['key']} needs {run['vae']}, which the grid does not run (add its seed)")
    records = grid.get("records")
    # the report goes next to the runs, or, where runs_dir is set (a runs folder other grids may share), into a
    # folder of the grid's own name inside it, so that two grids' tables never overwrite each other
    report_dir = grid_dir / name if "runs_dir" in grid else grid_dir
    return {"name": name, "dir": grid_dir, "report_dir": report_dir, "runs": runs,
            "records": ROOT / records if records else None}


def latest_checkpoint(run: dict) -> Optional[Path]:
    """The newest checkpoint under the run's own runs directory (the script names its run folder itself)."""
    found = sorted(Path(run["dir"]).glob(f"*/{CHECKPOINT[run['script']]}"), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def is_finished(path: Optional[Path]) -> bool:
    return path is not None and bool(torch.load(path, map_location="cpu", weights_only=True).get("finished"))


def command_for(run: dict, vae_ckpt: Optional[str]) -> list:
    """The command line of a run: resume it if it has a checkpoint, else start it in its own runs directory."""
    checkpoint = latest_checkpoint(run)
    if checkpoint is not None:
        return [sys.executable, str(ROOT / run["script"]), "--resume", str(checkpoint.parent)]
    return [sys.executable, str(ROOT / run["script"]), *run["flags"], "--seed", str(run["seed"]),
            "--exp-name", run["experiment"], "--runs-dir", run["dir"], *(["--vae-ckpt", vae_ckpt] if vae_ckpt else [])]


def log_tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log, progress bars' carriage-return updates split into lines."""
    if not path.exists():
        return "(no log)"
    text = path.read_bytes()[-20_000:].decode(errors="replace")
    return "\n".join([line for line in re.split(r"[\r\n]+", text) if line.strip()][-lines:])


def wait_for_earlier_attempt(run_dir: Path, stop_file: str) -> None:
    """An earlier attempt of this run may still be ending: a grid stopped and started again at once, or a task
    retried after its worker died, whose run got SIGTERM and is still writing its checkpoint. Looking for
    checkpoints before it has ended would start the run afresh beside it. `run.pid` (host and process id, written
    while a run's process lives) names it; wait while that process lives and reads this run's folder (a process id
    reused by something else does not) and is on this machine (another node's cannot be seen from here)."""
    try:
        host, pid = (run_dir / "run.pid").read_text().split()
    except (FileNotFoundError, ValueError):
        return
    process = Path(f"/proc/{pid}")
    while host == socket.gethostname() and not Path(stop_file).exists():
        try:
            state = (process / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (process / "cmdline").read_bytes().decode(errors="replace")
        except OSError:  # it has ended (or there is no /proc to ask)
            return
        # a zombie has ended; an empty command line is a process between fork and exec: look again
        if state == "Z" or (command and str(run_dir) not in command):
            return
        time.sleep(1)


def execute(run: dict, stop_file: str, *upstream: dict) -> dict:
    """Body of one Ray task: run the script (or resume it), return its outcome. `upstream`: the VAE run's outcome.
    When `stop_file` appears (the grid was stopped), the run gets SIGTERM, saves its checkpoint and exits."""
    if Path(stop_file).exists():
        return {"key": run["key"], "status": "stopped"}
    if upstream and upstream[0]["status"] != "finished":
        return {"key": run["key"], "status": "skipped",
                "reason": f"its VAE run {upstream[0]['key']} {upstream[0]['status']}"}
    Path(run["dir"]).mkdir(parents=True, exist_ok=True)
    wait_for_earlier_attempt(Path(run["dir"]), stop_file)
    if latest_checkpoint(run) is None:  # folders of attempts that never saved a checkpoint: start afresh
        for stale in Path(run["dir"]).iterdir():
            if stale.is_dir():
                shutil.rmtree(stale)
    command = command_for(run, upstream[0]["checkpoint"] if upstream else None)
    log = Path(run["dir"]) / "run.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(run["cpus"]), "PYTHONUNBUFFERED": "1"}

    def die_with_the_task():  # the run gets SIGTERM (it checkpoints and exits) if the task's worker dies
        if sys.platform.startswith("linux"):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    with open(log, "a") as out:
        out.write(f"\n$ {shlex.join(command)}\n")
        out.flush()
        # its own session: Ray's clean-up of the worker's process group does not reach the run
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                   start_new_session=True, preexec_fn=die_with_the_task)
        pid_file = Path(run["dir"]) / "run.pid"
        pid_file.write_text(f"{socket.gethostname()} {process.pid}\n")
        try:
            while process.poll() is None:
                if Path(stop_file).exists():
                    process.terminate()
                    process.wait()
                    return {"key": run["key"], "status": "stopped"}
                time.sleep(1)
            returncode = process.returncode
        except BaseException:  # the task itself was interrupted: the run saves its checkpoint and exits too
            process.terminate()
            process.wait()
            raise
        finally:
            if process.poll() is not None:
                pid_file.unlink(missing_ok=True)
    checkpoint = latest_checkpoint(run)
    if returncode == 0 and is_finished(checkpoint):
        return {"key": run["key"], "status": "finished", "checkpoint": str(checkpoint)}
    return {"key": run["key"], "status": "failed", "reason": f"exit {returncode}", "log": str(log),
            "tail": log_tail(log)}


# ------------------------------------------------------------------------------------------------------------------
# Progress: a line per run that ends, a status line with an ETA from the runs' own steps/s
# ------------------------------------------------------------------------------------------------------------------
PROGRESS = re.compile(r"(\d+)/(\d+) \[[\d:]+<[\d:?]+, +([\d.]+)(it/s|s/it)")


def progress(run: dict) -> Optional[tuple]:
    """(steps done, steps of the current phase, steps/s) from the run's progress bar in its log, if it shows one."""
    log = Path(run["dir"]) / "run.log"
    if not log.exists():
        return None
    matches = PROGRESS.findall(log.read_bytes()[-4000:].decode(errors="replace"))
    if not matches:
        return None
    done, total, rate, unit = matches[-1]
    return int(done), int(total), float(rate) if unit == "it/s" else 1 / max(float(rate), 1e-9)


def status_line(pending: dict, started: float, slots: int, counts: dict) -> str:
    """"3 running, 4 queued, 5 finished, 1 failed; ETA ~12 min" (remaining steps over each run's steps/s, spread
    over the cluster's slots; a queued run is counted at the mean whole length of the running ones' phases). A run
    is running once its task has written to its log in this invocation."""
    logs = {key: Path(run["dir"]) / "run.log" for key, run in pending.items()}
    running = [key for key, log in logs.items() if log.exists() and log.stat().st_mtime >= started]
    bars = [progress(pending[key]) for key in running]
    bars = [(done, total, rate) for done, total, rate in filter(None, bars) if rate > 0]
    seconds = [(total - done) / rate for done, total, rate in bars]
    queued = len(pending) - len(running)
    line = (f"[{(time.time() - started) / 60:.0f} min] {len(running)} running, {queued} queued, "
            f"{counts['finished']} finished, {counts['failed']} failed, {counts['skipped']} skipped")
    if seconds:
        per_run = float(np.mean([total / rate for _, total, rate in bars]))
        eta = (sum(seconds) + queued * per_run) / max(1, min(slots, len(pending)))
        line += f"; ETA ~{eta / 60:.0f} min (current phases, at the runs' own steps/s)"
    return line


def run_grid(grid: dict, args: Args) -> int:
    """Run the grid's runs that have not finished; return how many failed."""
    import ray

    runs = grid["runs"]
    latest = {run["key"]: latest_checkpoint(run) for run in runs}
    finished = {key: {"key": key, "status": "finished", "checkpoint": str(path)}
                for key, path in latest.items() if is_finished(path)}
    for key in finished:
        print(f"skip      {key}: finished before", flush=True)
    # a run kept in the records file whose folder is gone has finished too, unless a run to do needs its checkpoint
    # (the finished checkpoints on disk are known already: only the records file is read)
    recorded = set(matching_records(grid, on_disk=False)) - set(finished)
    needed = {run["vae"] for run in runs if run["key"] not in finished and run["key"] not in recorded}
    for key in sorted(recorded - needed):
        finished[key] = {"key": key, "status": "finished", "checkpoint": None}
        print(f"skip      {key}: kept in the records file", flush=True)
    todo = [run for run in runs if run["key"] not in finished]
    if not todo:
        return 0
    # Ray starts its workers at niceness 15 (background priority): a run beside other work would crawl. The local
    # cluster runs them at normal priority; on a cluster of your own, start the nodes with RAY_worker_niceness=0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(address=args.address, num_cpus=None if args.address else args.num_cpus, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    signal.signal(signal.SIGTERM, interrupt)  # ray.init put in Ray's, which ends the grid before the runs save
    task = ray.remote(execute)
    cpus, largest = ray.cluster_resources().get("CPU", 0), max(run["cpus"] for run in todo)
    if cpus < largest:  # no run could ever be scheduled: it would wait forever
        ray.shutdown()
        raise SystemExit(f"error: the Ray cluster has {cpus:.0f} CPUs, but a run of {args.grid} needs {largest}; "
                         "give it more (--num-cpus) or lower the grid's cpus_per_run.")
    slots = max(1, int(cpus // largest))
    print(f"Ray: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {len(todo)} runs to do, {slots} at a time",
          flush=True)
    stop_file = grid["dir"] / "STOP"  # (where every node sees it: the runs folder is shared)
    stop_file.unlink(missing_ok=True)
    refs, pending, started = {}, {}, time.time()
    for run in sorted(todo, key=lambda run: run["vae"] is not None):  # VAE runs first
        upstream = [] if run["vae"] is None else [finished.get(run["vae"]) or refs[run["vae"]]]
        refs[run["key"]] = task.options(num_cpus=run["cpus"], num_gpus=run["gpus"], max_retries=3,
                                        name=run["key"]).remote(run, str(stop_file), *upstream)
        pending[refs[run["key"]]] = run
    counts = {"finished": 0, "failed": 0, "skipped": 0, "stopped": 0}
    try:
        wait_for(pending, counts, started, slots, args.poll)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: every run saves its checkpoint; the same command resumes them
        print("stopping: the runs save their checkpoints; run the same command again to resume them", flush=True)
        stop_file.parent.mkdir(parents=True, exist_ok=True)
        stop_file.touch()
        for again in (signal.SIGINT, signal.SIGTERM):  # (a second Ctrl-C or kill would leave runs half-written)
            signal.signal(again, signal.SIG_IGN)
        ray.wait(list(pending), num_returns=len(pending), timeout=300)
        stop_file.unlink(missing_ok=True)
        ray.shutdown()
        raise SystemExit(130)
    print(f"grid done in {(time.time() - started) / 60:.1f} min: {counts['finished']} finished, {counts['failed']} "
          f"failed, {counts['skipped']} skipped", flush=True)
    ray.shutdown()
    return counts["failed"]


def wait_for(pending: dict, counts: dict, started: float, slots: int, poll: float):
    """Report each run as it ends, and a status line every `poll` seconds, until none is pending."""
    import ray

    last_status = time.time()
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=5)
        for ref in done:
            run = pending.pop(ref)
            try:
                outcome = ray.get(ref)
            except Exception as error:  # the task itself failed (e.g. its node was lost more often than retried)
                outcome = {"key": run["key"], "status": "failed", "reason": f"{type(error).__name__}: {error}"}
            counts[outcome["status"]] += 1
            reason = f": {outcome['reason']}" if "reason" in outcome else ""
            print(f"{outcome['status']:<9} {outcome['key']}{reason}", flush=True)
            if outcome["status"] == "failed" and "tail" in outcome:
                print("  | " + outcome["tail"].replace("\n", "\n  | ") + f"\n  (log: {outcome['log']})", flush=True)
        if time.time() - last_status > poll and pending:
            print(status_line({run["key"]: run for run in pending.values()}, started, slots, counts), flush=True)
            last_status = time.time()


# ------------------------------------------------------------------------------------------------------------------
# The report: finished runs that match the grid's flags, aggregated over seeds with rliable
# ------------------------------------------------------------------------------------------------------------------
def intended_args(run: dict) -> dict:
    """The Args the grid's command line gives the script (parsed by the script's own Args), bookkeeping left out."""
    module = __import__(run["script"][:-3])
    flags = run["flags"] + (["--vae-ckpt", "from-the-grid"] if run["vae"] else [])
    try:
        parsed = asdict(tyro.cli(module.Args, args=flags))
    except SystemExit as error:  # the script refuses these flags: no run can match them
        print(f"{run['experiment']}: {run['script']} refuses the grid's flags ({error})")
        return None
    return {key: json.loads(json.dumps(value)) for key, value in parsed.items() if key not in BOOKKEEPING}


def scalar_curves(run_dir: Path, tags: tuple) -> dict:
    """{tag: [[step, value], ...]} from the run's TensorBoard events (empty where a tag is missing)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    present = set(events.Tags()["scalars"])
    return {tag: [[point.step, point.value] for point in events.Scalars(tag)] for tag in tags if tag in present}


def record_of(path: Path) -> Optional[dict]:
    """What the report keeps of a finished run: its args and summary, and the curves the plots and tables need;
    None if the run has not finished."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not payload.get("finished"):
        return None
    script = f"{payload['script']}.py"
    curves = scalar_curves(path.parent, ("eval/normalized_score", "losses/reconstruction_nll", "losses/kl"))
    summary = dict(payload["summary"])
    for tag in ("reconstruction_nll", "kl"):  # a single logged value swings by ±10 nats: the last 1,000 steps' mean
        points = curves.pop(f"losses/{tag}", [])
        if points:
            summary[f"{tag}_last_1000"] = float(np.mean([v for s, v in points if s > points[-1][0] - 1000]))
    dataset_id = payload.get("dataset_id") if script != "opal_mt_transfer.py" else payload["env_id"]  # (the benchmark)
    return {"run": path.parent.name, "script": script, "dataset_id": dataset_id, "seed": payload["seed"],
            "args": payload["args"], "summary": summary, "curve": curves.get("eval/normalized_score", []),
            "versions": payload.get("versions")}


def matching_records(grid: dict, import_runs=(), on_disk: bool = True) -> dict:
    """{run key: record} of the grid's finished runs: checkpoints under each run's directory (unless `on_disk` is
    off), and the grid's records file. A record belongs to a run if script, seed and --exp-name agree and every flag
    that is not bookkeeping equals what the grid's command line gives; others are named and left out."""
    candidates = []
    if grid["records"] is not None and grid["records"].exists():
        candidates += [json.loads(line) for line in grid["records"].read_text().splitlines() if line.strip()]
    paths = [path for folder in import_runs for name in CHECKPOINT.values()
             for path in sorted(Path(folder).rglob(name))]
    paths += [path for run in grid["runs"] if on_disk
              for path in sorted(Path(run["dir"]).glob(f"*/{CHECKPOINT[run['script']]}"))]
    candidates += filter(None, map(record_of, paths))  # (each checkpoint loaded once)
    matched, intended_of = {}, {}
    for run in grid["runs"]:
        if run["experiment"] not in intended_of:  # the runs of an experiment share its flags: parsed once
            intended_of[run["experiment"]] = intended_args(run)
        intended = intended_of[run["experiment"]]
        for record in candidates if intended is not None else []:
            script = record.get("script", "opal_cql.py")  # (records written before the grid were all CQL runs)
            if (script, record["seed"], record["args"].get("exp_name")) != (run["script"], run["seed"],
                                                                             run["experiment"]):
                continue
            # a flag the grid leaves unset (None) is the script's to resolve (e.g. the budget's defaults)
            differing = [key for key, value in intended.items()
                         if value is not None and json.loads(json.dumps(record["args"].get(key, value))) != value]
            if differing:
                if not {"env", "dataset_id"} & set(differing):  # (on other data it is another grid's run: quiet)
                    print(f"left out {record['run']} from {run['key']}: it differs in "
                          + ", ".join(f"--{key.replace('_', '-')} ({record['args'].get(key)} vs {intended[key]})"
                                      for key in differing))
                continue
            matched[run["key"]] = record  # the last one wins: checkpoints on disk over the records file
    return matched


def interval_estimates(per_run: list) -> dict:
    """IQM and mean with 95% stratified-bootstrap confidence intervals over runs (rliable, 2,000 resamples, a fixed
    seed so the same runs give the same table); {"iqm": (point, low, high), "mean": (...)}."""
    from rliable import library as rly, metrics

    np.random.seed(0)
    scores = {"runs": np.asarray(per_run, dtype=float)[:, None]}  # (runs, 1 task)
    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])
    points, intervals = rly.get_interval_estimates(scores, aggregate, reps=2000, confidence_interval_size=0.95)
    return {name: (points["runs"][i], intervals["runs"][0, i], intervals["runs"][1, i])
            for i, name in enumerate(("iqm", "mean"))}


def family_estimates(scores: np.ndarray) -> dict:
    """IQM and mean over a family of tasks (a `group` of experiments, e.g. one per maze) with 95% stratified-bootstrap
    intervals (rliable: runs resampled within each task), scores (runs, tasks); as interval_estimates."""
    from rliable import library as rly, metrics

    np.random.seed(0)
    aggregate = lambda x: np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])
    points, intervals = rly.get_interval_estimates({"family": np.asarray(scores, dtype=float)}, aggregate, reps=2000,
                                                   confidence_interval_size=0.95)
    return {name: (points["family"][i], intervals["family"][0, i], intervals["family"][1, i])
            for i, name in enumerate(("iqm", "mean"))}


LATE_EVALUATIONS = 4  # the table's steadiness column: a run's mean score over its last this many evaluations


def late_score(record: dict) -> Optional[float]:
    """A run's mean score over its last LATE_EVALUATIONS evaluations (the final one included): unlike the final
    score alone, it does not hang on where in a swing between evaluations the run happened to stop. None if the
    run evaluated fewer times."""
    curve = record.get("curve") or []
    if len(curve) < LATE_EVALUATIONS:
        return None
    return float(np.mean([score for _, score in curve[-LATE_EVALUATIONS:]]))


def report(grid: dict, import_runs=()) -> str:
    """Write table.md, intervals.png, curves.png and records.jsonl into the grid's report folder; return the table."""
    matched = matching_records(grid, import_runs)
    grid["report_dir"].mkdir(parents=True, exist_ok=True)
    (grid["report_dir"] / "records.jsonl").write_text(
        "".join(json.dumps(matched[key]) + "\n" for key in sorted(matched)))
    if grid["records"] is not None:  # the records file keeps every matched run, so the table outlives the run folders
        kept = {}
        if grid["records"].exists():
            kept = {r["run"]: r for r in map(json.loads, grid["records"].read_text().splitlines()) if r}
        kept.update({record["run"]: record for record in matched.values()})
        grid["records"].parent.mkdir(parents=True, exist_ok=True)
        grid["records"].write_text("".join(json.dumps(kept[name]) + "\n" for name in sorted(kept)))
    experiments = {}
    for run in grid["runs"]:
        experiments.setdefault(run["experiment"], []).append(run)
    cell = lambda estimate: f"{estimate[0]:.1f} [{estimate[1]:.1f}, {estimate[2]:.1f}]"
    policy_rows, vae_rows, scores, groups = [], [], {}, {}
    for name, runs in experiments.items():
        records = [matched[run["key"]] for run in runs if run["key"] in matched]
        missing = len(runs) - len(records)
        note = f" ({missing} of {len(runs)} not finished)" if missing else ""
        if not records:
            print(f"{name}: none of its {len(runs)} runs has finished")
            continue
        dataset = records[0]["dataset_id"]
        if runs[0]["script"] == "opal_vae.py":
            def mean_std(key, digits=3):
                values = [r["summary"][key] for r in records if r["summary"].get(key) is not None]
                if not values:
                    return "–"
                spread = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
                return f"{np.mean(values):.{digits}f} ± {spread:.{digits}f}"
            vae_rows.append(f"| {dataset} | {runs[0]['label']}{note} | {', '.join(str(r['seed']) for r in records)} | "
                            + " | ".join(mean_std(key) for key in ("reconstruction_nll_last_1000", "kl_last_1000",
                                                                    "bc_nll", "action_mse", "rollout_xy_error",
                                                                    "rollout_xy_error_prior_mean"))
                            + f" | {mean_std('vae_sps', 1)} |")
            continue
        final = [r["summary"]["last_normalized_score"] for r in records]
        if runs[0]["group"] is not None:
            groups.setdefault(runs[0]["group"], []).append((name, len(runs), final))
        best = [r["summary"]["best_normalized_score"] for r in records]
        final_estimates, best_estimates = interval_estimates(final), interval_estimates(best)
        late = [late_score(r) for r in records]
        late_cell = cell(interval_estimates(late)["iqm"]) if None not in late else "–"
        scores[runs[0]["label"]] = (final_estimates, records)
        distance = np.mean([r["summary"].get("last_closest_goal_distance", math.nan) for r in records])
        sps = np.mean([r["summary"]["sps"] for r in records])
        policy_rows.append(f"| {dataset} | {runs[0]['label']}{note} | {len(records)} | "
                           f"{cell(final_estimates['iqm'])} | "
                           f"{cell(final_estimates['mean'])} | {cell(best_estimates['iqm'])} | {late_cell} | "
                           f"{', '.join(f'{score:.0f}' for score in final)} | {distance:.2f} | {sps:.0f} |")
    lines = []
    group_rows = []
    for group, members in groups.items():  # a family: every experiment of the group one task, its seeds the runs
        complete = [final for _, planned, final in members if len(final) == planned]
        per_task = ", ".join(f"{name} {np.mean(final):.0f}" for name, _, final in members)
        if len({len(final) for final in complete}) == 1:
            estimates = family_estimates(np.array(complete).T)
            group_rows.append(f"| {group} | {len(complete)} × {len(complete[0])} | {cell(estimates['iqm'])} | "
                              f"{cell(estimates['mean'])} | {per_task} |")
        else:
            group_rows.append(f"| {group} | not finished | – | – | {per_task} |")
    if group_rows:
        lines += ["| group (tasks × seeds, finished tasks only) | runs | final score, IQM [95% stratified CI] | "
                  "final, mean [95% CI] | per task, mean over seeds |", "|---|---|---|---|---|", *group_rows, ""]
    if policy_rows:
        lines += ["| dataset | method | runs | final score, IQM [95% CI] | final, mean [95% CI] | best during "
                  f"training, IQM [95% CI] | mean of the last {LATE_EVALUATIONS} evaluations, IQM [95% CI] | "
                  "final score per run (seed order) | closest distance to goal, final | steps/s |",
                  "|---|---|---|---|---|---|---|---|---|---|", *policy_rows, ""]
    if vae_rows:
        lines += ["| dataset | VAE | seeds | reconstruction NLL, last 1,000 steps | KL, last 1,000 steps | BC NLL | "
                  "action MSE | rollout xy error, encoder z | rollout xy error, prior mean | β-VAE steps/s |",
                  "|---|---|---|---|---|---|---|---|---|---|", *vae_rows, ""]
    table = "\n".join(lines)
    (grid["report_dir"] / "table.md").write_text(table)
    if scores:
        plot(scores, grid["report_dir"])
    return table


def plot(scores: dict, out: Path):
    """intervals.png: IQM and mean of the final score with their 95% intervals; curves.png: the score over training
    steps, IQM over runs at each evaluation with its interval (steps where every run of the method evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rliable import plot_utils

    labels = list(scores)
    name = {label: label.replace("`", "") for label in labels}  # (markdown's code quotes, not for a picture)
    points = {name[label]: np.array([scores[label][0][m][0] for m in ("iqm", "mean")]) for label in labels}
    intervals = {name[label]: np.array([[scores[label][0][m][1] for m in ("iqm", "mean")],
                                        [scores[label][0][m][2] for m in ("iqm", "mean")]]) for label in labels}
    figure, _ = plot_utils.plot_interval_estimates(points, intervals, ["IQM", "Mean"], algorithms=list(points),
                                                   xlabel="final normalised score, 95% CI over runs",
                                                   xlabel_y_coordinate=-0.25 - 0.5 / len(labels))
    figure.savefig(out / "intervals.png", dpi=120, bbox_inches="tight")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        curves = [dict(map(tuple, record["curve"])) for record in scores[label][1] if record.get("curve")]
        steps = sorted(set.intersection(*(set(curve) for curve in curves))) if curves else []
        if not steps:
            continue
        estimates = [interval_estimates([curve[step] for curve in curves])["iqm"] for step in steps]
        axis.plot(steps, [e[0] for e in estimates], marker="o", label=f"{name[label]} ({len(curves)} runs)")
        axis.fill_between(steps, [e[1] for e in estimates], [e[2] for e in estimates], alpha=0.2)
    online = all(record["script"] in ("opal_online_sac.py", "opal_mt_transfer.py")
                 for label in labels for record in scores[label][1])
    axis.set_xlabel("environment steps" if online else "gradient steps")
    axis.set_ylabel("normalised score, IQM over runs (95% CI)")
    if axis.lines:
        axis.legend(fontsize="small", loc="upper left", bbox_to_anchor=(0, -0.15))  # below the axes: no curve hidden
    else:
        axis.text(0.5, 0.5, "no evaluation curves (records without TensorBoard events)", ha="center",
                  transform=axis.transAxes)
    figure.savefig(out / "curves.png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (a cluster's scheduler, `kill`) stops the grid as Ctrl-C does


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (a shell may start background jobs ignoring it)
    args = tyro.cli(Args)
    grid = load_grid(Path(args.grid), args.only)
    failed = 0 if args.report_only else run_grid(grid, args)
    print(report(grid, args.import_runs))
    print(f"written: {grid['dir'] / 'table.md'}, intervals.png, curves.png, records.jsonl")
    if failed:  # (after the report: the runs that finished still count)
        sys.exit(f"{failed} run(s) failed: their logs' ends are above")

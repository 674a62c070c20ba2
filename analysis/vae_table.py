"""A table of finished opal_vae.py runs: the β-VAE's end-of-run measurements, mean ± std over seeds.

Each run is grouped by the flags it changed from opal_vae.py's defaults (seed and bookkeeping flags aside), so
`--bf16 --compile` runs and default runs land in separate rows. The measurements are the ones every run stores
in its checkpoint's summary (BC NLL, action MSE with the encoder's z on 2,048 fixed windows, the closed-loop
end-point error in the simulator with the encoder's z and with the prior's mean, PointMaze only), and the
reconstruction NLL and KL averaged over the last 1,000 β-VAE steps from the run's TensorBoard events (a single
100-step log value swings by ±10 nats between lines). This is the β-VAE half of the learning-parity check of
issue 5.

Run:  python opal_vae.py --seed 2 --runs-dir runs/vae_parity                       # and seeds 1, 3
      python opal_vae.py --seed 2 --bf16 --compile --runs-dir runs/vae_parity      # and seeds 1, 3
      python analysis/vae_table.py --runs-dir runs/vae_parity
"""

import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_vae as ov  # noqa: E402

BOOKKEEPING = {"seed", "exp_name", "runs_dir", "track", "wandb_project_name", "wandb_entity", "device", "save_every",
               "log_every", "resume", "picture_latents"}
COLUMNS = [("reconstruction_nll", "reconstruction NLL, last 1,000 steps"), ("kl", "KL, last 1,000 steps"),
           ("bc_nll", "BC NLL"),
           ("action_mse", "action MSE"), ("rollout_xy_error", "rollout xy error, encoder z"),
           ("rollout_xy_error_prior_mean", "rollout xy error, prior mean"), ("vae_sps", "β-VAE steps/s (as logged)")]


@dataclass
class Args:
    runs_dir: str = "runs/vae_parity"
    """folder searched (recursively) for opal_vae.pt files of finished runs"""


def tail_means(run_dir: Path, tags=("reconstruction_nll", "kl"), steps=1000) -> dict:
    """Mean of each losses/<tag> over the last `steps` β-VAE steps of the run's TensorBoard events."""
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    means = {}
    for tag in tags:
        points = events.Scalars(f"losses/{tag}")
        last = points[-1].step
        means[tag] = statistics.mean(p.value for p in points if p.step > last - steps)
    return means


def variant_of(saved_args: dict, defaults: dict) -> str:
    """The flags a run changed from the defaults, e.g. "--bf16 --compile"; "defaults" if none."""
    changed = [f"--{key.replace('_', '-')}" + ("" if value is True else f" {value}")
               for key, value in saved_args.items()
               if key not in BOOKKEEPING and key in defaults and value != defaults[key]]
    return " ".join(changed) or "defaults"


if __name__ == "__main__":
    args = tyro.cli(Args)
    defaults = asdict(ov.Args())
    rows = {}
    for path in sorted(Path(args.runs_dir).rglob("opal_vae.pt")):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not payload.get("finished"):
            print(f"skipping {path}: not finished")
            continue
        key = (payload["dataset_id"], variant_of(payload["args"], defaults))
        rows.setdefault(key, []).append((payload["seed"], {**payload["summary"], **tail_means(path.parent)}))
    if not rows:
        sys.exit(f"no finished opal_vae.pt under {args.runs_dir}")

    def cell(values):
        values = [v for v in values if v is not None]
        if not values:
            return "–"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.3f} ± {spread:.3f}"

    print("| dataset | flags | seeds | " + " | ".join(title for _, title in COLUMNS) + " |")
    print("|" + "---|" * (3 + len(COLUMNS)))
    for (dataset_id, variant), runs in sorted(rows.items()):
        seeds = ", ".join(str(seed) for seed, _ in sorted(runs, key=lambda run: run[0]))
        cells = [cell([summary.get(name) for _, summary in runs]) for name, _ in COLUMNS]
        print(f"| {dataset_id} | {variant} | {seeds} | " + " | ".join(cells) + " |")

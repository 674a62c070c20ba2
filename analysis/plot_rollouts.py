"""Draw where opal_cql.py policies go: xy paths of a few evaluation episodes per checkpoint, one panel each,
on the maze of the dataset's evaluation environment (the goal is the red star).

Run:  python analysis/plot_rollouts.py runs/table/*/opal_cql.pt --out docs/pointmaze_rollouts.png
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import minari
import numpy as np
import torch
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_cql as oc  # noqa: E402
from opal_utils import flatten_observation, policies_from_checkpoint  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[list[str]]
    """opal_cql.pt files"""
    out: str = "rollouts.png"
    """the picture to write"""
    episodes: int = 5
    """episodes per checkpoint (evaluation seeds seed + 10,000 onward, as in the script)"""


@torch.no_grad()
def rollout_paths(path, episodes):
    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved = payload["args"]
    policy, primitive_policy = policies_from_checkpoint(payload, oc.TanhGaussianPolicy, oc.PrimitivePolicy)
    env = minari.load_dataset(payload["dataset_id"]).recover_environment(eval_env=True)
    low, high = np.array(payload["act_low"]), np.array(payload["act_high"])
    paths = []
    for episode in range(episodes):
        obs, _ = env.reset(seed=saved["seed"] + 10_000 + episode)
        xy, done = [obs["achieved_goal"]], False
        while not done:
            state = torch.as_tensor(flatten_observation(obs, payload["obs_layout"]))[None]
            choice, _ = policy(state, deterministic=True)
            for _ in range(payload["c"]):
                action = choice if primitive_policy is None else primitive_policy(state, choice)[0]
                obs, _, terminated, truncated, _ = env.step(np.clip(action[0].numpy(), low, high))
                xy.append(obs["achieved_goal"])
                state = torch.as_tensor(flatten_observation(obs, payload["obs_layout"]))[None]
                done = terminated or truncated
                if done:
                    break
        paths.append(np.array(xy))
    return payload, env.unwrapped.maze, paths


def method_label(payload: dict) -> str:
    """The method of an opal_cql.pt checkpoint as the tables name it: CQL, IQL+OPAL, ... (CQL before --algorithm)."""
    method = payload["args"].get("algorithm", "cql").upper()
    return f"{method}+OPAL" if payload["primitives"] == "opal" else method


def draw_walls(axis, maze):
    """The maze's wall cells as grey squares, in the environment's xy frame."""
    size = maze.maze_size_scaling
    for r, row in enumerate(maze.maze_map):
        for c, cell in enumerate(row):
            if cell == 1:
                x, y = maze.cell_rowcol_to_xy(np.array([r, c]))
                axis.add_patch(plt.Rectangle((x - size / 2, y - size / 2), size, size, color="0.4"))


if __name__ == "__main__":
    args = tyro.cli(Args)
    columns = min(3, len(args.checkpoints))
    rows = -(-len(args.checkpoints) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(args.checkpoints):]:
        ax.axis("off")
    for ax, path in zip(axes.flat, args.checkpoints):
        payload, maze, paths = rollout_paths(path, args.episodes)
        draw_walls(ax, maze)
        for xy in paths:
            ax.plot(xy[:, 0], xy[:, 1], lw=1)
        ax.plot(*maze.unique_goal_locations[0], "r*", ms=12)
        ax.set_title(f"{method_label(payload)}, seed {payload['seed']}, {payload['step']} steps", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")

"""What an opal_cql.pt critic believes across its maze: Q(s, π(s)) = min_i Q_i(s, tanh of π's mean) at states placed
on a grid over every free cell (the agent at rest there), and an arrow for the first action the policy would take
(the primitive's mean action for the chosen z, or the raw action). A value that rises toward the goal *through*
a wall, or arrows pointing into walls, is what a failing maze run shows first (issue 33). It also prints, along the
shortest path from the evaluation reset cell to the goal cell, Q at each cell's centre and whether the first action
points along the path (cosine with the direction to the next cell above 0.7): where the path must first lead away
from the goal, a value that leaks through the wall from a corridor nearer the goal shows as a value that falls
along the path, and the policy turns back there.

Pointmaze states: x, y and zero velocity. Antmaze states: the evaluation reset's body pose moved to x, y.

Run:  python analysis/value_map.py runs/<opal_cql run>/opal_cql.pt [more.pt ...] --out value_map.png
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import tyro

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import opal_cql as oc  # noqa: E402
from plot_mazes import shortest_path  # noqa: E402
from plot_rollouts import draw_walls, method_label  # noqa: E402
from opal_utils import evaluation_env, flatten_observation, load_minari_dataset, policies_from_checkpoint  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[list[str]]
    """opal_cql.pt files (CQL or IQL, with or without primitives)"""
    out: str = "value_map.png"
    """the picture to write"""
    points_per_cell: int = 3
    """states per cell side"""


def grid_points(maze, points_per_cell: int) -> np.ndarray:
    """xy of points_per_cell² states evenly inside every free cell, (N, 2)."""
    size, offsets = maze.maze_size_scaling, (np.arange(points_per_cell) + 0.5) / points_per_cell - 0.5
    points = []
    for r, row in enumerate(maze.maze_map):
        for c, cell in enumerate(row):
            if cell != 1:
                centre = maze.cell_rowcol_to_xy(np.array([r, c]))
                points += [centre + size * np.array([dx, dy]) for dy in offsets for dx in offsets]
    return np.array(points)


def states_at(template: dict, layout: list, xy: np.ndarray) -> torch.Tensor:
    """The flattened states of the agent at rest at each xy, other coordinates from `template` (a reset's)."""
    rows = []
    for point in xy:
        observation = {key: np.array(value, dtype=np.float32) for key, value in template.items()}
        observation["achieved_goal"] = point.astype(np.float32)
        if layout == ["observation"]:  # pointmaze: x, y, vx, vy
            observation["observation"][:2], observation["observation"][2:4] = point, 0.0
        rows.append(flatten_observation(observation, layout))
    return torch.as_tensor(np.stack(rows))


@torch.no_grad()
def value_and_direction(payload: dict, states: torch.Tensor) -> tuple:
    """(min_i Q_i(s, c) at the deterministic choice c, the first action's xy direction) for each state."""
    saved = payload["args"]
    policy, primitive_policy = policies_from_checkpoint(payload, oc.TanhGaussianPolicy, oc.PrimitivePolicy)
    critics = oc.Critics(payload["obs_dim"], payload["choice_dim"], saved["hidden_dim"], saved["critic_layers"],
                         layer_norm=saved.get("critic_layer_norm", False))
    critics.load_state_dict(payload["critics"])
    choice, _ = policy(states, deterministic=True)
    action = choice if primitive_policy is None else primitive_policy(states, choice)[0]
    return critics(states, choice).min(0).values.numpy(), action[:, :2].numpy()


def along_the_path(payload: dict, maze, template: dict) -> tuple:
    """(the path's cells, Q at their centres, cosine of each first action with the way to the next cell)."""
    start, goal = (tuple(int(v) for v in maze.cell_xy_to_rowcol(location))
                   for location in (maze.unique_reset_locations[0], maze.unique_goal_locations[0]))
    cells = shortest_path(maze.maze_map, start, goal)
    xy = np.array([maze.cell_rowcol_to_xy(np.array(cell)) for cell in cells])
    value, direction = value_and_direction(payload, states_at(template, payload["obs_layout"], xy))
    way = xy[1:] - xy[:-1]
    cosine = (direction[:-1] * way).sum(1) / (np.linalg.norm(direction[:-1], axis=1) * np.linalg.norm(way, axis=1)
                                              + 1e-8)
    return cells, value, cosine


def main():
    args = tyro.cli(Args)
    columns = min(3, len(args.checkpoints))
    rows = -(-len(args.checkpoints) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat[len(args.checkpoints):]:
        axis.axis("off")
    for axis, path in zip(axes.flat, args.checkpoints):
        payload = torch.load(path, map_location="cpu", weights_only=True)
        env = evaluation_env(load_minari_dataset(payload["dataset_id"]))
        template, _ = env.reset(seed=0)
        maze = env.unwrapped.maze
        xy = grid_points(maze, args.points_per_cell)
        value, direction = value_and_direction(payload, states_at(template, payload["obs_layout"], xy))
        cells, path_value, cosine = along_the_path(payload, maze, template)
        print(f"{path}: along the shortest path ({len(cells) - 1} cells), the first action points the way at "
              f"{int((cosine > 0.7).sum())} of {len(cosine)} cells; cell: Q, cosine")
        print("  " + "; ".join(f"{cell}: {q:.0f}, {cos:+.2f}" for cell, q, cos in zip(cells, path_value, cosine)))
        size = maze.maze_size_scaling
        draw_walls(axis, maze)
        marker = 22 * size / args.points_per_cell
        image = axis.scatter(xy[:, 0], xy[:, 1], c=value, s=marker ** 2 / 4, marker="s", cmap="viridis")
        length = np.linalg.norm(direction, axis=1, keepdims=True) + 1e-8
        unit = direction / length * size / args.points_per_cell * 0.8
        axis.quiver(xy[:, 0], xy[:, 1], unit[:, 0], unit[:, 1], angles="xy", scale_units="xy", scale=1, width=0.004,
                    color="white")
        axis.plot(*maze.unique_goal_locations[0], "r*", ms=14)
        axis.plot(*maze.unique_reset_locations[0], "o", color="tab:green", ms=8)
        label = method_label(payload)
        size_text = f"critics {payload['args']['hidden_dim']} x {payload['args']['critic_layers']}"
        axis.set_title(f"{label}, {size_text}, seed {payload['seed']}, step {payload['step']}", fontsize=9)
        axis.set_aspect("equal")
        axis.set_xticks([]), axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.035, label="Q(s, π(s))")
    figure.tight_layout()
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

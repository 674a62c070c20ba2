"""Where a maze dataset goes: the share of its steps in each part of the maze (the xy of its achieved_goal, on a
grid of --bins-per-cell × --bins-per-cell squares per maze cell, log colour scale), the walls, and the evaluation
task's reset (green) and goal (red star). One panel per dataset; works for any Minari pointmaze or antmaze dataset
(D4RL's, or those collect_data.py makes).

    python analysis/plot_coverage.py opal/pointmaze-gen0-diverse-v0 --out docs/coverage_gen0.png
    python analysis/plot_coverage.py opal/antmaze-large-diverse-v0 opal/antmaze-medium-diverse-v0 \
        --out docs/antmaze_coverage.png
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opal_utils import evaluation_env, load_minari_dataset  # noqa: E402


def visits(xy: np.ndarray, maze_map, scaling: float, bins_per_cell: int) -> np.ndarray:
    """Counts of the points `xy` (N, 2) on a grid of bins_per_cell² squares per cell, laid out as the maze's map:
    row 0 at the top (largest y), column 0 at the left (smallest x); gymnasium-robotics centres the map on 0, cells
    `scaling` wide. Points outside the map are dropped."""
    rows, columns = len(maze_map), len(maze_map[0])
    size = scaling / bins_per_cell
    column = np.floor((xy[:, 0] + columns * scaling / 2) / size).astype(int)
    row = np.floor((rows * scaling / 2 - xy[:, 1]) / size).astype(int)
    inside = (row >= 0) & (row < rows * bins_per_cell) & (column >= 0) & (column < columns * bins_per_cell)
    counts = np.zeros((rows * bins_per_cell, columns * bins_per_cell), dtype=np.int64)
    np.add.at(counts, (row[inside], column[inside]), 1)
    return counts


def achieved_xy(dataset) -> np.ndarray:
    """Every step's achieved_goal (the agent's xy), over all episodes."""
    return np.concatenate([episode.observations["achieved_goal"] for episode in dataset.iterate_episodes()])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset_ids", nargs="+", help="Minari maze datasets (local, or downloadable)")
    parser.add_argument("--bins-per-cell", type=int, default=4, help="squares per cell side")
    parser.add_argument("--out", required=True, help="where to write the picture (png)")
    args = parser.parse_args()
    if args.bins_per_cell < 1:
        raise SystemExit(f"error: --bins-per-cell must be at least 1, got {args.bins_per_cell}.")
    figure, axes = plt.subplots(1, len(args.dataset_ids), figsize=(4.6 * len(args.dataset_ids), 3.8), squeeze=False)
    for axis, dataset_id in zip(axes[0], args.dataset_ids):
        dataset = load_minari_dataset(dataset_id)
        maze = getattr(evaluation_env(dataset).unwrapped, "maze", None)
        if maze is None:
            raise SystemExit(f"error: {dataset_id} is not a maze dataset (its environment has no maze).")
        xy = achieved_xy(dataset)
        counts = visits(xy, maze.maze_map, maze.maze_size_scaling, args.bins_per_cell)
        share = np.where(counts > 0, counts / len(xy), np.nan)
        half_x, half_y = maze.map_width * maze.maze_size_scaling / 2, maze.map_length * maze.maze_size_scaling / 2
        extent = (-half_x, half_x, -half_y, half_y)
        walls = np.array([[1.0 if cell == 1 else np.nan for cell in row] for row in maze.maze_map])
        image = axis.imshow(share, extent=extent, cmap="viridis", norm=matplotlib.colors.LogNorm())
        axis.imshow(walls, extent=extent, cmap="gray_r", vmin=0, vmax=1.6)
        reset, goal = maze.unique_reset_locations[0], maze.unique_goal_locations[0]
        axis.scatter(*reset, color="tab:green", s=70, zorder=3, edgecolors="white")
        axis.scatter(*goal, color="tab:red", marker="*", s=160, zorder=3, edgecolors="white")
        never = np.mean([counts[r * args.bins_per_cell:(r + 1) * args.bins_per_cell,
                                c * args.bins_per_cell:(c + 1) * args.bins_per_cell].sum() == 0
                         for r, row in enumerate(maze.maze_map) for c, cell in enumerate(row) if cell != 1])
        axis.set_title(f"{dataset_id}\n{len(xy):,} steps; free cells never visited: {100 * never:.0f} %", fontsize=8)
        axis.set_xticks([])
        axis.set_yticks([])
        figure.colorbar(image, ax=axis, fraction=0.035, label="share of steps")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

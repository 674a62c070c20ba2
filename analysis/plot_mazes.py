"""Draw the mazes of the generated family (collect_data.py --env pointmaze-gen): walls, the evaluation task's reset
cell (green) and goal cell (red), and its shortest path between them, one panel per maze seed.

    python analysis/plot_mazes.py --seeds 0 1 2 3 100 101 102 103 104 105 --out docs/maze_family.png
"""

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from collect_data import WaypointPlanner, generate_maze  # noqa: E402


def shortest_path(maze_map, start: tuple, goal: tuple) -> list:
    """The cells from `start` to `goal` along a shortest path of the maze's free cells."""
    step_towards = WaypointPlanner(maze_map).next_cell[goal]
    path = [start]
    while path[-1] != goal:
        path.append(step_towards[path[-1]])
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="maze seeds to draw")
    parser.add_argument("--labels", nargs="*", default=None, help="a title per seed (default: 'maze K')")
    parser.add_argument("--out", default="docs/maze_family.png", help="where to write the picture")
    args = parser.parse_args()
    columns = min(5, len(args.seeds))
    rows = -(-len(args.seeds) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.6 * rows), squeeze=False)
    for index, seed in enumerate(args.seeds):
        axis = axes[index // columns][index % columns]
        maze = generate_maze(seed)
        axis.imshow(1 - np.array(maze["maze_map"]), cmap="gray", vmin=-0.3, vmax=1)
        path = np.array(shortest_path(maze["maze_map"], maze["reset_cell"], maze["goal_cell"]))
        axis.plot(path[:, 1], path[:, 0], color="tab:blue", linewidth=1.5, alpha=0.6)
        axis.scatter(*maze["reset_cell"][::-1], color="tab:green", s=70, zorder=3)
        axis.scatter(*maze["goal_cell"][::-1], color="tab:red", marker="*", s=140, zorder=3)
        title = args.labels[index] if args.labels else f"maze {seed}"
        axis.set_title(f"{title}: path {len(path) - 1} cells", fontsize=9)
        axis.set_xticks([])
        axis.set_yticks([])
    for index in range(len(args.seeds), rows * columns):
        axes[index // columns][index % columns].axis("off")
    figure.tight_layout()
    figure.savefig(args.out, dpi=110)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

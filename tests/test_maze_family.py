"""The generated maze family (`collect_data.py --env pointmaze-gen --maze-seed K`, `--env pointmaze-gen-K` in the
scripts): its properties by hand, its datasets, and a script that trains and evaluates on one."""

import minari
import numpy as np
import pytest

import collect_data as cd
from conftest import run_script
from opal_utils import resolve_dataset_id

FREE = 0


def neighbours(cell):
    r, c = cell
    return [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]


def shortest_paths(maze_map, source):
    """Breadth-first search written here: steps from `source` to every cell it reaches."""
    distance, frontier = {source: 0}, [source]
    while frontier:
        following = []
        for cell in frontier:
            for n in neighbours(cell):
                if maze_map[n[0]][n[1]] == FREE and n not in distance:
                    distance[n] = distance[cell] + 1
                    following.append(n)
        frontier = following
    return distance


@pytest.mark.parametrize("seed", range(12))
def test_a_generated_maze_is_walled_connected_and_its_task_spans_its_longest_path(seed):
    maze = cd.generate_maze(seed)
    grid = np.array(maze["maze_map"])
    assert grid.shape == (9, 12)  # D4RL's large map's size
    assert (grid[0] == 1).all() and (grid[-1] == 1).all() and (grid[:, 0] == 1).all() and (grid[:, -1] == 1).all()
    free = [tuple(cell) for cell in np.argwhere(grid == FREE)]
    assert 35 <= len(free) <= 60
    reached = shortest_paths(maze["maze_map"], free[0])
    assert set(reached) == set(free)  # every free cell reachable
    diameter = max(max(shortest_paths(maze["maze_map"], cell).values()) for cell in free)
    assert shortest_paths(maze["maze_map"], maze["reset_cell"])[maze["goal_cell"]] == diameter >= 12
    assert sum(maze["reset_cell"]) <= sum(maze["goal_cell"])  # the reset cell is the end nearer the top-left
    dead_ends = [cell for cell in free if sum(grid[n] == FREE for n in neighbours(cell)) == 1]
    assert len(dead_ends) >= 3
    # a few loops: more passages than a tree over the free cells has
    passages = sum(grid[cell] == FREE and grid[n] == FREE for cell in free for n in neighbours(cell)) // 2
    assert passages > len(free) - 1


def test_generated_mazes_repeat_by_seed_and_differ_between_seeds():
    assert cd.generate_maze(5) == cd.generate_maze(5)
    maps = {str(cd.generate_maze(seed)["maze_map"]) for seed in range(20)}
    assert len(maps) == 20


def test_the_scripts_alias_of_a_generated_maze():
    assert resolve_dataset_id("pointmaze-gen-7", None) == "opal/pointmaze-gen7-diverse-v0"
    assert cd.GENERATED_SIZE == (9, 12)


def test_a_generated_maze_dataset_and_a_run_on_it(sandbox):
    """The D4RL recipe in maze 3: the data stays inside its walls (collect_data's own checks) and the evaluation env
    stored with it is maze 3 with its reset and goal cells; opal_cql.py without primitives, at its default value
    method (IQL), trains and evaluates there."""
    made = run_script(sandbox, "collect_data.py", "--env", "pointmaze-gen", "--maze-seed", 3, "--steps", 2000,
                      "--episode-length", 500)
    assert made.returncode == 0, made.stderr[-2000:]
    dataset = minari.load_dataset("opal/pointmaze-gen3-diverse-v0")
    maze = cd.generate_maze(3)
    eval_map = dataset.recover_environment(eval_env=True).unwrapped.maze.maze_map
    assert eval_map[maze["reset_cell"][0]][maze["reset_cell"][1]] == "r"
    assert eval_map[maze["goal_cell"][0]][maze["goal_cell"][1]] == "g"
    walls = [[1 if v == 1 else 0 for v in row] for row in eval_map]
    assert walls == maze["maze_map"]
    result = run_script(sandbox, "opal_cql.py", "--env", "pointmaze-gen-3", "--primitives", "none", "--hidden-dim", 32,
                        "--critic-layers", 2, "--policy-layers", 2, "--batch-size", 32, "--total-steps", 20,
                        "--eval-every", 20, "--eval-episodes", 2, "--num-envs", 2, "--runs-dir",
                        sandbox["base"] / "gen-runs")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "20 IQL steps" in result.stdout and "normalized score" in result.stdout


def test_coverage_counts_land_in_the_right_cells_by_hand():
    """analysis/plot_coverage.py: on a 3 × 4 map with 2-unit cells (centred on 0: x in [-4, 4], y in [-3, 3]),
    a point at a cell's centre lands in that cell's bins, row 0 at the top; points off the map are dropped."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    import plot_coverage

    maze_map = [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1]]
    xy = np.array([[-1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-3.0, 2.0], [3.9, -2.9], [5.0, 0.0], [0.0, 3.5]])
    counts = plot_coverage.visits(xy, maze_map, scaling=2.0, bins_per_cell=1)
    assert counts.tolist() == [[1, 0, 0, 0], [0, 2, 1, 0], [0, 0, 0, 1]]
    fine = plot_coverage.visits(np.array([[-1.5, 0.5], [-0.5, -0.5]]), maze_map, scaling=2.0, bins_per_cell=2)
    assert fine.shape == (6, 8) and fine[2, 2] == 1 and fine[3, 3] == 1 and fine.sum() == 2

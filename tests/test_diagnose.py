"""analysis/diagnose_cql.py's evaluation-time variants of the task policy: the clipped choice must be tanh of the
mean, clipped per dimension to the prior's mean ± k standard deviations, and nothing else."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
import diagnose_cql  # noqa: E402


class FixedPolicy(torch.nn.Module):
    """Chooses `choice` when asked deterministically and `choice + 100` when sampling."""

    def __init__(self, choice):
        super().__init__()
        self.choice = choice

    def forward(self, states, deterministic=False):
        return (self.choice if deterministic else self.choice + 100).expand(len(states), -1), None


class FixedPrior(torch.nn.Module):
    """ρ(z|s) = N(mean, std²) at every state, as (mean, log std)."""

    def forward(self, states):
        mean, std = torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 0.5, 2.0])
        return mean.expand(len(states), -1), std.log().expand(len(states), -1)


def test_prior_clipped_choice_clips_the_mean_to_k_prior_stds():
    policy = FixedPolicy(torch.tensor([[3.0, 1.2, -9.0]]))  # 3σ above, 0.4σ above, 4σ below
    states = torch.zeros(4, 2)
    for k, expected in ((2.0, [2.0, 1.2, -5.0]), (0.5, [0.5, 1.2, -2.0]), (10.0, [3.0, 1.2, -9.0])):
        choice, _ = diagnose_cql.PriorClippedChoice(policy, FixedPrior(), k)(states, deterministic=False)
        assert torch.allclose(choice, torch.tensor(expected).expand(4, -1)), (k, choice)


def test_sampled_choice_samples_even_when_asked_for_the_mean():
    choice, _ = diagnose_cql.SampledChoice(FixedPolicy(torch.zeros(1, 3)))(torch.zeros(2, 2), deterministic=True)
    assert torch.equal(choice, torch.full((2, 3), 100.0))


def test_value_map_places_states_at_rest_inside_every_free_cell():
    """analysis/value_map.py: k² points inside each free cell (none in walls), and pointmaze states at rest there;
    an antmaze state keeps the template's body and takes the xy as achieved_goal."""
    from types import SimpleNamespace

    import numpy as np
    import value_map

    maze_map = [[1, 1, 1], [1, 0, 1], [1, 0, 1], [1, 1, 1]]
    centre = {(1, 1): np.array([-1.0, 2.0]), (2, 1): np.array([-1.0, 0.0])}  # the two free cells' centres
    maze = SimpleNamespace(maze_map=maze_map, maze_size_scaling=2.0, cell_rowcol_to_xy=lambda rc: centre[tuple(rc)])
    points = value_map.grid_points(maze, 2)
    assert points.shape == (8, 2)
    for cell in centre.values():  # four points per cell, each a quarter of the 2-unit cell from its centre
        offsets = points[np.abs(points - cell).max(1) < 1] - cell
        assert sorted(map(tuple, offsets)) == [(-0.5, -0.5), (-0.5, 0.5), (0.5, -0.5), (0.5, 0.5)]
    template = {"observation": np.array([9.0, 9.0, 3.0, -2.0]), "achieved_goal": np.zeros(2),
                "desired_goal": np.ones(2)}
    states = value_map.states_at(template, ["observation"], np.array([[0.5, -1.5]]))
    assert states.tolist() == [[0.5, -1.5, 0.0, 0.0]]
    ant = {"observation": np.arange(4.0), "achieved_goal": np.zeros(2), "desired_goal": np.ones(2)}
    states = value_map.states_at(ant, ["achieved_goal", "observation"], np.array([[0.5, -1.5]]))
    assert states.tolist() == [[0.5, -1.5, 0.0, 1.0, 2.0, 3.0]]


def test_shortest_path_goes_around_the_wall():
    """analysis/plot_mazes.shortest_path (value_map.py's path report): on a U-shaped map the path from one arm to
    the other goes down, across and up, never through the wall between the arms."""
    from plot_mazes import shortest_path

    maze_map = [[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]]
    assert shortest_path(maze_map, (1, 1), (1, 3)) == [(1, 1), (2, 1), (2, 2), (2, 3), (1, 3)]


def test_panels_name_the_method_and_draw_every_wall_cell():
    """analysis/plot_rollouts.py (shared with value_map.py): a panel's title names the checkpoint's algorithm (CQL
    where a checkpoint predates --algorithm) and whether it has primitives; one grey square per wall cell, centred
    where the maze puts that cell."""
    from types import SimpleNamespace

    import matplotlib.pyplot as plt
    import numpy as np
    from plot_rollouts import draw_walls, method_label

    assert method_label({"args": {"algorithm": "iql"}, "primitives": "opal"}) == "IQL+OPAL"
    assert method_label({"args": {"algorithm": "iql"}, "primitives": "none"}) == "IQL"
    assert method_label({"args": {}, "primitives": "opal"}) == "CQL+OPAL"
    maze_map = [[1, 1, 1], [1, 0, 1], [1, 1, 1]]
    maze = SimpleNamespace(maze_map=maze_map, maze_size_scaling=4.0,
                           cell_rowcol_to_xy=lambda rc: np.array([10.0 * rc[1], -10.0 * rc[0]]))
    figure, axis = plt.subplots()
    draw_walls(axis, maze)
    corners = sorted(tuple(patch.get_xy()) for patch in axis.patches)
    walls = [(r, c) for r, row in enumerate(maze_map) for c, cell in enumerate(row) if cell == 1]
    assert corners == sorted((10.0 * c - 2.0, -10.0 * r - 2.0) for r, c in walls)
    assert all(patch.get_width() == patch.get_height() == 4.0 for patch in axis.patches)
    plt.close(figure)

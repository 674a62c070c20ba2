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
    assert method_label({"script": "opal_online_sac", "args": {}, "primitives": "opal"}) == "SAC+OPAL"
    assert method_label({"script": "opal_fewshot_il", "args": {}, "primitives": "none"}) == "BC"
    assert method_label({"script": "opal_vae", "args": {}}, "sample") == "prior: z ~ ρ(z|s)"
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


def test_prior_choice_is_the_prior_mean_or_a_sample_from_the_prior():
    """analysis/plot_rollouts.py's PriorChoice (an opal_vae.pt's own choices): the mean of ρ(z|s) whatever the caller
    asks, or, with sample, draws whose mean and std per dimension are the prior's."""
    from plot_rollouts import PriorChoice

    states = torch.zeros(20_000, 2)
    for deterministic in (True, False):
        choice, _ = PriorChoice(FixedPrior(), sample=False)(states[:3], deterministic=deterministic)
        assert torch.equal(choice, torch.tensor([[0.0, 1.0, -1.0]]).expand(3, -1))
    torch.manual_seed(0)
    draws, _ = PriorChoice(FixedPrior(), sample=True)(states, deterministic=True)
    assert torch.allclose(draws.mean(0), torch.tensor([0.0, 1.0, -1.0]), atol=0.05), draws.mean(0)
    assert torch.allclose(draws.std(0), torch.tensor([1.0, 0.5, 2.0]), rtol=0.03), draws.std(0)


def test_prior_rollouts_of_a_vae_checkpoint(vae_checkpoints):
    """plot_rollouts.rollout_paths on an opal_vae.pt: the prior and decoder load from the file and drive an episode
    of xy points; the prior's mean repeats its path exactly, its samples do not."""
    import numpy as np
    from plot_rollouts import rollout_paths

    payload, maze, paths, successes = rollout_paths(vae_checkpoints["pointmaze"], 1)
    assert payload["script"] == "opal_vae" and len(paths) == len(successes) == 1
    assert len(paths[0]) > 100 and paths[0].shape[1] == 2
    again = rollout_paths(vae_checkpoints["pointmaze"], 1)[2]
    assert np.array_equal(paths[0], again[0])
    sampled = rollout_paths(vae_checkpoints["pointmaze"], 1, "sample")[2]
    assert not np.array_equal(paths[0], sampled[0])


def test_buffer_reach_counts_goal_transitions_and_orders_a_full_buffer():
    """analysis/buffer_reach.py: the closest distance to the goal, the transitions within 0.45 of it, the terminal
    ones, and the spread per tenth oldest first, also where a full buffer has wrapped (oldest row at `position`)."""
    from buffer_reach import buffer_reach

    xy = torch.zeros(20, 2)
    xy[:10, 0] = 1.0  # the older half 1 from the start, the newer half 5 from it
    xy[10:, 0] = 5.0
    xy[13] = torch.tensor([9.7, 0.0])  # 0.3 from the goal at (10, 0): at the goal
    xy[17] = torch.tensor([9.0, 0.0])
    buffer = {"size": 20, "position": 20, "next_states": torch.cat([xy, torch.randn(20, 3)], 1),
              "dones": (torch.arange(20) == 13).float()}
    reach = buffer_reach(buffer, goal=torch.tensor([10.0, 0.0]).numpy(), start=torch.zeros(2).numpy())
    assert reach["transitions"] == 20 and abs(reach["closest"] - 0.3) < 1e-6
    assert reach["at_goal"] == 1 and reach["terminal"] == 1
    assert reach["spread"][:5] == [1.0] * 5 and reach["spread"][5] == 5.0
    assert abs(reach["spread"][6] - (5.0 + 0.9 * 4.7)) < 1e-5  # rows 12, 13: 5 and 9.7
    wrapped = {**buffer, "position": 10,  # full and wrapped: rows 10-19 are the older half now
               "next_states": torch.roll(buffer["next_states"], 10, 0), "dones": torch.roll(buffer["dones"], 10)}
    assert buffer_reach(wrapped, torch.tensor([10.0, 0.0]).numpy(), torch.zeros(2).numpy()) == reach

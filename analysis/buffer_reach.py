"""Where an online run's own experience went: from an opal_online_sac.pt's replay buffer (every transition it
collected, warm-up included, up to the buffer's size), how close its states came to the maze's goal, how many
transitions ended within the task's success radius, how many were terminal, and, per tenth of the run, how far
from the reset cell the agent got (90th percentile). A critic trained on a sparse reward learns the goal's value
only from transitions that reached it: zero here means that the run never saw its reward. With primitives a
transition stores only the state where its primitive ended, so the distances are measured there; a primitive
stops at the step that reaches the goal, and that transition is terminal, so the terminal count misses none.

Run:  python analysis/buffer_reach.py runs/<opal_online_sac run>/opal_online_sac.pt [more.pt ...]
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opal_cql import SUCCESS_RADIUS  # noqa: E402  (gymnasium-robotics' mazes: 0.45)
from opal_utils import evaluation_env, load_minari_dataset  # noqa: E402


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[list[str]]
    """opal_online_sac.pt files (their maze's xy is the first two state entries)"""


def buffer_reach(buffer: dict, goal: np.ndarray, start: np.ndarray) -> dict:
    """How close the buffer's next states (xy: their first two entries) came to `goal`, how many lie within the
    success radius, how many transitions are terminal, and the 90th percentile of the distance from `start` in each
    tenth of the buffer, oldest first (a full buffer's oldest row is at its write position)."""
    size, position = int(buffer["size"]), int(buffer["position"])
    order = np.roll(np.arange(size), -position) if position != size else np.arange(size)
    xy = buffer["next_states"][:size, :2].double().numpy()[order]
    to_goal, from_start = np.linalg.norm(xy - goal, axis=1), np.linalg.norm(xy - start, axis=1)
    return {"transitions": size, "closest": float(to_goal.min()), "at_goal": int((to_goal <= SUCCESS_RADIUS).sum()),
            "terminal": int(buffer["dones"][:size].sum()),
            "spread": [float(np.percentile(from_start[part], 90)) for part in np.array_split(np.arange(size), 10)]}


if __name__ == "__main__":
    args = tyro.cli(Args)
    for path in args.checkpoints:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        maze = evaluation_env(load_minari_dataset(payload["dataset_id"])).unwrapped.maze
        goal, start = maze.unique_goal_locations[0], maze.unique_reset_locations[0]
        reach = buffer_reach(payload["buffer"], goal, start)
        if payload["buffer"]["position"] != reach["transitions"]:
            print("note: the buffer is full; it holds only the run's latest transitions")
        print(f"{path}: {reach['transitions']} transitions, closest to the goal {reach['closest']:.1f} (reset cell at "
              f"{np.linalg.norm(goal - start):.1f}), {reach['at_goal']} within {SUCCESS_RADIUS} of it, "
              f"{reach['terminal']} terminal; 90th percentile of the distance from the reset cell per tenth: "
              + ", ".join(f"{spread:.1f}" for spread in reach["spread"]))

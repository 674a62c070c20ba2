"""Draw where trained policies go (opal_cql.py, opal_online_sac.py, opal_fewshot_il.py checkpoints): xy paths of
a few evaluation episodes per checkpoint, one panel each, on the maze of the dataset's evaluation environment (the
goal is the red star). An opal_vae.pt checkpoint draws its prior's own choices instead: every c steps z = the mean
of ρ(z|s) (or, with --prior sample, z ~ ρ(z|s)), decoded by the primitive policy; where opal_online_sac.py's task
policy starts. Each panel's episodes are also printed: successes, closest approach to the goal, farthest distance
from the start, and the length of the xy path per 1,000 steps (how fast the agent moves, whatever its direction).

Run:  python analysis/plot_rollouts.py runs/table/*/opal_cql.pt --out docs/pointmaze_rollouts.png
      python analysis/plot_rollouts.py runs/vae/opal_vae.pt --prior sample --out prior.png
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

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
    """opal_cql.pt, opal_online_sac.pt or opal_fewshot_il.pt files, or opal_vae.pt files (their prior's choices)"""
    out: str = "rollouts.png"
    """the picture to write"""
    episodes: int = 5
    """episodes per checkpoint (evaluation seeds seed + 10,000 onward, as in the script)"""
    prior: Literal["mean", "sample"] = "mean"
    """opal_vae.pt checkpoints: choose z as the mean of ρ(z|s) or sample it (the sampling follows --seed)"""
    seed: int = 0
    """torch seed for --prior sample"""


class PriorChoice(torch.nn.Module):
    """The VAE's prior ρ(z|s) as a task policy: its mean, or a sample from it (`sample`) whatever the caller asks."""

    def __init__(self, prior, sample: bool):
        super().__init__()
        self.prior, self.sample = prior, sample

    def forward(self, states, deterministic=False):
        mean, log_std = self.prior(states)
        return (mean + log_std.exp() * torch.randn_like(mean) if self.sample else mean), None


def checkpoint_policies(payload: dict, prior_choice: str = "mean"):
    """(task policy, primitive policy or None) of a policy's checkpoint; PriorChoice and the decoder of a VAE's."""
    if payload.get("script") != "opal_vae":
        return policies_from_checkpoint(payload, oc.TanhGaussianPolicy, oc.PrimitivePolicy)
    prior = oc.Prior(payload["obs_dim"], payload["latent_dim"], payload["hidden_dim"])
    prior.load_state_dict(payload["prior"])
    primitive_policy = oc.PrimitivePolicy(payload["obs_dim"], payload["act_dim"], payload["latent_dim"],
                                          payload["hidden_dim"])
    primitive_policy.load_state_dict(payload["primitive_policy"])
    return PriorChoice(prior, prior_choice == "sample"), primitive_policy


@torch.no_grad()
def rollout_paths(path, episodes, prior_choice="mean"):
    """(payload, maze, xy paths, successes) of `episodes` evaluation episodes of one checkpoint."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    saved = payload["args"]
    policy, primitive_policy = checkpoint_policies(payload, prior_choice)
    env = minari.load_dataset(payload["dataset_id"]).recover_environment(eval_env=True)
    low, high = np.array(payload["act_low"]), np.array(payload["act_high"])
    paths, successes = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=saved["seed"] + 10_000 + episode)
        xy, done, success = [obs["achieved_goal"]], False, False
        while not done:
            state = torch.as_tensor(flatten_observation(obs, payload["obs_layout"]))[None]
            choice, _ = policy(state, deterministic=True)
            for _ in range(payload["c"]):
                action = choice if primitive_policy is None else primitive_policy(state, choice)[0]
                obs, _, terminated, truncated, info = env.step(np.clip(action[0].numpy(), low, high))
                success = success or bool(info.get("success", False))
                xy.append(obs["achieved_goal"])
                state = torch.as_tensor(flatten_observation(obs, payload["obs_layout"]))[None]
                done = terminated or truncated
                if done:
                    break
        paths.append(np.array(xy))
        successes.append(success)
    return payload, env.unwrapped.maze, paths, successes


def method_label(payload: dict, prior_choice: str = "mean") -> str:
    """The method of a checkpoint as the tables name it: CQL, IQL+OPAL, SAC+OPAL, BC, ... (an opal_cql.pt from before
    --algorithm: CQL); for an opal_vae.pt, the prior's choice."""
    if payload.get("script") == "opal_vae":
        return "prior: z = mean of ρ(z|s)" if prior_choice == "mean" else "prior: z ~ ρ(z|s)"
    scripts = {"opal_online_sac": "SAC", "opal_fewshot_il": "BC"}
    method = scripts.get(payload.get("script"), payload["args"].get("algorithm", "cql").upper())
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
    torch.manual_seed(args.seed)
    columns = min(3, len(args.checkpoints))
    rows = -(-len(args.checkpoints) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(args.checkpoints):]:
        ax.axis("off")
    for ax, path in zip(axes.flat, args.checkpoints):
        payload, maze, paths, successes = rollout_paths(path, args.episodes, args.prior)
        draw_walls(ax, maze)
        goal = maze.unique_goal_locations[0]
        for xy in paths:
            ax.plot(xy[:, 0], xy[:, 1], lw=1)
        ax.plot(*goal, "r*", ms=12)
        label = method_label(payload, args.prior)
        closest = [np.linalg.norm(xy - goal, axis=1).min() for xy in paths]
        farthest = [np.linalg.norm(xy - xy[0], axis=1).max() for xy in paths]
        steps = sum(len(xy) - 1 for xy in paths)
        pace = 1000 * sum(np.linalg.norm(np.diff(xy, axis=0), axis=1).sum() for xy in paths) / steps
        print(f"{label}, seed {payload['seed']} ({path}): {sum(successes)}/{len(paths)} reach the goal; closest "
              f"approach {np.mean(closest):.1f} (from {np.linalg.norm(paths[0][0] - goal):.1f}), farthest from the "
              f"start {np.mean(farthest):.1f}, means over the episodes; path length {pace:.1f} per 1,000 steps")
        budget = "its VAE" if payload.get("script") == "opal_vae" else f"{payload['step']} steps"
        ax.set_title(f"{label}, seed {payload['seed']}, {budget}", fontsize=9)
        ax.set_aspect("equal")
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")

"""Do the Meta-World primitives of an opal_vae.pt do the task they were learnt from? A closed-loop check.

In Meta-World tasks (pick-place-v3 by default, the source of the primitives), every c steps a latent z is chosen
from the VAE's prior ρ(z|s) at the current state (its mean, or a sample), and the primitive policy's mean action
acts for c steps; an episode succeeds if Meta-World reports success at any step. With the scripted expert's data
behind the prior, a high success rate on pick-place says the primitives and the prior reproduce the expert; the
other tasks show what the same primitives do where they were never trained.

    python analysis/metaworld_primitives.py runs/<vae run>/opal_vae.pt --episodes 20
    python analysis/metaworld_primitives.py runs/<vae run>/opal_vae.pt --tasks pick-place-v3 reach-v3 drawer-close-v3
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_vae as ov  # noqa: E402
from opal_utils import load_checkpoint  # noqa: E402


@dataclass
class Args:
    vae_ckpt: tyro.conf.Positional[str]
    """opal_vae.pt trained on Meta-World data"""
    tasks: list[str] = field(default_factory=lambda: ["pick-place-v3"])
    """Meta-World v3 task names"""
    episodes: int = 20
    """episodes per task and mode"""
    seed: int = 0
    """seed of the environments' goal draws and of the prior's samples"""


@torch.no_grad()
def success_rate(env, prior, primitive_policy, c: int, episodes: int, sample: bool, generator) -> float:
    successes = 0
    for _ in range(episodes):
        observation, _ = env.reset()
        succeeded, done, t = False, False, 0
        while not done:
            state = torch.as_tensor(observation, dtype=torch.float32)[None]
            if t % c == 0:
                mean, log_std = prior(state)
                z = mean + log_std.exp() * torch.randn(mean.shape, generator=generator) if sample else mean
            action = primitive_policy(state, z)[0].clamp(-1.0, 1.0)[0].numpy()
            observation, _, terminated, truncated, info = env.step(action)
            succeeded |= bool(info["success"])
            done, t = terminated or truncated or succeeded, t + 1
        successes += succeeded
    return successes / episodes


def main(args: Args):
    import metaworld  # noqa: F401
    vae = load_checkpoint(args.vae_ckpt, "opal_vae")
    obs_dim, act_dim = vae["obs_dim"], vae["act_dim"]
    prior = ov.Prior(obs_dim, vae["latent_dim"], vae["hidden_dim"])
    prior.load_state_dict(vae["prior"])
    primitive_policy = ov.PrimitivePolicy(obs_dim, act_dim, vae["latent_dim"], vae["hidden_dim"])
    primitive_policy.load_state_dict(vae["primitive_policy"])
    generator = torch.Generator().manual_seed(args.seed)
    print(f"{args.vae_ckpt}: c = {vae['c']}, trained on {vae['dataset_id']}; {args.episodes} episodes a row")
    for task in args.tasks:
        env = gym.make("Meta-World/MT1", env_name=task, seed=args.seed)
        for sample in (False, True):
            rate = success_rate(env, prior, primitive_policy, vae["c"], args.episodes, sample, generator)
            print(f"{task:<28} z = {'a sample of ρ(z|s)' if sample else 'the mean of ρ(z|s)':<20} success {rate:.2f}")
        env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))

"""Why does an opal_cql.pt policy fail on a maze? Three checks on finished checkpoints (docs/opal_cql.md, "What we
found on pointmaze-large"):

  1. the latent box: how close the chosen latents come to the box's edge along evaluation rollouts, and where the
     rollouts end;
  2. the deterministic choice: success rate with tanh of the mean (as evaluated) versus z sampled from π(z|s), and
     versus tanh of the mean clipped per dimension to the VAE prior's mean ± k standard deviations (--prior-clip);
  3. the critic near a point: at the data's window starts within --radius of --point, Q of the data's own latents
     (split into windows that move toward the goal and the others), Q of the task policy's latent at the same
     states, and the best Q over --candidates latents taken from the data;
  4. training curves from the run's TensorBoard events: the CQL weight α', the CQL gap, Q of the data's choices
     and the TD loss at five points of the run;
  5. the critic against what happens: Q(s_0, z_π) at the first decision of evaluation episodes against the
     Monte-Carlo return of executing the policy (the run's reward transform and backup discount; truncated at the
     episode's end, so failures read less negative than their true value);
  6. where the chosen latents lie: log ρ(z|s) under the VAE's prior, the largest per-dimension distance from the
     prior's mean in its standard deviations, and the Mahalanobis distance to the relabelled latents, for the
     policy's choices along the rollouts and for the data's own latents at data states.

Run:  python analysis/diagnose_cql.py runs/<opal_cql run>/opal_cql.pt [more.pt ...] --point 2.6 -2.5
Needs the run's VAE checkpoint (for the encoder) and the dataset.
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import opal_cql as oc  # noqa: E402
from opal_utils import (  # noqa: E402
    evaluate, flatten_observation, load_flat_dataset, load_minari_dataset, make_eval_envs, policies_from_checkpoint
)


@dataclass
class Args:
    checkpoints: tyro.conf.Positional[list[str]]
    """opal_cql.pt files (with primitives) to diagnose"""
    point: tuple[float, float] = (2.6, -2.5)
    """xy around which the critic is probed (default: one cell west of pointmaze-large's goal)"""
    radius: float = 0.3
    """window starts within this distance of --point are probed"""
    candidates: int = 2000
    """data latents tried at every probed state for the best-Q column"""
    episodes: int = 30
    """evaluation episodes for check 2 (seeds as the run's final evaluation)"""
    prior_clip: tuple[float, ...] = (1.0, 2.0)
    """check 2 also evaluates tanh of the mean clipped to ρ(z|s)'s mean ± k standard deviations, for each k"""


class SampledChoice(torch.nn.Module):
    """The task policy, but always sampling z instead of taking tanh of its mean."""

    def __init__(self, task_policy):
        super().__init__()
        self.task_policy = task_policy

    def forward(self, states, deterministic=False):
        return self.task_policy(states, deterministic=False)


class PriorClippedChoice(torch.nn.Module):
    """The task policy's deterministic choice, clipped per dimension to the prior's mean ± k standard deviations."""

    def __init__(self, task_policy, prior, k: float):
        super().__init__()
        self.task_policy, self.prior, self.k = task_policy, prior, k

    def forward(self, states, deterministic=False):
        choice, log_prob = self.task_policy(states, deterministic=True)
        mean, log_std = self.prior(states)
        half_width = self.k * log_std.exp()
        return torch.clamp(choice, mean - half_width, mean + half_width), log_prob


if __name__ == "__main__":
    args = tyro.cli(Args)
    torch.manual_seed(0)
    loaded = {}  # dataset id -> (Minari dataset, flat tensors): read the 1M steps once for all checkpoints
    for path in args.checkpoints:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if payload["primitives"] != "opal":
            print(f"{path}: trained without primitives; nothing to diagnose here")
            continue
        task_policy, primitive_policy = policies_from_checkpoint(payload, oc.TanhGaussianPolicy, oc.PrimitivePolicy)
        saved, c = payload["args"], payload["c"]
        critics = oc.Critics(payload["obs_dim"], payload["choice_dim"], saved["hidden_dim"], saved["critic_layers"],
                             layer_norm=saved.get("critic_layer_norm", False))
        critics.load_state_dict(payload["critics"])
        if payload["dataset_id"] not in loaded:
            dataset = load_minari_dataset(payload["dataset_id"])
            flat = load_flat_dataset(dataset, payload["obs_layout"], torch.device("cpu"))
            loaded[payload["dataset_id"]] = dataset, flat
        dataset, data = loaded[payload["dataset_id"]]
        layout, low, high = payload["obs_layout"], np.array(payload["act_low"]), np.array(payload["act_high"])
        print(f"== {path} (step {payload['step']})")
        vae = torch.load(payload["vae_ckpt"], map_location="cpu", weights_only=True)
        prior = oc.Prior(payload["obs_dim"], vae["latent_dim"], vae["hidden_dim"])
        prior.load_state_dict(vae["prior"])

        # 1 and 2: rollouts, box fractions, deterministic versus sampled choice; the same 10 rollouts collect, for
        # check 5, Q at the first decision and the return Σ_j Γ_j R_j under the run's reward transform and backup
        # discount until the goal is reached, and, for check 6, the states and latents of every decision before it
        gamma, rule = saved["gamma"], saved.get("high_level_discount", "window")
        envs = make_eval_envs(dataset, 10)
        obs, _ = envs.reset(seed=[saved["seed"] + 10_000 + i for i in range(10)])
        largest_fraction, q_first, chosen_states, chosen_latents = 0.0, None, [], []
        running, reached = np.ones(10, dtype=bool), np.zeros(10, dtype=bool)
        returns, weight = np.zeros(10), np.ones(10)  # Σ over decisions of Γ_j R_j, and Γ_j
        with torch.no_grad():
            for _ in range(envs.envs[0].spec.max_episode_steps // c):
                states = torch.as_tensor(flatten_observation(obs, layout))
                choice, _ = task_policy(states, deterministic=True)
                fraction = ((choice - task_policy.center) / task_policy.half_range).abs().max()
                largest_fraction = max(largest_fraction, float(fraction))
                chosen_states.append(states[torch.as_tensor(running)])
                chosen_latents.append(choice[torch.as_tensor(running)])
                if q_first is None:
                    q_first = critics(states, choice).min(0).values.numpy()
                window_return = np.zeros(10)
                for t in range(c):
                    action, _ = primitive_policy(torch.as_tensor(flatten_observation(obs, layout)), choice)
                    obs, _, terminated, truncated, info = envs.step(np.clip(action.numpy(), low, high))
                    success = np.asarray(info.get("success", np.zeros(10, dtype=bool)), dtype=bool)
                    window_return += running * gamma ** t * (saved["reward_scale"] * success + saved["reward_bias"])
                    reached |= success & running
                    running &= ~(success | terminated | truncated)  # the relabelled task ends at the goal
                returns += weight * window_return
                weight *= gamma ** (c if rule == "window" else 1)
        ends = np.round(obs["achieved_goal"], 2).tolist() if isinstance(obs, dict) else "n/a"
        print(f"  1. largest |choice − centre| / half-width along 10 rollouts: {largest_fraction:.2f}; end points {ends}")
        variants = [("tanh of the mean", task_policy), ("sampled z", SampledChoice(task_policy))]
        variants += [(f"clipped to ρ ± {k:g}σ", PriorClippedChoice(task_policy, prior, k)) for k in args.prior_clip]
        for name, policy in variants:
            success, _, distance = evaluate(envs, layout, oc.HierarchicalPolicy(policy, primitive_policy, c),
                                            args.episodes, saved["seed"] + 10_000, low, high)
            print(f"  2. {name:<18} success {success:.2f}, closest distance to the goal {distance:.2f}")
        maze = envs.envs[0].unwrapped.maze
        envs.close()

        # 3: the critic at the data's window starts near --point
        encoder = oc.Encoder(payload["obs_dim"], payload["act_dim"], vae["latent_dim"], vae["hidden_dim"],
                             vae["gru_layers"])
        encoder.load_state_dict(vae["encoder"])
        starts = oc.window_starts(data["episode_lengths"], c, stride=saved["relabel_stride"] or c)
        xy = data["achieved_goal"][starts]
        near = starts[(xy - torch.tensor(args.point)).norm(dim=1) < args.radius]
        if len(near) == 0:
            print(f"  3. no window starts within {args.radius} of {args.point}")
        else:
            goal = torch.as_tensor(np.asarray(maze.unique_goal_locations[0]), dtype=torch.float32)
            offsets = torch.arange(c)
            with torch.no_grad():
                states = data["observations"][near]
                choices = encoder(data["observations"][near[:, None] + offsets], data["actions"][near[:, None] + offsets])[0]
                q_data = critics(states, choices).min(0).values
                q_policy = critics(states, task_policy(states, deterministic=True)[0]).min(0).values
                pool = starts[torch.randperm(len(starts))[:args.candidates]]
                pool_choices = encoder(data["observations"][pool[:, None] + offsets], data["actions"][pool[:, None] + offsets])[0]
                q_best = torch.stack([critics(states, z.expand(len(states), -1)).min(0).values for z in pool_choices]).max(0).values
            toward = ((data["achieved_goal"][near + c] - goal).norm(dim=1) < (data["achieved_goal"][near] - goal).norm(dim=1))
            print(f"  3. {len(near)} window starts within {args.radius} of {args.point}:")
            for name, mask in (("moving toward the goal", toward), ("the others", ~toward)):
                if mask.any():
                    print(f"     {name:<23} {int(mask.sum()):>4}: Q(s, data's z) {q_data[mask].mean():8.1f}, "
                          f"Q(s, policy's z) {q_policy[mask].mean():8.1f}, best of {len(pool)} data z {q_best[mask].mean():8.1f}")

        # 4: training curves
        events = EventAccumulator(str(Path(path).parent))
        events.Reload()
        tags = ("losses/alpha_prime", "losses/cql_gap", "losses/q_data", "losses/td_loss")
        if all(tag in events.Tags()["scalars"] for tag in tags):
            series = {tag: events.Scalars(tag) for tag in tags}
            picks = np.unique(np.linspace(0, len(series[tags[0]]) - 1, 5).round().astype(int))
            print("  4. step     " + "  ".join(f"{tag.split('/')[1]:>11}" for tag in tags))
            for i in picks:
                print(f"     {series[tags[0]][i].step:>7}  " + "  ".join(f"{series[tag][i].value:11.2f}" for tag in tags))

        # 5: Q at the first decision against the Monte-Carlo return of executing the policy (collected in 1)
        print(f"  5. Q(s_0, z_π) at the first decision {q_first.mean():8.1f}; Monte-Carlo return of executing π "
              f"{returns.mean():8.1f} (episodes that reach the goal: {int(reached.sum())} of 10, their return "
              f"{returns[reached].mean() if reached.any() else float('nan'):.1f}; others {returns[~reached].mean() if (~reached).any() else float('nan'):.1f}, truncated)")

        # 6: the chosen latents against the data's latents
        with torch.no_grad():
            data_latents = oc.encode_windows(encoder, data["observations"], data["actions"], starts, c)
            centre, covariance = data_latents.mean(0), torch.cov(data_latents.T)
            precision = torch.linalg.inv(covariance)
            mahalanobis = lambda z: ((z - centre) @ precision * (z - centre)).sum(-1).sqrt()
            sample = torch.randperm(len(starts))[:5000]
            data_states = data["observations"][starts[sample]]
            policy_states, policy_latents = torch.cat(chosen_states), torch.cat(chosen_latents)
            for name, states_, latents_ in (("policy's z along the rollouts", policy_states, policy_latents),
                                            ("data's z at data states", data_states, data_latents[sample])):
                prior_mean, prior_log_std = prior(states_)
                log_prior = oc.gaussian_log_prob(latents_, prior_mean, prior_log_std)
                widest = ((latents_ - prior_mean) / prior_log_std.exp()).abs().max(-1).values  # in ρ's σ
                distance = mahalanobis(latents_)
                print(f"  6. {name:<30} log ρ(z|s) median {log_prior.median():7.2f}, largest |z − μ_ρ| / σ_ρ median "
                      f"{widest.median():4.2f} (90th percentile {widest.quantile(0.9):4.2f}), Mahalanobis distance "
                      f"median {distance.median():5.2f} (90th percentile {distance.quantile(0.9):5.2f})")

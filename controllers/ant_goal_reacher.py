"""A goal-reaching ant for making AntMaze data offline (issue 32), trained by this project's SAC.

D4RL made its antmaze data by driving a goal-reaching ant policy along waypoints through the maze (Fu et al.,
2020). This trains such a policy here: the ant of gymnasium-robotics' AntMaze (gymnasium's `ant.xml`, which AntMaze
v4 loads, here without the maze's walls) walks to a goal a few metres away. It sees AntMaze's 27-d observation (the
torso's height and orientation, the joint angles, all velocities) and the goal relative to its torso: the vector to
the goal turned into the torso's heading frame. Reward, Ant-v4's with "forward" replaced by "toward the goal": the
speed toward the goal (m/s) + 1 for staying upright - 0.5 |a|², and +1 when the goal is reached (within 0.45 m,
AntMaze's radius), after which a new goal is drawn; an ant whose torso leaves 0.2-1.0 m of height, or that lies on
its back, has fallen (the episode ends). Goals are drawn 1-5 m away in any direction. SAC is `opal_online_sac.SAC`
on raw actions.

    python controllers/ant_goal_reacher.py train --total-steps 1000000        # ~CPU hours; Ctrl-C, then --resume
    python controllers/ant_goal_reacher.py evaluate --episodes 100             # goals 4 m away (one maze cell)
Writes: runs/ant_goal_reacher__<seed>__<time>/ (TensorBoard, checkpoint with the replay buffer) and, at the end of
training, controllers/ant_goal_reacher.pt (the policy alone, what collect_data.py loads). The committed one is seed
1's policy at step 1,000,000 (99 of 100 goals 4 m away at 1.67 m/s; ~4.8 h at one thread; docs/collect_data.md,
item 9).
"""

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Optional

import numpy as np
import torch
import tyro
from gymnasium.envs.mujoco.ant_v4 import AntEnv

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from opal_online_sac import SAC, TanhGaussianPolicy  # noqa: E402
from opal_utils import ReplayBuffer, fail, stop_signals  # noqa: E402

HERE = Path(__file__).resolve().parent
POLICY_FILE = HERE / "ant_goal_reacher.pt"
OBS_DIM, ACT_DIM = 27 + 2, 8  # AntMaze's observation and the goal in the torso's frame; the 8 joint torques
REACHED = 0.45  # AntMaze's success radius (m)


@dataclass
class Args:
    mode: Literal["train", "evaluate"] = "train"
    """train the controller, or measure its success at goals --goal-distance away"""
    seed: int = 1
    total_steps: int = 1_000_000
    """environment steps of training (one gradient step each after --learning-starts)"""
    learning_starts: int = 10_000
    """random actions first; their states also fit the networks' input normalisers"""
    batch_size: int = 256
    gamma: float = 0.99
    episode_steps: int = 1000
    """steps per training episode (a fallen ant ends it sooner)"""
    hidden_dim: int = 256
    layers: int = 2
    critic_lr: float = 1e-3
    """CleanRL's SAC: 1e-3 for the critics, 3e-4 for the policy, τ = 0.005"""
    policy_lr: float = 3e-4
    tau: float = 0.005
    save_every: int = 50_000
    log_every: int = 5_000
    runs_dir: str = "runs"
    resume: Optional[str] = None
    """a run's checkpoint.pt to continue (with its replay buffer), or its agent.pt (the networks, temperature and
    optimisers only: the buffer refills with --learning-starts steps of the policy itself before updates resume)"""
    episodes: int = 100
    """evaluate: episodes, each with one goal --goal-distance away in a random direction"""
    goal_distance: float = 4.0
    """evaluate: metres to the goal (4: one AntMaze cell)"""
    max_steps: int = 400
    """evaluate: steps an episode may take (20 s of simulated time)"""
    policy_file: str = str(POLICY_FILE)
    """the policy's weights: written by train, read by evaluate"""

    def __post_init__(self):
        for name in ("total_steps", "batch_size", "episode_steps", "episodes", "max_steps", "save_every", "log_every"):
            if getattr(self, name) < 1:
                fail(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}.")


def torso_yaw(quaternion) -> float:
    """Heading of the torso about the vertical axis from its orientation quaternion (w, x, y, z)."""
    w, x, y, z = quaternion
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def on_its_back(quaternion) -> bool:
    """Whether the torso's up axis points below the horizon (the ant lies on its back: it does not get up again,
    yet its torso stays within Ant-v4's healthy heights)."""
    w, x, y, z = quaternion
    return 1 - 2 * (x * x + y * y) < 0  # the z component of the torso's up axis


def controller_input(ant_observation, goal_xy) -> np.ndarray:
    """What the controller reads: AntMaze's 27-d observation (qpos[2:] and qvel) and the goal relative to the
    torso, turned into the torso's heading frame (x ahead, y to its left). `ant_observation`: the 29 numbers
    qpos[:15] + qvel[:14], the torso's x, y first (AntMaze's achieved_goal and observation, concatenated)."""
    torso_xy, observation = ant_observation[:2], ant_observation[2:]
    yaw = torso_yaw(observation[1:5])  # qpos[3:7]
    dx, dy = np.asarray(goal_xy) - torso_xy
    ahead, left = math.cos(yaw) * dx + math.sin(yaw) * dy, -math.sin(yaw) * dx + math.cos(yaw) * dy
    return np.concatenate([observation, [ahead, left]]).astype(np.float32)


class GoalReachingAnt:
    """The ant in open space with a goal; `step` returns (controller input, reward, fell, reached, distance)."""

    def __init__(self, seed: int):
        self.ant = AntEnv(exclude_current_positions_from_observation=False, reset_noise_scale=0.1)
        self.rng = np.random.default_rng(seed)
        self.seed = seed

    def new_goal(self, torso_xy, distance=None):
        distance = self.rng.uniform(1.0, 5.0) if distance is None else distance
        angle = self.rng.uniform(0, 2 * math.pi)
        self.goal = torso_xy + distance * np.array([math.cos(angle), math.sin(angle)])

    def reset(self, goal_distance=None):
        self.state, _ = self.ant.reset(seed=int(self.rng.integers(2 ** 31)))
        self.new_goal(self.state[:2], goal_distance)
        self.distance = float(np.linalg.norm(self.goal - self.state[:2]))
        return controller_input(self.state, self.goal)

    def step(self, action, new_goals=True):
        self.state, _, fell, _, info = self.ant.step(action)
        fell = fell or on_its_back(self.state[3:7])  # (qpos[3:7]: the torso's orientation)
        distance = float(np.linalg.norm(self.goal - self.state[:2]))
        reached = distance <= REACHED
        # Ant-v4's reward with the forward speed replaced by the speed toward the goal
        reward = (self.distance - distance) / self.ant.dt + 1.0 - 0.5 * float(np.square(action).sum()) + reached
        self.distance = distance
        if reached and new_goals:
            self.new_goal(self.state[:2])
            self.distance = float(np.linalg.norm(self.goal - self.state[:2]))
        return controller_input(self.state, self.goal), reward, fell, reached, distance


def load_policy(path=POLICY_FILE, device="cpu"):
    """The trained controller: a function (controller input batch) -> actions, deterministic (tanh of the mean)."""
    saved = torch.load(path, map_location=device, weights_only=True)
    policy = TanhGaussianPolicy(OBS_DIM, ACT_DIM, -torch.ones(ACT_DIM), torch.ones(ACT_DIM), saved["hidden_dim"],
                                saved["layers"]).to(device)
    policy.load_state_dict(saved["policy"])
    policy.requires_grad_(False)
    return lambda inputs: policy(torch.as_tensor(inputs, dtype=torch.float32, device=device), deterministic=True)[0]


@torch.no_grad()
def evaluate(args: Args, act=None) -> tuple:
    """(success rate, mean speed in m/s) at goals `goal_distance` away: the share of episodes in which the ant
    reaches its goal within `max_steps` steps, and over those, the distance it had to cover (to within REACHED of
    the goal) over the time it took (a maze's evaluation episode allows 1,000 steps, 50 s, for a path of tens of
    metres: speed matters there too)."""
    act = act or load_policy(args.policy_file)
    env, seconds = GoalReachingAnt(args.seed + 10_000), []
    for _ in range(args.episodes):
        inputs = env.reset(goal_distance=args.goal_distance)
        for step in range(1, args.max_steps + 1):
            inputs, _, fell, reached, _ = env.step(act(inputs[None])[0].numpy(), new_goals=False)
            if reached or fell:
                break
        if reached:
            seconds.append(step * env.ant.dt)
    speed = (args.goal_distance - REACHED) / float(np.mean(seconds)) if seconds else 0.0
    return len(seconds) / args.episodes, speed


def train(args: Args):
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(args.seed)
    stop_requested = stop_signals()
    env = GoalReachingAnt(args.seed)
    sac_args = SimpleNamespace(hidden_dim=args.hidden_dim, layers=args.layers, bf16=False, tau=args.tau,
                               critic_lr=args.critic_lr, policy_lr=args.policy_lr, cudagraph=False)
    buffer = ReplayBuffer(args.total_steps, OBS_DIM, ACT_DIM, "cpu")
    sampler = torch.Generator().manual_seed(args.seed)
    resumed = torch.load(args.resume, weights_only=False) if args.resume else None
    run_name = f"ant_goal_reacher__{args.seed}__{int(time.time())}"
    run_dir = Path(args.resume).parent if resumed else Path(args.runs_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(run_dir))
    agent, step, inputs = None, 0, env.reset()
    if resumed is not None:
        if "buffer" in resumed:
            buffer.load_state_dict(resumed["buffer"])
        # (the normalisers' statistics come with the networks' state dicts)
        agent = SAC(OBS_DIM, -torch.ones(ACT_DIM), torch.ones(ACT_DIM), sac_args, torch.zeros(2, OBS_DIM))
        for name in ("task_policy", "critics", "target_critics"):
            getattr(agent, name).load_state_dict(resumed[name])
        agent.log_alpha.data.copy_(resumed["log_alpha"])
        for name, optimizer in agent.optimizers.items():
            optimizer.load_state_dict(resumed[name])
        step, env.rng.bit_generator.state = resumed["step"], resumed["env_rng"]
        torch.set_rng_state(resumed["torch_rng"])
        inputs = env.reset()
        print(f"resuming {run_dir} at step {step}")

    def save():
        state = {"args": asdict(args), "step": step, "buffer": buffer.state_dict(),
                 "env_rng": env.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                 "log_alpha": agent.log_alpha.detach().clone(),
                 **{name: getattr(agent, name).state_dict() for name in ("task_policy", "critics", "target_critics")},
                 **{name: optimizer.state_dict() for name, optimizer in agent.optimizers.items()}}
        torch.save(state, run_dir / "checkpoint.tmp")
        (run_dir / "checkpoint.tmp").replace(run_dir / "checkpoint.pt")
        torch.save({key: value for key, value in state.items() if key != "buffer"}, run_dir / "agent.pt")
        torch.save({"policy": agent.task_policy.state_dict(), "hidden_dim": args.hidden_dim, "layers": args.layers,
                    "step": step, "seed": args.seed, "command": " ".join(sys.argv)}, run_dir / "ant_goal_reacher.pt")

    episode_return, episode_length, returns, reached_goals, started = 0.0, 0, [], 0, time.time()
    first = step
    while step < args.total_steps:
        step += 1
        if agent is None:
            action = env.rng.uniform(-1, 1, ACT_DIM).astype(np.float32)
        else:
            with torch.no_grad():
                action = agent.task_policy(torch.as_tensor(inputs[None]))[0][0].numpy()
        next_inputs, reward, fell, reached, _ = env.step(action)
        episode_return, episode_length = episode_return + reward, episode_length + 1
        reached_goals += reached
        buffer.add(states=torch.as_tensor(inputs[None]), choices=torch.as_tensor(action[None]),
                   returns=torch.tensor([reward]), next_states=torch.as_tensor(next_inputs[None]),
                   dones=torch.tensor([float(fell)]), steps=torch.ones(1))
        inputs = next_inputs
        if fell or episode_length >= args.episode_steps:
            returns.append(episode_return)
            writer.add_scalar("charts/episodic_return", episode_return, step)
            writer.add_scalar("charts/goals_reached", reached_goals, step)
            writer.add_scalar("charts/fell", float(fell), step)
            episode_return, episode_length, reached_goals, inputs = 0.0, 0, 0, env.reset()
        if buffer.size == args.learning_starts and agent is None:  # the normalisers fit the random steps' states
            agent = SAC(OBS_DIM, -torch.ones(ACT_DIM), torch.ones(ACT_DIM), sac_args,
                        buffer.data["states"][:buffer.size])
        if agent is not None and buffer.size >= args.learning_starts:
            batch = buffer.sample(args.batch_size, sampler)
            losses = agent.update(batch["states"], batch["choices"], batch["returns"], batch["next_states"],
                                  batch["dones"], torch.tensor(args.gamma))
            if step % args.log_every == 0:
                sps = (step - first) / (time.time() - started)
                for name, value in losses.items():
                    writer.add_scalar(f"losses/{name}", value.item(), step)
                writer.add_scalar("charts/SPS", sps, step)
                recent = np.mean(returns[-20:]) if returns else float("nan")
                print(f"step {step}: return {recent:.1f} (last 20 episodes), α {losses['alpha'].item():.3f}, "
                      f"{sps:.0f} steps/s", flush=True)
        if stop_requested and agent is None:
            print("stopped during the random steps, before any learning: nothing saved")
            sys.exit(130)
        if agent is not None and (step % args.save_every == 0 or stop_requested):
            save()
            if stop_requested:
                print(f"stopped at step {step}; continue with: python {sys.argv[0]} --resume "
                      f"{run_dir / 'checkpoint.pt'}")
                sys.exit(130)
    save()
    Path(args.policy_file).write_bytes((run_dir / "ant_goal_reacher.pt").read_bytes())
    success, speed = evaluate(args)
    print(f"policy written to {args.policy_file}; success at goals {args.goal_distance} m away: {success:.2f} over "
          f"{args.episodes} episodes, reached at {speed:.2f} m/s on average")


if __name__ == "__main__":
    arguments = tyro.cli(Args)
    if arguments.mode == "train":
        train(arguments)
    else:
        success, speed = evaluate(arguments)
        print(f"success rate at goals {arguments.goal_distance} m away: {success:.2f} over {arguments.episodes} "
              f"episodes, reached at {speed:.2f} m/s on average ({arguments.policy_file})")

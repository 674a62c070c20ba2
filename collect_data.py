"""Make the offline datasets OPAL learns from, without a network connection.

OPAL (Ajay et al., ICLR 2021) learns primitives from *undirected* data: trajectories that wander
through the environment without a single task in mind. D4RL made such data for its mazes with a
waypoint planner and a noisy PD controller chasing random goals (Fu et al., 2020, maze2d / antmaze).
This script follows that recipe for PointMaze and writes the result into the local Minari store with
the same schema as the D4RL datasets, so every OPAL script reads it exactly like `D4RL/antmaze/*`.

Kinds of data:
  diverse  the D4RL recipe: a continuing task, a new random goal cell whenever the current one is
           reached, Gaussian action noise; episodes of fixed length (OPAL's pre-training data).
  expert   demonstrations from the evaluation reset cell to the evaluation goal cell (few-shot imitation).
  random   uniformly random actions in the real environment, for any alias including antmaze and
           kitchen: tiny stand-ins with the D4RL keys and shapes, used by the tests.
  metaworld-pick-place (expert, its only kind): Meta-World's scripted pick-place-v3 policy with Gaussian action
           noise, object and goal drawn afresh every episode: the source data of the paper's multi-task transfer.

Run:    python collect_data.py --env pointmaze-large                 # 1,000,000 steps, 45 s on 2 idle cores
        python collect_data.py --env pointmaze-large --kind expert --episodes 10
        python collect_data.py --env metaworld-pick-place                # 1,000 episodes, about 2 minutes
Writes: $MINARI_DATASETS_PATH/<dataset id>/  (default ~/.minari/datasets), e.g. opal/pointmaze-large-diverse-v0
"""

import os
import shutil
import signal
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import farama_notifications
import gymnasium as gym
import minari
import numpy as np
import tyro
from minari.data_collector import EpisodeBuffer
from tqdm import tqdm

# --- shared: quiet_robotics_import ---
# gymnasium-robotics prints a notice about its Adroit reward functions on import; no OPAL script uses Adroit
ROBOTICS_NOTICES = farama_notifications.notifications.get("gymnasium_robotics", {})
for version in [version for version, notice in ROBOTICS_NOTICES.items() if notice.startswith("AdroitHand")]:
    del ROBOTICS_NOTICES[version]
import gymnasium_robotics  # noqa: E402

gym.register_envs(gymnasium_robotics)
# --- end shared ---
from gymnasium_robotics.envs.maze import maps  # noqa: E402


@dataclass
class Args:
    env: Literal[
        "pointmaze-umaze", "pointmaze-medium", "pointmaze-large", "pointmaze-gen",
        "antmaze-umaze", "antmaze-medium", "antmaze-large", "kitchen", "metaworld-pick-place",
    ] = "pointmaze-large"
    """which environment to collect in (pointmaze-gen: the generated maze of --maze-seed; antmaze-* and kitchen only
    with --kind random, metaworld-pick-place only with --kind expert)"""
    maze_seed: int = 0
    """pointmaze-gen: which maze of the generated family (the scripts' --env pointmaze-gen-K is seed K)"""
    kind: Optional[Literal["diverse", "expert", "random"]] = None
    """diverse: D4RL-style undirected data; expert: demonstrations of the evaluation task (Meta-World: of
    pick-place-v3); random: random actions. Default: expert for metaworld-pick-place, diverse otherwise"""
    dataset_id: Optional[str] = None
    """Minari id to write; default opal/<env>-<kind>-v0 (opal/<env>-expert-anywhere-v0 with --starts anywhere;
    opal/pointmaze-gen<K>-<kind>-v0 for pointmaze-gen)"""
    steps: Optional[int] = None
    """total environment steps (diverse, random); default 1,000,000 for diverse, 10,000 for random"""
    episode_length: int = 1000
    """steps per episode for diverse and random data (D4RL antmaze uses 1000)"""
    episodes: Optional[int] = None
    """number of demonstrations for --kind expert; default 30 in a maze (more than the 10 a few-shot run imitates,
    so that its seeds draw different ones), 1,000 for metaworld-pick-place (ours: ~90,000 steps)"""
    keep_failed: bool = False
    """--kind expert in a maze: keep demonstrations that do not reach the goal within --episode-length steps; by
    default they are dropped and more are drawn (a demonstration of a task completes it; ours: the made ant misses
    D4RL's 1,000 steps in a quarter of its walks, PointMaze's PD controller in none)"""
    demo_attempts: Optional[int] = None
    """--kind expert in a maze: most episodes to try for --episodes that reach the goal; default 4 × --episodes"""
    starts: Literal["reset", "anywhere"] = "reset"
    """--kind expert: demonstrations, and the evaluation task written with them, start at the evaluation reset cell
    (D4RL's task) or at any free cell (a harder task: start cells the demonstrations may never have visited)"""
    action_noise: float = 0.2
    """std of the Gaussian noise added to the PD controller's action, or to Meta-World's scripted policy's (our
    choice; D4RL's noisy maze2d used 0.5; at 0.2 the pick-place expert still succeeds in 10 of 10 episodes)"""
    settle_steps: int = 25
    """metaworld-pick-place: an episode ends this many steps after its first success (ours: the rest of Meta-World's
    500 steps is the arm holding the object still), or at 500 steps without one"""
    seed: int = 0
    """seed of the environment and of the noise"""
    controller: str = "controllers/ant_goal_reacher.pt"
    """antmaze --kind diverse/expert: the goal-reaching ant that walks from waypoint to waypoint (D4RL's recipe)"""
    overwrite: bool = False
    """replace an existing dataset with the same id"""

    def __post_init__(self):  # the defaults that depend on --env
        metaworld = self.env == "metaworld-pick-place"
        if self.kind is None:
            self.kind = "expert" if metaworld else "diverse"
        if self.episodes is None:
            self.episodes = 1_000 if metaworld else 30


# Evaluation maps as D4RL defines them: reset cell top-left, goal cell bottom-right (row, column).
MAZES = {
    "umaze": dict(maze_map=maps.U_MAZE, reset_cell=(1, 1), goal_cell=(3, 1)),
    "medium": dict(maze_map=maps.MEDIUM_MAZE, reset_cell=(1, 1), goal_cell=(6, 6)),
    "large": dict(maze_map=maps.LARGE_MAZE, reset_cell=(1, 1), goal_cell=(7, 9)),
}
POINT_IDS = {"umaze": "PointMaze_UMaze-v3", "medium": "PointMaze_Medium-v3", "large": "PointMaze_Large-v3"}
ANT_IDS = {"umaze": "AntMaze_UMaze-v4", "medium": "AntMaze_Medium_Diverse_GR-v4",
           "large": "AntMaze_Large_Diverse_GR-v4"}
KITCHEN_TASKS = ["microwave", "kettle", "bottom burner", "light switch"]  # D4RL kitchen-mixed/partial tasks
PD_GAINS = (10.0, -1.0)  # p on the position error, d on the velocity: the D4RL maze2d controller's gains
SUCCESS_RADIUS = 0.45
METAWORLD_TASK = "pick-place-v3"  # the paper's source task for the multi-task transfer


GENERATED_SIZE = (9, 12)  # rows, columns with the walls around: D4RL's large map


def generate_maze(seed: int, loops: int = 3) -> dict:
    """The maze of seed `seed` in the family `pointmaze-gen` (ours): D4RL's large map's size, 9 × 12 cells with walls
    around. Corridors of a spanning tree over the cells at odd row and column (randomised Prim: every free cell
    reachable, branches and dead ends), `loops` walls between two neighbouring corridors knocked out (a few loops),
    and alcoves off the ninth column into the tenth, which the odd lattice leaves out; drawn again (from the same
    generator) until it has at least 3 dead ends. The evaluation task as D4RL's, two cells far apart: the ends of the
    longest shortest path, the reset cell the end nearer the top-left corner. Returns dict(maze_map, reset_cell,
    goal_cell) like MAZES' entries."""
    rng = np.random.default_rng(seed)
    while True:
        maze_map = maze_layout(rng, loops)
        free = WaypointPlanner(maze_map).free
        open_sides = {cell: sum((cell[0] + dr, cell[1] + dc) in free for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)))
                      for cell in free}
        if sum(sides == 1 for sides in open_sides.values()) >= 3:
            break
    distances = {cell: WaypointPlanner.distances(maze_map, cell) for cell in sorted(free)}
    _, reset_cell, goal_cell = max((distance, *sorted((a, b), key=lambda cell: (sum(cell), cell)))
                                   for a, row in distances.items() for b, distance in sorted(row.items()))
    return dict(maze_map=maze_map, reset_cell=reset_cell, goal_cell=goal_cell)


def maze_layout(rng, loops: int) -> list:
    """One draw of generate_maze's walls (1) and free cells (0)."""
    rows, columns = GENERATED_SIZE
    grid = np.ones((rows, columns), dtype=int)
    nodes = {(r, c) for r in range(1, rows - 1, 2) for c in range(1, columns - 2, 2)}  # 4 × 5 cells
    steps = ((0, 2), (0, -2), (2, 0), (-2, 0))
    start = sorted(nodes)[rng.integers(len(nodes))]
    grid[start], visited = 0, {start}
    while len(visited) < len(nodes):  # randomised Prim: a random passage from the tree to a cell not yet in it
        frontier = sorted((cell, (cell[0] + dr, cell[1] + dc)) for cell in visited for dr, dc in steps
                          if (cell[0] + dr, cell[1] + dc) in nodes and (cell[0] + dr, cell[1] + dc) not in visited)
        (r, c), (nr, nc) = frontier[rng.integers(len(frontier))]
        grid[(r + nr) // 2, (c + nc) // 2] = grid[nr, nc] = 0
        visited.add((nr, nc))
    walls = sorted({((r + nr) // 2, (c + nc) // 2) for r, c in nodes for dr, dc in steps
                    if (nr := r + dr, nc := c + dc) in nodes and grid[(r + nr) // 2, (c + nc) // 2] == 1})
    for index in rng.choice(len(walls), size=min(loops, len(walls)), replace=False):
        grid[walls[index]] = 0
    for r in range(1, rows - 1):  # alcoves in the tenth column
        if grid[r, columns - 3] == 0 and rng.random() < 0.5:
            grid[r, columns - 2] = 0
    return grid.tolist()


def maze_spec(args) -> dict:
    """The evaluation map of a pointmaze or antmaze alias: D4RL's (MAZES) or the generated maze of --maze-seed."""
    size = args.env.partition("-")[2]
    return generate_maze(args.maze_seed) if size == "gen" else MAZES[size]


def eval_map(maze_map, reset_cell, goal_cell, anywhere=False):
    """The evaluation map: one reset cell 'r' and one goal cell 'g', as in D4RL's evaluation tasks; `anywhere`:
    every free cell but the goal is a reset cell (each episode starts in one drawn uniformly)."""
    rows = [list(row) for row in maze_map]
    free = [(r, c) for r, row in enumerate(rows) for c, value in enumerate(row) if value == 0]
    for r, c in free if anywhere else [reset_cell]:
        rows[r][c] = "r"
    rows[goal_cell[0]][goal_cell[1]] = "g"
    return rows


def env_specs(args: Args, episode_length: int):
    """(data env, eval env) for this alias; the eval env's spec is what every OPAL script evaluates on."""
    family, _, size = args.env.partition("-")
    if family == "kitchen":
        make = dict(id="FrankaKitchen-v1", tasks_to_complete=KITCHEN_TASKS)
        return gym.make(**make, max_episode_steps=episode_length), gym.make(**make)
    maze = maze_spec(args)
    env_id = POINT_IDS["large" if size == "gen" else size] if family == "pointmaze" else ANT_IDS[size]
    data_env = gym.make(env_id, maze_map=maze["maze_map"], continuing_task=True, reset_target=True,
                        max_episode_steps=episode_length)
    anywhere = args.kind == "expert" and args.starts == "anywhere"
    if args.kind == "expert":  # demonstrations end when the goal is reached
        data_env = gym.make(env_id, maze_map=eval_map(**maze, anywhere=anywhere), continuing_task=False,
                            max_episode_steps=episode_length)
    eval_env = gym.make(env_id, maze_map=eval_map(**maze, anywhere=anywhere), continuing_task=True,
                        reset_target=False)
    return data_env, eval_env


class WaypointPlanner:
    """Shortest paths over the free cells of a maze grid (breadth-first search from every goal cell)."""

    def __init__(self, maze_map):
        self.free = [(r, c) for r, row in enumerate(maze_map) for c, v in enumerate(row) if v != 1]
        self.next_cell = {goal: self._bfs(goal, set(self.free)) for goal in self.free}

    @staticmethod
    def distances(maze_map, source) -> dict:
        """Steps along the shortest path from `source` to every free cell it reaches (breadth-first search)."""
        free = {(r, c) for r, row in enumerate(maze_map) for c, v in enumerate(row) if v != 1}
        distance, frontier = {source: 0}, deque([source])
        while frontier:
            cell = frontier.popleft()
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                neighbour = (cell[0] + dr, cell[1] + dc)
                if neighbour in free and neighbour not in distance:
                    distance[neighbour] = distance[cell] + 1
                    frontier.append(neighbour)
        return distance

    @staticmethod
    def _bfs(goal, free):
        """next_cell[cell]: the neighbour of `cell` one step closer to `goal`."""
        step_towards = {goal: goal}
        frontier = deque([goal])
        while frontier:
            cell = frontier.popleft()
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                neighbour = (cell[0] + dr, cell[1] + dc)
                if neighbour in free and neighbour not in step_towards:
                    step_towards[neighbour] = cell
                    frontier.append(neighbour)
        return step_towards


def pd_action(maze, planner, xy, velocity, goal_xy, rng, noise):
    """PD control toward the centre of the next cell on the shortest path (the goal itself in its cell).

    Any point of a cell and the centre of a neighbouring cell span a segment inside those two cells,
    so chasing the next cell's centre never drives the ball into a wall corner.
    """
    target = next_waypoint(maze, planner, xy, goal_xy)
    action = PD_GAINS[0] * (target - xy) + PD_GAINS[1] * velocity
    action = action + noise * rng.standard_normal(2)
    return np.clip(action, -1.0, 1.0).astype(np.float32)


def next_waypoint(maze, planner, xy, goal_xy):
    """The centre of the next cell on the shortest path to the goal's cell, or the goal itself in its cell."""
    cell = tuple(int(v) for v in maze.cell_xy_to_rowcol(xy))
    goal_cell = tuple(int(v) for v in maze.cell_xy_to_rowcol(goal_xy))
    if cell == goal_cell or cell not in planner.next_cell[goal_cell]:
        return goal_xy
    return maze.cell_rowcol_to_xy(np.array(planner.next_cell[goal_cell][cell]))


def ant_waypoint_policy(maze, planner, controller_file, rng, noise):
    """D4RL's antmaze recipe: the goal-reaching ant (controllers/ant_goal_reacher.py) walks to the next waypoint of
    the shortest path to the goal; its action plus N(0, noise²), clipped to [-1, 1]."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "controllers"))
    from ant_goal_reacher import controller_input, load_policy

    path = Path(controller_file)
    path = path if path.exists() or path.is_absolute() else Path(__file__).resolve().parent / path
    if not path.exists():
        raise SystemExit(f"the ant controller {controller_file} is missing; train one with "
                         "python controllers/ant_goal_reacher.py (docs/collect_data.md).")
    act = load_policy(path)

    def policy(obs):
        waypoint = next_waypoint(maze, planner, obs["achieved_goal"], obs["desired_goal"])
        inputs = controller_input(np.concatenate([obs["achieved_goal"], obs["observation"]]), waypoint)
        action = act(inputs[None])[0].numpy()  # (the policy's parameters need no gradients)
        return np.clip(action + noise * rng.standard_normal(action.shape), -1.0, 1.0).astype(np.float32)
    return policy


def simulator(env):
    inner = env.unwrapped
    return getattr(inner, "point_env", None) or getattr(inner, "ant_env", None)


def run_episode(env, policy, seed, options=None, max_steps=None, settle_steps=None):
    """One episode as an EpisodeBuffer with D4RL's infos (success, qpos, qvel, goal; one row per observation);
    `settle_steps`: truncate it that many steps after the first success."""
    obs, info = env.reset(seed=seed, options=options)
    sim = simulator(env)
    observations, actions, rewards, terminations, truncations = [obs], [], [], [], []
    infos = {"success": [info.get("success", False)]}
    first_success = 0 if infos["success"][0] else None  # its row in infos["success"]
    if sim is not None:
        infos.update(qpos=[sim.data.qpos.copy()], qvel=[sim.data.qvel.copy()], goal=[obs["desired_goal"]])
    while True:
        action = policy(obs)
        obs, reward, terminated, truncated, info = env.step(action)
        truncated = truncated or (max_steps is not None and len(actions) + 1 >= max_steps)
        truncated = truncated or (settle_steps is not None and first_success is not None
                                  and len(actions) + 1 - first_success >= settle_steps)
        observations.append(obs)
        actions.append(action)
        rewards.append(reward)
        terminations.append(terminated)
        truncations.append(truncated)
        infos["success"].append(info.get("success", False))
        if first_success is None and infos["success"][-1]:
            first_success = len(infos["success"]) - 1
        if sim is not None:
            infos["qpos"].append(sim.data.qpos.copy())
            infos["qvel"].append(sim.data.qvel.copy())
            infos["goal"].append(obs["desired_goal"])
        if terminated or truncated:
            break
    return EpisodeBuffer(
        id=None, seed=seed, observations=stack_tree(observations), actions=np.stack(actions).astype(np.float32),
        rewards=np.asarray(rewards, dtype=np.float64), terminations=np.asarray(terminations),
        truncations=np.asarray(truncations), infos={k: np.asarray(v) for k, v in infos.items()},
    )


def stack_tree(items):
    if isinstance(items[0], dict):
        return {key: stack_tree([item[key] for item in items]) for key in items[0]}
    return np.stack(items)


def collect(args: Args):
    """Episodes for args.kind; returns (buffers, data env, eval env)."""
    if args.env == "metaworld-pick-place":
        return collect_metaworld(args)
    total_steps = args.steps if args.steps is not None else (1_000_000 if args.kind == "diverse" else 10_000)
    episode_length = min(args.episode_length, total_steps)
    data_env, eval_env = env_specs(args, episode_length)
    rng = np.random.default_rng(args.seed)
    data_env.action_space.seed(args.seed)
    family, _, size = args.env.partition("-")
    if args.kind == "random":
        policy = lambda obs: data_env.action_space.sample()
    else:
        if family not in ("pointmaze", "antmaze"):
            raise SystemExit(f"--kind {args.kind} is implemented for the mazes only; use --kind random for {args.env}.")
        maze = data_env.unwrapped.maze
        planner = WaypointPlanner(maze_spec(args)["maze_map"])
        noise = args.action_noise if args.kind == "diverse" else 0.1 * args.action_noise
        if family == "pointmaze":
            policy = lambda obs: pd_action(maze, planner, obs["achieved_goal"], obs["observation"][2:4],
                                           obs["desired_goal"], rng, noise)
        else:
            policy = ant_waypoint_policy(maze, planner, args.controller, rng, noise)

    buffers = []
    if args.kind == "expert":
        maze_cells = maze_spec(args)
        reset_cell = np.array(maze_cells["reset_cell"]) if args.starts == "reset" else None  # None: drawn by the env
        options = {"reset_cell": reset_cell, "goal_cell": np.array(maze_cells["goal_cell"])}
        run = lambda attempt: run_episode(data_env, policy, seed=args.seed + attempt, options=options)
        attempts = args.demo_attempts or 4 * args.episodes
        return successful_demonstrations(run, args.episodes, attempts, args.keep_failed), data_env, eval_env
    with tqdm(total=total_steps, desc=f"{args.kind} {args.env}", unit="step") as progress:
        steps = 0
        while steps < total_steps:
            buffer = run_episode(data_env, policy, seed=args.seed + len(buffers),
                                 max_steps=min(episode_length, total_steps - steps))
            buffers.append(buffer)
            steps += len(buffer.rewards)
            progress.update(len(buffer.rewards))
    return buffers, data_env, eval_env


def successful_demonstrations(run, wanted: int, attempts: int, keep_failed: bool = False) -> list:
    """The first `wanted` episodes run(0), run(1), ... that reach the goal (with keep_failed: the first `wanted`);
    a clear stop if `attempts` episodes hold fewer."""
    kept, tried = [], 0
    with tqdm(total=wanted, desc="demonstrations") as progress:
        for tried in range(1, attempts + 1):
            buffer = run(tried - 1)
            if keep_failed or np.any(buffer.infos["success"]):
                kept.append(buffer)
                progress.update(1)
            if len(kept) == wanted:
                break
    if not keep_failed:
        print(f"{len(kept)} of {tried} demonstrations reached the goal within the episode's steps")
    if len(kept) < wanted:
        raise SystemExit(f"error: only {len(kept)} of {attempts} demonstrations reached the goal, and --episodes asks "
                         f"for {wanted}: allow more tries (--demo-attempts), longer episodes (--episode-length), or "
                         "keep the failed ones (--keep-failed).")
    return kept


def collect_metaworld(args: Args):
    """Meta-World pick-place-v3 episodes of its scripted policy plus N(0, action_noise²) noise, clipped to [-1, 1];
    returns (buffers, the environment, None). The environment draws the object and goal positions at every reset
    from its own generator, seeded when it is made (reset's seed does not move them), so the data repeats by seed.
    Meta-World's environments are registered with a Python function as entry point, which Minari cannot store: the
    dataset keeps no environment spec (the transfer script makes Meta-World's environments itself)."""
    import metaworld  # noqa: F401  (registers the Meta-World/ environments)
    from metaworld.policies import SawyerPickPlaceV3Policy

    env = gym.make("Meta-World/MT1", env_name=METAWORLD_TASK, seed=args.seed)
    expert, rng = SawyerPickPlaceV3Policy(), np.random.default_rng(args.seed)
    policy = lambda obs: np.clip(expert.get_action(obs) + args.action_noise * rng.standard_normal(4),
                                 -1.0, 1.0).astype(np.float32)
    buffers = [run_episode(env, policy, seed=args.seed + episode, max_steps=args.episode_length,
                           settle_steps=args.settle_steps)
               for episode in tqdm(range(args.episodes), desc=f"{METAWORLD_TASK} expert")]
    return buffers, env, None


def verify(dataset, buffers, maze=None):
    """Read the written dataset back and check it; raises ValueError naming the first problem."""
    expected_steps = sum(len(b.rewards) for b in buffers)
    if dataset.total_episodes != len(buffers) or dataset.total_steps != expected_steps:
        raise ValueError(f"wrote {dataset.total_episodes} episodes / {dataset.total_steps} steps, "
                         f"expected {len(buffers)} / {expected_steps}")
    for episode in dataset.iterate_episodes():
        arrays = [episode.actions, episode.rewards] + list(_leaves(episode.observations))
        if not all(np.isfinite(a).all() for a in arrays):
            raise ValueError(f"episode {episode.id} contains NaN or inf")
        if maze is None:
            continue
        xy = episode.observations["achieved_goal"]
        if np.abs(xy[:, 0]).max() > maze.x_map_center or np.abs(xy[:, 1]).max() > maze.y_map_center:
            raise ValueError(f"episode {episode.id} leaves the maze")
        if len(xy) > 1 and np.linalg.norm(np.diff(xy, axis=0), axis=1).max() > 0.5 * maze.maze_size_scaling:
            raise ValueError(f"episode {episode.id}: achieved_goal jumps, a reset inside an episode")
        if episode.infos["qpos"].shape[0] != len(xy):
            raise ValueError(f"episode {episode.id}: infos qpos has {episode.infos['qpos'].shape[0]} rows, "
                             f"expected one per observation ({len(xy)})")


def _leaves(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _leaves(value)
    else:
        yield tree


def staging_folder(args: Args, dataset_id: str) -> tuple:
    """(the dataset's final path, a new empty staging folder in the store), or stop with a reason: the dataset
    exists already (without --overwrite), or the store cannot be written. Checked before collecting, and again
    before writing."""
    store = Path(os.environ.get("MINARI_DATASETS_PATH", Path.home() / ".minari" / "datasets"))
    final_path = store / dataset_id
    if final_path.exists() and not args.overwrite:
        raise SystemExit(f"Dataset {dataset_id} already exists at {final_path}; pass --overwrite to replace it.")
    try:
        store.mkdir(parents=True, exist_ok=True)
        staging = store / f".staging-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except OSError as error:
        raise SystemExit(f"Cannot write to the Minari store {store} ({error.strerror}). "
                         "Set MINARI_DATASETS_PATH to a writable folder.")
    return final_path, staging


def write_dataset(args: Args, dataset_id: str, buffers, data_env, eval_env):
    """Write into a staging store, verify, then move into place, so a failure leaves no half dataset."""
    final_path, staging = staging_folder(args, dataset_id)
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(staging)
    try:
        # D4RL's reference scores: mazes 0 / 1 (success), kitchen 0 / 4 (tasks completed); Meta-World: no spec
        # to store (see collect_metaworld), so the spaces instead (Meta-World's own declares the goal's 3 numbers
        # as always 0, which its observations are not) and no reference scores
        if eval_env is not None:
            spec = dict(env=data_env, eval_env=eval_env.spec, ref_min_score=0.0,
                        ref_max_score=1.0 if "maze" in args.env else 4.0)
        else:
            spec = dict(action_space=data_env.action_space, observation_space=gym.spaces.Box(
                -np.inf, np.inf, data_env.observation_space.shape, np.float64))
        dataset = minari.create_dataset_from_buffers(
            dataset_id=dataset_id, buffer=buffers, **spec,
            algorithm_name=f"opal collect_data.py --kind {args.kind}", author="opal",
            author_email="opal@example.invalid", code_permalink="collect_data.py",
            description=f"{args.kind} data for {args.env} (seed {args.seed}, action noise {args.action_noise})",
            data_format="hdf5",
        )
        maze = getattr(data_env.unwrapped, "maze", None)
        verify(dataset, buffers, maze)
        final_path.parent.mkdir(parents=True, exist_ok=True)
        namespace = dataset_id.rsplit("/", 1)[0] if "/" in dataset_id else None
        if namespace and (staging / namespace / "namespace_metadata.json").exists():
            metadata = final_path.parent / "namespace_metadata.json"
            if not metadata.exists():
                shutil.copy(staging / namespace / "namespace_metadata.json", metadata)
        if final_path.exists():
            shutil.rmtree(final_path)
        os.replace(staging / dataset_id, final_path)
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
        shutil.rmtree(staging, ignore_errors=True)
    return final_path


def main(args: Args):
    metaworld = args.env == "metaworld-pick-place"
    if metaworld and (args.kind != "expert" or args.starts != "reset"):
        raise SystemExit(f"metaworld-pick-place data is the scripted expert's only (--kind expert, its default), "
                         f"without --starts; got --kind {args.kind} --starts {args.starts}.")
    if args.kind != "random" and not args.env.startswith(("pointmaze", "antmaze-medium", "antmaze-large")) \
            and not metaworld:
        raise SystemExit(f"--kind {args.kind} is implemented for the mazes only (antmaze: medium and large); use "
                         f"--kind random for {args.env}.")
    if metaworld:  # Meta-World's episodes are at most 500 steps
        args.episode_length = min(args.episode_length, 500)
    for name in ("steps", "episode_length", "episodes", "settle_steps", "demo_attempts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {value}.")
    if not args.action_noise >= 0:
        raise SystemExit(f"--action-noise is a standard deviation: at least 0, got {args.action_noise}.")
    if args.starts != "reset" and args.kind != "expert":
        raise SystemExit("--starts applies to --kind expert only.")
    suffix = "-anywhere" if args.starts == "anywhere" else ""
    name = f"pointmaze-gen{args.maze_seed}" if args.env == "pointmaze-gen" else args.env
    dataset_id = args.dataset_id or f"opal/{name}-{args.kind}{suffix}-v0"
    if args.maze_seed < 0:
        raise SystemExit(f"--maze-seed must be at least 0, got {args.maze_seed}.")
    shutil.rmtree(staging_folder(args, dataset_id)[1])  # an existing dataset or a read-only store: say so now
    start = time.time()
    buffers, data_env, eval_env = collect(args)
    seconds = time.time() - start
    steps = sum(len(b.rewards) for b in buffers)
    path = write_dataset(args, dataset_id, buffers, data_env, eval_env)
    successes = sum(bool(b.infos["success"].any()) for b in buffers)
    print(f"wrote {dataset_id}: {len(buffers)} episodes, {steps} steps "
          f"({steps / seconds:,.0f} steps/s collecting, {time.time() - start:.0f} s in all), "
          f"{successes} episodes reach a goal; at {path}")


if __name__ == "__main__":
    # SIGTERM raises SystemExit like Ctrl-C raises KeyboardInterrupt, so the staging folder is always removed
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    try:
        main(tyro.cli(Args))
    except KeyboardInterrupt:  # Ctrl-C: the staging folder is gone (write_dataset's finally), the store unchanged
        print("\ninterrupted: nothing was written", file=sys.stderr)
        sys.exit(130)

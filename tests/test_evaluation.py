"""Evaluation on scripted fake environments: the scripts' test-time execution (`HierarchicalPolicy`, shared block
execution) holding z for c steps with the primitive policy reading the current state, and `opal_utils.evaluate`
clipping the actions and counting success, return and closest approach only until each episode ends."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import opal_cql as oc
from opal_utils import evaluate, normalized_score


class ScriptedEnvs:
    """A stand-in for a vector env of 2 copies. The episode started with reset seed 100 + k lasts LENGTHS[k] steps;
    every step pays 1 and reports success from SUCCESS_AT[k] on, also after the episode ended (an autoresetting
    vector env keeps stepping a finished copy, and those steps must not count); the agent's distance to the goal is
    10 - t and keeps falling after the end. The observation's first entry is the step t within the episode."""

    LENGTHS, SUCCESS_AT = [5, 7, 3, 4], [6, 7, 1, 2]  # episode 0 ends one step before its success: a failure

    def __init__(self):
        self.num_envs = 2

    def observations(self):
        distance = 10.0 - self.t
        return {"observation": np.stack([self.t, np.zeros(2)], -1).astype(np.float32),  # the goal at (1, 0)
                "achieved_goal": np.stack([distance + 1.0, np.zeros(2)], -1), "desired_goal": np.tile([1.0, 0.0], (2, 1))}

    def reset(self, seed):
        self.episodes, self.t = [s - 100 for s in seed], np.zeros(2)
        self.received = [[] for _ in range(2)]
        self.log = getattr(self, "log", {})
        return self.observations(), {}

    def step(self, actions):
        for i, episode in enumerate(self.episodes):
            self.received[i].append(float(actions[i, 0]))
            self.log[episode] = self.received[i]
        self.t = self.t + 1
        lengths = np.array([self.LENGTHS[k] for k in self.episodes])
        success = self.t >= np.array([self.SUCCESS_AT[k] for k in self.episodes])
        rewards = 0.5 * self.t  # step t pays t / 2
        return self.observations(), rewards, self.t == lengths, np.zeros(2, dtype=bool), {"success": success}


class StepReader(torch.nn.Module):
    """A task policy choosing z = the step t at which it is asked."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, states, deterministic=False):
        return states[:, :1].clone(), None


class StepAdder(torch.nn.Module):
    """A primitive policy acting z + t/100 at step t."""

    def forward(self, states, latents):
        return latents + states[:, :1] / 100, None


def test_evaluate_holds_z_for_c_steps_and_counts_only_until_the_end():
    envs = ScriptedEnvs()
    policy = oc.HierarchicalPolicy(StepReader(), StepAdder(), c=3)
    success, mean_return, closest = evaluate(envs, ["observation"], policy, episodes=3, seed=100,
                                             act_low=np.array([-1.0]), act_high=np.array([5.5]))
    # z chosen at t = 0, 3, 6 and held; the action at step t is z + t/100, clipped at 5.5
    assert envs.log[0][:5] == pytest.approx([0.0, 0.01, 0.02, 3.03, 3.04])
    assert envs.log[1][:7] == pytest.approx([0.0, 0.01, 0.02, 3.03, 3.04, 3.05, 5.5])
    assert envs.log[2][:3] == pytest.approx([0.0, 0.01, 0.02])
    # episodes 0, 1, 2 count (episode 3 ran in the second round's other copy, beyond the 3 asked for):
    # successes: no (ends at 5, success only from 6), yes (at its last step 7), yes (from step 1)
    assert success == pytest.approx(2 / 3)
    assert mean_return == pytest.approx((5 * 6 + 7 * 8 + 3 * 4) / 4 / 3)  # Σ_t t/2 until the end, not after
    assert closest == pytest.approx(((10 - 5) + (10 - 7) + (10 - 3)) / 3)


def test_evaluate_without_primitives_acts_the_choice_each_step():
    envs = ScriptedEnvs()
    success, mean_return, _ = evaluate(envs, ["observation"], oc.HierarchicalPolicy(StepReader(), None, c=1),
                                       episodes=2, seed=100, act_low=np.array([-1.0]), act_high=np.array([5.5]))
    assert envs.log[0][:5] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert envs.log[1][:7] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.5]
    assert success == 0.5 and mean_return == pytest.approx((5 * 6 + 7 * 8) / 4 / 2)


def test_normalized_score_of_a_maze_is_the_success_percentage():
    maze_env = SimpleNamespace(unwrapped=SimpleNamespace(maze=object()))
    assert normalized_score(None, maze_env, 0.37, 123.0) == pytest.approx(37.0)

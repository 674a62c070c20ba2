"""Interruption and resume: a run stopped by a signal and resumed ends exactly where an uninterrupted run ends."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from conftest import ROOT, run_script

VAE = ["--num-steps", 1500, "--bc-steps", 300, "--hidden-dim", 16, "--gru-layers", 1, "--batch-size", 16,
       "--save-every", 100000, "--log-every", 50, "--picture-latents", 1]


def interrupt_after_start(sandbox, script, arguments, marker, sig, delay=1.0):
    """Start `script`, send `sig` `delay` seconds after `marker` appears on stdout, return (exit code, stdout).
    The run must outlast the delay on the fastest machine: a signal after the end is not a resume test."""
    process = subprocess.Popen([sys.executable, str(ROOT / script), *map(str, arguments)], env=sandbox["env"],
                               cwd=sandbox["base"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            time.sleep(delay)
            process.send_signal(sig)
            break
    lines.extend(process.stdout)
    return process.wait(timeout=300), "".join(lines)


def checkpoint_path(stdout, name):
    for line in stdout.splitlines():
        if "checkpoint written to" in line or line.startswith("checkpoint: "):
            return Path(line.split("checkpoint written to " if "written to" in line else "checkpoint: ")[1].strip())
    raise AssertionError(f"no checkpoint path in:\n{stdout}")


def same_tensors(first: dict, second: dict):
    assert first.keys() == second.keys()
    return all(torch.equal(first[k], second[k]) for k in first)


def test_vae_interrupted_and_resumed_equals_uninterrupted(sandbox, datasets):
    common = [*VAE, "--dataset-id", datasets["pointmaze"], "--seed", 7]
    straight = run_script(sandbox, "opal_vae.py", *common, "--runs-dir", sandbox["base"] / "resume-a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    code, stdout = interrupt_after_start(sandbox, "opal_vae.py", [*common, "--runs-dir", sandbox["base"] / "resume-b"],
                                         "β-VAE:", signal.SIGTERM)
    assert code == 130 and "stopped by signal at β-VAE step" in stdout, stdout
    interrupted = checkpoint_path(stdout, "opal_vae.pt")
    assert f"\ncontinue with: python opal_vae.py --resume {interrupted}\n" in stdout  # on a line of its own
    step = torch.load(interrupted, weights_only=True)["step"]
    assert 1 <= step < 1500
    resumed = run_script(sandbox, "opal_vae.py", "--resume", interrupted.parent)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {interrupted.parent} at step {step}" in resumed.stdout
    first = torch.load(checkpoint_path(straight.stdout, "opal_vae.pt"), weights_only=True)
    second = torch.load(interrupted, weights_only=True)
    assert second["phase"] == "done"
    for key in ("encoder", "prior", "primitive_policy"):
        assert same_tensors(first[key], second[key]), f"{key} differs after resume"
    finished = run_script(sandbox, "opal_vae.py", "--resume", interrupted)
    assert finished.returncode == 0 and "is a finished run; nothing to resume" in finished.stdout


# --no-bf16: each run's start-up probe could choose differently for networks this small; a resumed run keeps its
# choice (tests/test_opal_vae.py), and only the two separate runs compared here would differ
CQL = ["--algorithm", "cql", "--no-bf16", "--hidden-dim", 32, "--critic-layers", 2, "--policy-layers", 2,
       "--batch-size", 32, "--cql-n-actions", 3,
       "--total-steps", 1200, "--log-every", 100, "--eval-every", 400, "--eval-episodes", 2, "--eval-episodes-during", 2,
       "--num-envs", 2, "--save-every", 100000]


def test_cql_interrupted_and_resumed_equals_uninterrupted(sandbox, datasets, vae_checkpoints):
    common = [*CQL, "--dataset-id", datasets["pointmaze"], "--vae-ckpt", vae_checkpoints["pointmaze"], "--seed", 5]
    straight = run_script(sandbox, "opal_cql.py", *common, "--runs-dir", sandbox["base"] / "cql-resume-a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    code, stdout = interrupt_after_start(sandbox, "opal_cql.py", [*common, "--runs-dir", sandbox["base"] / "cql-resume-b"],
                                         "CQL steps; run dir", signal.SIGINT)
    assert code == 130 and "stopped by signal at CQL step" in stdout, stdout
    interrupted = checkpoint_path(stdout, "opal_cql.pt")
    assert 1 <= torch.load(interrupted, weights_only=True)["step"] < 1200
    resumed = run_script(sandbox, "opal_cql.py", "--resume", interrupted)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first = torch.load(checkpoint_path(straight.stdout, "opal_cql.pt"), weights_only=True)
    second = torch.load(interrupted, weights_only=True)
    assert second["finished"] and second["step"] == 1200
    for key in ("task_policy", "critics", "target_critics"):
        assert same_tensors(first[key], second[key]), f"{key} differs after resume"
    assert first["summary"]["last_normalized_score"] == second["summary"]["last_normalized_score"]


FEWSHOT = ["--policy-layers", 2, "--hidden-dim", 32, "--batch-size", 16, "--total-steps", 3000, "--finetune-steps", 1500,
           "--log-every", 100, "--eval-every", 100000, "--eval-episodes", 2, "--num-envs", 2, "--save-every", 100000,
           "--num-demos", 2]


def test_fewshot_interrupted_and_resumed_equals_uninterrupted(sandbox, datasets, vae_checkpoints):
    common = [*FEWSHOT, "--dataset-id", datasets["pointmaze"], "--demo-dataset-id", datasets["pointmaze-expert"],
              "--vae-ckpt", vae_checkpoints["pointmaze"], "--seed", 3]
    straight = run_script(sandbox, "opal_fewshot_il.py", *common, "--runs-dir", sandbox["base"] / "fewshot-resume-a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    code, stdout = interrupt_after_start(sandbox, "opal_fewshot_il.py",
                                         [*common, "--runs-dir", sandbox["base"] / "fewshot-resume-b"],
                                         "to imitate (c = 10)", signal.SIGTERM)
    assert code == 130 and "stopped by signal at" in stdout, stdout
    interrupted = checkpoint_path(stdout, "opal_fewshot_il.pt")
    assert not torch.load(interrupted, weights_only=True)["finished"]
    resumed = run_script(sandbox, "opal_fewshot_il.py", "--resume", interrupted.parent)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first = torch.load(checkpoint_path(straight.stdout, "opal_fewshot_il.pt"), weights_only=True)
    second = torch.load(interrupted, weights_only=True)
    assert second["finished"] and second["phase"] == "done" and second["demo_episodes"] == first["demo_episodes"]
    for key in ("task_policy", "primitive_policy"):
        assert same_tensors(first[key], second[key]), f"{key} differs after resume"
    assert first["summary"]["last_normalized_score"] == second["summary"]["last_normalized_score"]


SAC = ["--hidden-dim", 32, "--layers", 1, "--batch-size", 16, "--num-envs", 2, "--learning-starts", 40,
       "--prior-start-steps", 100, "--total-steps", 1200, "--max-episode-steps", 50, "--log-every", 50,
       "--eval-every", 300, "--eval-episodes", 2, "--eval-episodes-during", 2, "--eval-num-envs", 2,
       "--save-every", 100000]


def eval_curve(run_dir: Path, tag: str = "eval/closest_goal_distance") -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    curve = []
    for events in sorted(run_dir.glob("events.out.tfevents.*")):
        scalars = EventAccumulator(str(events)).Reload()
        if tag in scalars.Tags()["scalars"]:
            curve += [(e.step, e.value) for e in scalars.Scalars(tag)]
    return sorted(curve)


def test_online_sac_interrupted_and_resumed_equals_uninterrupted(sandbox, datasets, vae_checkpoints):
    """The replay buffer, the open high-level transitions (the primitives running when the signal came) and the
    training envs' episodes (replayed from their seeds) come back: the resumed run's networks, buffer, evaluation
    curve and log of training episodes are the uninterrupted run's. (Plain SAC takes the same path with c = 1.)"""
    mode = "opal"
    common = [*SAC, "--dataset-id", datasets["pointmaze"], "--vae-ckpt", vae_checkpoints["pointmaze"], "--seed", 4]
    straight = run_script(sandbox, "opal_online_sac.py", *common, "--runs-dir", sandbox["base"] / f"sac-a-{mode}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    code, stdout = interrupt_after_start(sandbox, "opal_online_sac.py",
                                         [*common, "--runs-dir", sandbox["base"] / f"sac-b-{mode}"],
                                         "step 300: normalized score", signal.SIGTERM, delay=0.0)
    assert code == 130 and "stopped by signal at SAC step" in stdout, stdout
    interrupted = checkpoint_path(stdout, "opal_online_sac.pt")
    saved = torch.load(interrupted, weights_only=True)
    assert 300 <= saved["step"] < 1200 and saved["buffer"]["size"] > 0
    resumed = run_script(sandbox, "opal_online_sac.py", "--resume", interrupted.parent)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first = torch.load(checkpoint_path(straight.stdout, "opal_online_sac.pt"), weights_only=True)
    second = torch.load(interrupted, weights_only=True)
    assert second["finished"] and second["updates"] == first["updates"]
    for key in ("task_policy", "critics", "target_critics"):
        assert same_tensors(first[key], second[key]), f"{key} differs after resume"
    assert same_tensors({k: v for k, v in first["buffer"].items() if torch.is_tensor(v)},
                        {k: v for k, v in second["buffer"].items() if torch.is_tensor(v)})
    curve = eval_curve(interrupted.parent)
    assert [step for step, _ in curve] == [300, 600, 900, 1200] and curve == eval_curve(
        checkpoint_path(straight.stdout, "opal_online_sac.pt").parent)
    episodes = eval_curve(interrupted.parent, "charts/episodic_return")  # the training episodes' log, once each
    assert len(episodes) == second["summary"]["train_episodes"] == first["summary"]["train_episodes"] > 0
    straight_dir = checkpoint_path(straight.stdout, "opal_online_sac.pt").parent
    assert episodes == eval_curve(straight_dir, "charts/episodic_return")


def test_mt_transfer_interrupted_and_resumed_equals_uninterrupted(sandbox):
    """The actor-critic, its optimiser, the running state and reward statistics and every environment's generators
    (the goals the next episodes draw, in training and in evaluation) come back: the resumed run's networks and
    evaluation curve are the uninterrupted run's. (Plain PPO; with primitives the same state is saved.)"""
    common = ["--primitives", "none", "--episode-length", 20, "--total-steps", 2000, "--eval-every", 400,
              "--eval-episodes", 1, "--eval-episodes-during", 1, "--hidden-dim", 16, "--num-minibatches", 4,
              "--update-epochs", 2, "--seed", 3]
    straight = run_script(sandbox, "opal_mt_transfer.py", *common, "--runs-dir", sandbox["base"] / "mt-a")
    assert straight.returncode == 0, straight.stderr[-2000:]
    code, stdout = interrupt_after_start(sandbox, "opal_mt_transfer.py", [*common, "--runs-dir", sandbox["base"] / "mt-b"],
                                         "step 400: success rate", signal.SIGTERM, delay=0.0)
    assert code == 130 and "stopped by signal at PPO step" in stdout, stdout
    interrupted = checkpoint_path(stdout, "opal_mt_transfer.pt")
    assert 400 <= torch.load(interrupted, weights_only=True)["step"] < 2000
    resumed = run_script(sandbox, "opal_mt_transfer.py", "--resume", interrupted.parent)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    first = torch.load(checkpoint_path(straight.stdout, "opal_mt_transfer.pt"), weights_only=True)
    second = torch.load(interrupted, weights_only=True)
    assert second["finished"] and second["envs"] == first["envs"] and second["eval_envs"] == first["eval_envs"]
    for key in ("agent", "obs_normalizer", "reward_scaler"):
        assert same_tensors(first[key], second[key]), f"{key} differs after resume"
    curve = eval_curve(interrupted.parent, "eval/return")  # (success is 0 at this budget; the returns differ)
    assert [step for step, _ in curve] == [400, 800, 1200, 1600, 2000] and curve == eval_curve(
        checkpoint_path(straight.stdout, "opal_mt_transfer.pt").parent, "eval/return")

"""opal_utils.py, the bookkeeping module: the checkpoint contract (save, load, refusals), the bf16 decision and its
probe, the aliases' refusal and the lock on generating a missing dataset. Its evaluation is tested in
test_evaluation.py with the scripts' test-time execution, its CUDA graphs in test_cuda_graph.py with the scripts'
updates, and the rest end to end through the scripts."""

import os
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
import torch

import opal_vae as ov
from opal_utils import (
    CHECKPOINT_FORMAT_VERSION, bf16_probe, check_checkpoint, load_checkpoint, load_minari_dataset, resolve_dataset_id,
    save_checkpoint, use_bf16
)


class PlainObject:
    """A Python object that torch.save pickles and torch.load(weights_only=True) refuses."""


# --- the checkpoint contract ---
def payload():
    return {"script": "opal_vae", "dataset_id": "opal/pointmaze-large-diverse-v0", "obs_dim": 4, "act_dim": 2,
            "c": 10, "latent_dim": 8, "prior": ov.Prior(4, 8, 16).state_dict(), "args": {"seed": 1, "x": None}}


def test_bf16_only_where_a_probe_measures_it_faster(capsys):
    """The choice follows the probe's timings (injected here: none is measured): on from 1.25x fp32's speed, never
    probed when not asked for or when resuming (the run keeps the choice it started with), off where unmeasured."""
    cpu, calls = torch.device("cpu"), []

    def probe(fp32, bf16):
        return lambda work, device, graphed: calls.append(work) or (fp32, bf16)

    for fp32, bf16, expected in [(1.0, 0.5, True), (1.0, 0.8, True), (1.0, 0.81, False), (1.0, 1.6, False)]:
        assert use_bf16(True, cpu, "work", probe=probe(fp32, bf16)) == expected
        assert f"bf16 autocast {'on' if expected else 'off'}: a probe measured bf16 at {fp32 / bf16:.2f}x" in \
            capsys.readouterr().out
    assert calls == ["work"] * 4
    for requested in (False, True):
        assert use_bf16(requested, cpu, "work", resumed=True, probe=probe(1.0, 0.1)) == requested
    assert not use_bf16(False, cpu, "work", probe=probe(1.0, 0.1))
    assert calls == ["work"] * 4  # neither a resumed run nor --no-bf16 probes
    assert not use_bf16(True, torch.device("meta"), "work", probe=probe(1.0, 0.1))
    assert "not measured on meta" in capsys.readouterr().out


def test_bf16_probe_times_both_precisions_and_keeps_the_runs_random_numbers():
    layer = torch.nn.Linear(8, 8)
    autocast = []

    def work():  # draws random numbers, as the β-VAE loss does
        autocast.append(torch.is_autocast_cpu_enabled())
        return layer(torch.randn(4, 8)).sum()

    torch.manual_seed(0)
    expected_next = torch.rand(3)
    torch.manual_seed(0)
    fp32, bf16 = bf16_probe(work, torch.device("cpu"), repeats=2)
    assert torch.equal(torch.rand(3), expected_next)  # the run's random numbers are as its seed set them
    assert autocast == [False, True] * 3 and fp32 > 0 and bf16 > 0  # a warm-up and 2 timed passes each, in turns
    assert layer.weight.grad is not None  # the backward pass ran (and is timed)


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "opal_vae.pt"
    save_checkpoint(path, payload())
    assert os.listdir(tmp_path) == ["opal_vae.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path, "opal_vae")
    assert loaded["format_version"] == CHECKPOINT_FORMAT_VERSION and loaded["versions"]["torch"] == torch.__version__
    saved = payload()
    save_checkpoint(path, saved)
    prior = ov.Prior(4, 8, 16)
    prior.load_state_dict(load_checkpoint(path, "opal_vae")["prior"])  # strict: every key present
    assert torch.equal(prior.net[0].weight, saved["prior"]["net.0.weight"])
    check_checkpoint(loaded, path, obs_dim=4, c=10, dataset_id="opal/pointmaze-large-diverse-v0")
    assert load_checkpoint(tmp_path, "opal_vae")["c"] == 10  # a run directory works too


def test_checkpoint_refuses_a_mismatch(tmp_path):
    path = tmp_path / "opal_vae.pt"
    save_checkpoint(path, payload())
    loaded = load_checkpoint(path, "opal_vae")
    with pytest.raises(SystemExit, match="its c is 10, this run has 5"):
        check_checkpoint(loaded, path, obs_dim=4, c=5)
    with pytest.raises(SystemExit, match="its dataset_id is 'opal/pointmaze-large-diverse-v0'"):
        check_checkpoint(loaded, path, dataset_id="D4RL/antmaze/large-diverse-v1")
    with pytest.raises(SystemExit, match="written by opal_vae.py, but a opal_cql.py checkpoint"):
        load_checkpoint(path, "opal_cql")


def test_checkpoint_refuses_bad_files(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "opal_vae")
    good = tmp_path / "good.pt"
    save_checkpoint(good, payload())
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(SystemExit, match="truncated, corrupted or not a torch file"):
        load_checkpoint(truncated, "opal_vae")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(SystemExit, match="a torch file but not an OPAL checkpoint"):
        load_checkpoint(foreign, "opal_vae")
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": "opal", "anything": PlainObject()}, pickled)
    with pytest.raises(SystemExit, match="holds Python objects besides tensors"):
        load_checkpoint(pickled, "opal_vae")
    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, payload())
    content = torch.load(newer, weights_only=True)
    content["format_version"] = CHECKPOINT_FORMAT_VERSION + 1
    torch.save(content, newer)
    with pytest.raises(SystemExit, match="newer than this script"):
        load_checkpoint(newer, "opal_vae")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "opal_vae.pt"
    save_checkpoint(path, payload())
    before = path.read_bytes()
    with pytest.raises(Exception):
        save_checkpoint(path, {**payload(), "unpicklable": lambda: None})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["opal_vae.pt"]


def test_unknown_alias_lists_the_valid_ones():
    with pytest.raises(SystemExit, match="unknown --env 'antmaze-hard'.*antmaze-large-diverse.*pointmaze-large"):
        resolve_dataset_id("antmaze-hard", None)
    assert resolve_dataset_id("antmaze-hard", "x/y-v0") == "x/y-v0"


def test_runs_started_at_once_on_a_missing_dataset_generate_it_once(tmp_path, monkeypatch, capsys):
    """A grid starts two runs on a generated maze whose data is not made yet: one generates it, the other waits for
    the lock and loads what the first made (before the lock both generated, and one read the dataset while the other
    replaced it). The collector is faked: it takes 0.5 s and 'writes' the dataset that the faked store then finds."""
    import minari
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    made, generations = [], []

    def fake_load(dataset_id, download=False):
        if not made:
            raise FileNotFoundError(dataset_id)
        return made[0]

    def fake_collector(command, **kwargs):
        generations.append(command)
        time.sleep(0.5)
        made.append("the dataset")
        return SimpleNamespace(returncode=0)

    monkeypatch.setattr(minari, "load_dataset", fake_load)
    monkeypatch.setattr(subprocess, "run", fake_collector)
    loaded = []
    runs = [threading.Thread(target=lambda: loaded.append(load_minari_dataset("opal/pointmaze-gen7-diverse-v0")))
            for _ in range(2)]
    for run in runs:
        run.start()
        time.sleep(0.1)
    for run in runs:
        run.join(timeout=30)
    assert loaded == ["the dataset", "the dataset"]
    assert len(generations) == 1 and "--maze-seed" in generations[0] and "7" in generations[0]
    assert "another run is generating opal/pointmaze-gen7-diverse-v0: waiting for it" in capsys.readouterr().out

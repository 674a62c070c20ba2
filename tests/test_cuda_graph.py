"""The updates replayed as CUDA graphs (`GraphedUpdate`, the shared block cuda_graph) take the eager update's steps.

On a CPU the wrapper calls the update eagerly, and what it does before recording (the warm-up that puts every
parameter, optimiser state and random number generator back) is checked here step for step against an agent that
never warmed up. On a CUDA device (skipped elsewhere; run them where a GPU is: `pytest tests/test_cuda_graph.py`)
the replayed updates of opal_cql.py, opal_online_sac.py and opal_vae.py are compared with eager twins over several
steps, across a switch of branch, after loading a checkpoint, and the checkpoints they write load on a CPU.
"""

import pytest
import torch

import opal_cql as oc
import opal_online_sac as osac
import opal_vae as ov
from opal_utils import GraphedUpdate, agent_state_dict, bf16_probe, load_agent_state_dict, use_bf16

OBS, CHOICE, B = 5, 3, 32
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cql_agent(device="cpu", **overrides):
    torch.manual_seed(0)
    settings = dict(primitives="none", hidden_dim=16, critic_layers=2, policy_layers=2, bf16=False, cql_n_actions=4,
                    policy_bc_steps=2, lagrange=True)
    settings.update(overrides)
    ones = torch.ones(CHOICE, device=device)
    return oc.CQL(OBS, -ones, 2 * ones, oc.Args(**settings), torch.randn(200, OBS, device=device) * 2 + 1)


def sac_agent(device="cpu", **overrides):
    torch.manual_seed(0)
    settings = dict(primitives="none", hidden_dim=16, layers=2, bf16=False)
    settings.update(overrides)
    ones = torch.ones(CHOICE, device=device)
    return osac.SAC(OBS, -ones, 2 * ones, osac.Args(**settings), torch.randn(200, OBS, device=device) * 2 + 1)


def batches(count, device="cpu", seed=1):
    """Transitions (s, c, R, s', done, γ_hl) with some episodes ended."""
    generator = torch.Generator().manual_seed(seed)
    made = []
    for _ in range(count):
        made.append(tuple(x.to(device) for x in (
            torch.randn(B, OBS, generator=generator), torch.rand(B, CHOICE, generator=generator) * 3 - 1,
            torch.randn(B, generator=generator), torch.randn(B, OBS, generator=generator),
            (torch.rand(B, generator=generator) < 0.2).float(), torch.full((B,), 0.97))))
    return made


def everything(agent) -> dict:
    """Every tensor an update changes: parameters and buffers, temperatures, optimiser states."""
    tensors = {f"{name}.{key}": value.detach().clone() for name in ("task_policy", "critics", "target_critics")
               for key, value in getattr(agent, name).state_dict().items()}
    tensors.update({name: value.detach().clone() for name, value in vars(agent).items() if name.startswith("log_")})
    for name, optimizer in agent.optimizers.items():
        for index, state in enumerate(optimizer.state.values()):
            tensors.update({f"{name}.{index}.{key}": value.detach().clone().cpu() for key, value in state.items()})
    return tensors


def assert_same(first: dict, second: dict, **tolerance):
    assert first.keys() == second.keys()
    for name in first:
        a, b = first[name].cpu().float(), second[name].cpu().float()
        same = torch.allclose(a, b, **tolerance) if tolerance else torch.equal(a, b)
        assert same, f"{name} differs: {(a - b).abs().max().item():.3g}"


def losses_of(losses: dict) -> dict:
    return {name: value.detach().clone() for name, value in losses.items()}


# --- on a CPU: eager, and the warm-up leaves no trace ---
def test_on_a_cpu_the_update_runs_eagerly():
    agent = cql_agent(cudagraph=True)
    assert not agent.graphed_step.enabled
    assert not sac_agent(cudagraph=True).graphed_step.enabled
    calls = []
    graphed = GraphedUpdate(lambda x, flag: calls.append(flag) or {"x": x * 2}, [], [], [], enabled=False)
    assert torch.equal(graphed(torch.ones(2), True)["x"], torch.full((2,), 2.0)) and calls == [True]


@pytest.mark.parametrize("steps_before", [0, 3])
def test_warm_up_restores_every_tensor_and_the_random_numbers(steps_before):
    """Warmed up (three steps taken and undone) or not, the next steps are the same to the bit: parameters,
    targets, temperatures, Adam's moments and step counts (zeros where the warm-up created them), and the random
    proposals drawn."""
    warmed, plain = cql_agent(), cql_agent()
    data = batches(steps_before + 3)
    for step, batch in enumerate(data[:steps_before], 1):
        for agent in (warmed, plain):
            torch.manual_seed(step)
            agent.update(*batch, step=step)
    before = everything(warmed)
    torch.manual_seed(100)
    warmed.graphed_step.warm_up((*data[steps_before], False))
    after_warm_up = torch.rand(3)
    torch.manual_seed(100)
    assert torch.equal(after_warm_up, torch.rand(3))  # the generator is where the warm-up found it
    after = everything(warmed)
    assert_same(before, {name: after[name] for name in before})
    assert all(not after[name].any() for name in after.keys() - before.keys())  # born in the warm-up: zeros
    assert len(after) > len(before) if steps_before == 0 else len(after) == len(before)
    for step, batch in enumerate(data[steps_before:], steps_before + 1):
        losses = []
        for agent in (warmed, plain):
            torch.manual_seed(step)
            losses.append(losses_of(agent.update(*batch, step=step)))
        assert_same(*losses)
        assert_same(everything(warmed), everything(plain))


def test_warm_up_of_the_sac_update_leaves_no_trace():
    warmed, plain = sac_agent(), sac_agent()
    data = batches(2)
    warmed.graphed_step.warm_up(data[0])
    for batch in data:
        torch.manual_seed(5)
        first = losses_of(warmed.update(*batch))
        torch.manual_seed(5)
        assert_same(first, losses_of(plain.update(*batch)))
    assert_same(everything(warmed), everything(plain))


# --- on a GPU: the replayed graph takes the eager steps ---
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def run_both(make, steps, update, device="cuda"):
    graphed, eager = make(device, cudagraph=True), make(device, cudagraph=False)
    assert graphed.graphed_step.enabled and not eager.graphed_step.enabled
    for step, batch in enumerate(batches(steps, device), 1):
        losses = []
        for agent in (graphed, eager):
            torch.manual_seed(step)
            losses.append(losses_of(update(agent, batch, step)))
        assert_same(*losses, **TOLERANCE)
    return graphed, eager


@cuda
@pytest.mark.parametrize("overrides", [{}, {"lagrange": False}, {"bf16": True}, {"max_target_backup": False}])
def test_cql_update_replayed_as_a_graph_takes_the_eager_steps(overrides):
    """Steps 1-2 imitate, 3-6 maximise Q: two graphs, each the eager update's step."""
    make = lambda device, **flags: cql_agent(device, **overrides, **flags)
    graphed, eager = run_both(make, 6, lambda agent, batch, step: agent.update(*batch, step=step))
    assert len(graphed.graphed_step.graphs) == 2
    assert_same(everything(graphed), everything(eager), **TOLERANCE)


@cuda
def test_cql_graph_checkpoints_load_and_resume_anywhere(tmp_path):
    """A graphed agent's state saved, loaded into a fresh graphed agent and into an eager CPU one: all continue with
    the same step; the saved optimiser groups are an eager run's (not capturable)."""
    graphed, _ = run_both(cql_agent, 3, lambda agent, batch, step: agent.update(*batch, step=step))
    torch.save(agent_state_dict(graphed, *graphed.CHECKPOINTED), tmp_path / "agent.pt")
    saved = torch.load(tmp_path / "agent.pt", map_location="cpu", weights_only=True)
    assert not any(group["capturable"] for name in graphed.optimizers for group in saved[name]["param_groups"])
    resumed, on_cpu = cql_agent("cuda", cudagraph=True), cql_agent("cpu")
    for agent in (resumed, on_cpu):
        load_agent_state_dict(agent, saved, *agent.CHECKPOINTED)
    batch = batches(1, seed=7)[0]
    torch.manual_seed(4)
    expected = losses_of(graphed.update(*(x.cuda() for x in batch), step=4))
    torch.manual_seed(4)
    assert_same(expected, losses_of(resumed.update(*(x.cuda() for x in batch), step=4)), **TOLERANCE)
    assert all(torch.isfinite(value) for value in on_cpu.update(*batch, step=4).values())


@cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_sac_update_replayed_as_a_graph_takes_the_eager_steps(bf16):
    make = lambda device, **flags: sac_agent(device, bf16=bf16, **flags)
    graphed, eager = run_both(make, 5, lambda agent, batch, step: agent.update(*batch))
    assert_same(everything(graphed), everything(eager), **TOLERANCE)


@cuda
def test_vae_step_replayed_as_a_graph_takes_the_eager_steps():
    """The β-VAE step of opal_vae.py with cuDNN's GRU, recorded and eager, from the same start."""
    def make(graphed: bool):
        torch.manual_seed(0)
        modules = [ov.Encoder(OBS, CHOICE, 4, 16, 2).cuda(), ov.Prior(OBS, 4, 16).cuda(),
                   ov.PrimitivePolicy(OBS, CHOICE, 4, 16).cuda()]
        optimizer = torch.optim.Adam([p for module in modules for p in module.parameters()], lr=1e-3, fused=True)

        def vae_step(states, actions):
            loss, nll, kl = ov.beta_vae_loss(*modules, states, actions, 0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return {"loss": loss, "nll": nll, "kl": kl}

        return GraphedUpdate(vae_step, modules, [], [optimizer], graphed), modules

    (graphed, graphed_modules), (eager, eager_modules) = make(True), make(False)
    generator = torch.Generator().manual_seed(3)
    for step in range(4):
        states, actions = torch.randn(B, 10, OBS, generator=generator), torch.randn(B, 10, CHOICE, generator=generator)
        torch.manual_seed(step)
        first = losses_of(graphed(states.cuda(), actions.cuda()))
        torch.manual_seed(step)
        assert_same(first, losses_of(eager(states.cuda(), actions.cuda())), **TOLERANCE)
    for a, b in zip(graphed_modules, eager_modules):
        assert_same(a.state_dict(), b.state_dict(), **TOLERANCE)


@cuda
def test_bf16_probe_times_a_graph_on_a_gpu():
    layer = torch.nn.Linear(64, 64).cuda()
    fp32, bf16 = bf16_probe(lambda: layer(torch.randn(256, 64, device="cuda")).sum(), torch.device("cuda"),
                               repeats=2, graphed=True)
    assert fp32 > 0 and bf16 > 0 and layer.weight.grad is not None


def test_bf16_on_cuda_is_decided_by_the_probe(monkeypatch, capsys):
    """On a GPU the probe decides as on a CPU (no GPU is needed here: its support and timings are stand-ins)."""
    gpu, seen = torch.device("cuda"), []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    probe = lambda fp32, bf16: (lambda work, device, graphed: seen.append((device, graphed)) or (fp32, bf16))
    assert use_bf16(True, gpu, "work", probe=probe(1.0, 0.5), graphed=True)
    assert "on this GPU" in capsys.readouterr().out
    assert not use_bf16(True, gpu, "work", probe=probe(1.0, 0.9))
    assert seen == [(gpu, True), (gpu, False)]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert not use_bf16(True, gpu, "work", probe=probe(1.0, 0.1))
    assert "this GPU has no bf16" in capsys.readouterr().out and len(seen) == 2

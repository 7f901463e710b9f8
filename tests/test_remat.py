"""Rematerialization in pipelines (passes/rematerialize.py, PipeshardParallel(remat=...)):
numerics against jax.jit, what the backward fragments read, the API's errors, and the stage DP's choice."""
import dataclasses
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.methods import MethodError
from meshweave.models import gpt, mlp
from meshweave.passes.stage_dp import StageCandidate, solve_stages
from conftest import abstract_gpt_4x512, run_against_jit


_run = run_against_jit


def _gpt(layers=4):
    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=64, seq_len=16, d_model=32, heads=4, layers=layers)
    key = jax.random.PRNGKey(1)
    return gpt.make_train_step(opt, grad_fn=mw.value_and_grad), gpt.init_state(key, cfg, opt), \
        gpt.synthetic_batch(key, cfg, 16)


def _dropout_mlp():
    """A model outside the zoo with dropout drawn per example from seeds in the batch (threefry), so
    a micro-batch draws the same mask as the whole batch does under jax.jit."""
    opt = optax.sgd(0.1)
    k = jax.random.split(jax.random.PRNGKey(3), 3)
    params = {"w0": jax.random.normal(k[0], (16, 32)) * 0.3, "w1": jax.random.normal(k[1], (32, 32)) * 0.2,
              "w2": jax.random.normal(k[2], (32, 4)) * 0.2}

    def dropout(x, seeds, rate):
        keep = jax.vmap(lambda s: jax.random.bernoulli(jax.random.PRNGKey(s), 1 - rate, x.shape[1:]))(seeds)
        return jnp.where(keep, x / (1 - rate), 0.0)

    def loss_fn(p, batch):
        h = dropout(jax.nn.gelu(batch["x"] @ p["w0"]), batch["seeds"], 0.3)
        h = mw.mark_pipeline_boundary(h)
        h = dropout(jnp.tanh(h @ p["w1"]), batch["seeds"] + 7, 0.5)
        h = mw.mark_pipeline_boundary(h)
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

    def step(state, batch):
        loss, grads = mw.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt_state}, loss

    kb = jax.random.split(jax.random.PRNGKey(4), 2)
    batch = {"x": jax.random.normal(kb[0], (16, 16)), "y": jax.random.normal(kb[1], (16, 4)),
             "seeds": jnp.arange(16, dtype=jnp.uint32) * 101}
    return step, {"params": params, "opt": opt.init(params)}, batch


def _forward_reads(exe, name):
    """(fragment, output) pairs a fragment reads from forward fragments."""
    out = exe.state.results["stage-outlining"]
    phase = {f.name: f.phase for f in out.fragments}
    return {(s.fragment, s.index) for s in out.fragment(name).inputs
            if s.fragment is not None and phase[s.fragment] == "forward"}


def test_remat_gpt_matches_jit_and_backward_reads_no_residuals():
    """One layer per stage: a rematerialized backward reads from forward fragments exactly what its
    own forward reads from the stage before (the boundary activation), nothing its forward made."""
    step, state, batch = _gpt(layers=3)
    stages = mw.ManualStageOption(((0,), (1,), (2,)), ((1, 2), (1, 2), (1, 4)))
    # rtol: on these meshes the plain pipeline too differs from jit by 2.5e-5 in one Adam moment
    # element (summation order of a sharded sum), remat or not.
    exe = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=4, stage_option=stages, remat=True),
               rtol=1e-4)
    assert exe.state.results["rematerialize"].layers == (0, 1, 2)
    assert all(s["remat"] for s in exe.plan.pipeline["stages"])
    for k in range(3):
        bwd, fwd = _forward_reads(exe, f"s{k}_backward"), _forward_reads(exe, f"s{k}_forward")
        assert all(frag != f"s{k}_forward" for frag, _ in bwd), (k, bwd)
        assert bwd == fwd, k
        assert bool(bwd) == (k > 0)


def test_remat_stage_with_two_layers_keeps_only_the_inner_boundary():
    """Two layers in a stage: the backward reads one value of its own forward (the boundary between
    the two layers), where without remat it reads the residuals of both layers."""
    step, state, batch = _dropout_mlp()
    stages = mw.ManualStageOption(((0, 1), (2,)), ((1, 4), (1, 4)))
    plain = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=2, stage_option=stages), steps=1)
    remat = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=2, stage_option=stages,
                                                          remat=(True, False)), steps=1)
    own = {k: {i for f, i in _forward_reads(remat, f"s{k}_backward") if f == f"s{k}_forward"} for k in (0, 1)}
    before = {i for f, i in _forward_reads(plain, "s0_backward") if f == "s0_forward"}
    assert len(own[0]) == 1 and len(before) > 3, (own, before)
    assert own[1] == {i for f, i in _forward_reads(plain, "s1_backward") if f == "s1_forward"}   # stage 1: no remat
    assert remat.state.results["rematerialize"].layers == (0, 1)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_remat_with_dropout_matches_jit(schedule):
    step, state, batch = _dropout_mlp()
    exe = _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=4, pipeline_schedule=schedule, remat=True,
        stage_option=mw.ManualStageOption(((0,), (1,), (2,)), ((1, 2), (1, 2), (1, 4)))), steps=3)
    res = exe.state.results["rematerialize"]
    assert res.layers == (0, 1, 2) and not res.kept        # threefry is recomputed, nothing kept
    assert all(frag != f"s{k}_forward" for k in range(3) for frag, _ in _forward_reads(exe, f"s{k}_backward"))


def test_auto_layers_with_remat_layer_match_jit():
    """Alpa's spelling: AutoLayerOption(layer_num, remat_layer=True), stages by the DP."""
    step, state, batch = _dropout_mlp()
    exe = _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=2, layer_option=mw.AutoLayerOption(layer_num=2, remat_layer=True)))
    stages = exe.state.results["stage-construction"].stages
    assert all(s.remat for s in stages)
    assert exe.state.results["rematerialize"].layers == (0, 1)


def test_remat_options_are_validated():
    manual = mw.ManualStageOption(((0,), (1,)), ((1, 4), (1, 4)))
    with pytest.raises(MethodError, match="remat='auto' lets the stage DP"):
        mw.PipeshardParallel(stage_option=manual, remat="auto")
    with pytest.raises(MethodError, match="one bool per stage needs hand-given stages"):
        mw.PipeshardParallel(remat=(True, False))
    with pytest.raises(MethodError, match="expected True, False, 'auto'"):
        mw.PipeshardParallel(remat="yes")
    with pytest.raises(MethodError, match="remat_layer=True but PipeshardParallel.remat=False"):
        mw.PipeshardParallel(layer_option=mw.AutoLayerOption(2, remat_layer=True), remat=False)
    with pytest.raises(MethodError, match="remat_layer must be True or False"):
        mw.AutoLayerOption(2, remat_layer="auto")
    assert mw.PipeshardParallel(layer_option=mw.ManualLayerOption(remat_layer=True)).effective_remat is True
    assert mw.PipeshardParallel().effective_remat is False
    step, state, batch = _dropout_mlp()
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=2, remat=(True, False, True, True),
                                                           stage_option=mw.UniformStageOption(num_stages=1)))
    with pytest.raises(Exception, match="remat gives 4 flag"):
        par(state, batch)


def test_stage_dp_takes_remat_only_where_memory_needs_it():
    """Synthetic candidates: each stage has a plain variant and a slower remat one holding less
    per micro-batch. Without a limit (or a loose one) no stage rematerializes; with a limit only
    the early 1F1B stages (most micro-batches in flight) do."""
    def cost(start, end, sub):                 # one device per stage: 4 stages of one layer
        n = end - start
        if sub.num_devices != 1:
            return []
        return [StageCandidate((1,), 1.0 * n, 1.0 * n, 4.0 * n),
                StageCandidate((1,), 1.3 * n, 1.5 * n, 0.5 * n, remat=True)]

    def plan(capacity):
        return solve_stages(4, 1, 4, 8, cost, memory_capacity=capacity)

    assert not any(s.remat for s in plan(None).stages)
    assert not any(s.remat for s in plan(1e9).stages)
    tight = plan(10.0)
    assert [s.in_flight for s in tight.stages] == [4, 3, 2, 1]
    assert [s.remat for s in tight.stages] == [True, True, False, False]
    assert all(s.memory <= 10.0 for s in tight.stages)


def test_planner_rematerializes_a_stage_only_when_the_budget_requires_it(monkeypatch):
    """The real pricing (mw.plan, per-layer ILPs): under a budget no plain plan fits, remat='auto'
    finds a plan by rematerializing some stage, and every stage fits; without a budget nothing is
    rematerialized. Forcing remat costs time (the forward again) and saves activation memory.
    Memory-lean layouts (tests/test_stage_memory.py) are left out: at this budget they alone fit."""
    from meshweave.passes import stage_profiling

    monkeypatch.setattr(stage_profiling, "LEAN_PRICE_FACTORS", ())
    step, state, batch = abstract_gpt_4x512()

    def plan(budget, remat):
        method = mw.PipeshardParallel(num_micro_batches=4, remat=remat, default_auto_sharding_option=mw.AutoShardingOption(
            memory_budget_per_device=budget, combine_all_reduces=False))
        # Compute made ~free: the test is about activation memory, which the compute-priced ILP's
        # choices for this small model (replicated layers) would dwarf with parameter memory.
        # Two GPUs: on 8, a plain two-stage plan on (4)(4) holds less (373 MB) than the fastest
        # remat plan, one (2,4) stage (489 MB), so that plan's memory excludes no plain plan.
        cluster = dataclasses.replace(mw.ClusterSpec.preset("h100", 2), device_flops=1e18)
        return mw.plan(step, state, batch, method=method, cluster=cluster)

    free = plan(None, "auto")
    assert not any(s.remat for s in free.stages.stages)
    forced = plan(None, True)
    assert all(s.remat for s in forced.stages.stages)
    assert forced.predicted_step_time > free.predicted_step_time
    # A budget no plain plan fits: start at the fastest remat plan's memory and lower it below every
    # plain plan the DP still finds (each fits with less memory: more stages, other meshes).
    budget = int(max(s.memory for s in forced.stages.stages)) + 1
    assert budget < max(s.memory for s in free.stages.stages)
    for _ in range(8):
        try:
            plain = plan(budget, False)
        except Exception as e:
            assert "rematerialization" in str(e)         # the error names the way out
            break
        budget = int(max(s.memory for s in plain.stages.stages)) - 1
    else:
        pytest.fail("a plain plan fits every budget tried")
    tight = plan(budget, "auto")
    assert any(s.remat for s in tight.stages.stages)
    assert all(s.memory <= budget for s in tight.stages.stages)


def test_the_remat_the_dp_chooses_is_what_runs():
    """Compiled (not plan-only): remat="auto" rematerializes nothing without a budget; under a
    budget only the remat variant fits, the DP picks it, the rematerialize pass recomputes exactly
    the layers of the stages it marked, and the step still equals jax.jit."""
    step, state, batch = _dropout_mlp()
    batch = {"x": jnp.tile(batch["x"], (16, 1)), "y": jnp.tile(batch["y"], (16, 1)),
             "seeds": jnp.arange(256, dtype=jnp.uint32)}

    def method(budget):
        return mw.PipeshardParallel(num_micro_batches=8, pipeline_schedule="gpipe", remat="auto",
                                    default_auto_sharding_option=mw.AutoShardingOption(memory_budget_per_device=budget))

    free = mw.parallelize(step, method=method(None)).get_executable(state, batch)
    stages = free.state.results["stage-construction"].stages
    assert not any(s.remat for s in stages) and not free.state.results["rematerialize"].layers
    budget = int(0.6 * max(s.memory for s in stages))
    exe = _run(step, state, batch, method(budget), steps=2)
    stages = exe.state.results["stage-construction"].stages
    assert any(s.remat for s in stages) and all(s.memory <= budget for s in stages)
    remat_layers = tuple(layer for s in stages if s.remat for layer in range(*s.layers))
    assert exe.state.results["rematerialize"].layers == remat_layers

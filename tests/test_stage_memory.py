"""Memory-aware stage candidates and the micro-batch search (passes/stage_profiling.py,
meshweave/pipeshard.py): a tight memory capacity is met by memory-lean candidates, the stage
is compiled in the layouts the DP priced, and the micro-batch count is searched."""
import jax
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.models import gpt, mlp
from meshweave.passes import stage_profiling
from meshweave.pipeshard import PipeshardError, compiled_stage_memory
from conftest import assert_trees_close


@pytest.fixture(scope="module")
def tiny_gpt():
    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=64, seq_len=16, d_model=64, heads=4, layers=4)
    key = jax.random.PRNGKey(1)
    return gpt.make_train_step(opt, grad_fn=mw.value_and_grad), gpt.init_state(key, cfg, opt), \
        gpt.synthetic_batch(key, cfg, 16)


def _plan(model, capacity, micro_batches=2):
    step, state, batch = model
    return mw.plan(step, state, batch, method=mw.PipeshardParallel(
        num_micro_batches=micro_batches, default_auto_sharding_option=mw.AutoShardingOption(combine_all_reduces=False)),
                   cluster=mw.ClusterSpec(1, 4, device_memory=capacity, device_flops=_FREE_COMPUTE))


# Compute made ~free: these tests are about memory; with compute priced at a real rate the ILP runs
# this small model's layers replicated, and parameter memory alone decides every plan.
_FREE_COMPUTE = 1e18


_FASTEST = {}


def _fastest_memory(model) -> float:
    """The most memory a stage of the unconstrained (fastest) plan holds per device."""
    if id(model) not in _FASTEST:
        _FASTEST[id(model)] = max(s.memory for s in _plan(model, None).stages.stages)
    return _FASTEST[id(model)]


def test_tight_capacity_is_met_by_memory_lean_candidates(tiny_gpt, monkeypatch):
    fast = _fastest_memory(tiny_gpt)
    loose = _plan(tiny_gpt, 10 * fast)
    assert all(s.auto_sharding.get("memory_price") is None for s in loose.stages.stages)
    assert [s.layers for s in loose.stages.stages] == [s.layers for s in _plan(tiny_gpt, None).stages.stages]
    # A capacity no plan of the fastest candidates fits: lower it below each such plan the DP finds
    # (more stages, other meshes), until the DP has none left.
    lean_factors = stage_profiling.LEAN_PRICE_FACTORS
    monkeypatch.setattr(stage_profiling, "LEAN_PRICE_FACTORS", ())   # only the fastest plan per shape
    tight = fast
    for _ in range(8):
        try:
            plain = _plan(tiny_gpt, tight)
        except Exception as e:
            assert "fit memory_capacity" in str(e)
            break
        tight = max(s.memory for s in plain.stages.stages) - 1
    else:
        pytest.fail("plans of the fastest candidates fit every capacity tried")
    monkeypatch.setattr(stage_profiling, "LEAN_PRICE_FACTORS", lean_factors)
    lean = _plan(tiny_gpt, tight)
    assert all(s.memory <= tight for s in lean.stages.stages)
    assert any(s.auto_sharding.get("memory_price") is not None for s in lean.stages.stages)
    assert lean.predicted_step_time > loose.predicted_step_time      # memory is paid for in time


@pytest.mark.parametrize("fraction", [0.95, 0.4])
def test_stage_is_compiled_in_the_layouts_the_dp_priced(tiny_gpt, monkeypatch, fraction):
    """The chosen candidate's settings (its sub-cluster's α-β, the memory price) compile the stage,
    as benchmarks/stage_programs.py compiles a planned row: the compiled fragments hold what the DP
    predicted per device. 0.95: stages of several layers from the fastest candidates (the stage's
    ILP replicates a block to feed the replicated LM head, which the layers' sum did not see);
    0.4: only a memory-lean candidate fits, and without its price the stage holds more."""
    step, state, batch = tiny_gpt
    capacity = fraction * _fastest_memory(tiny_gpt)
    stages = _plan(tiny_gpt, capacity).stages.stages
    assert any(s.layers[1] - s.layers[0] > 1 for s in stages)
    lean = fraction < 0.5
    if lean:
        assert any(s.auto_sharding.get("memory_price") is not None for s in stages)
        with monkeypatch.context() as m:
            m.setattr(stage_profiling, "LEAN_PRICE_FACTORS", ())   # the fastest candidates alone do not fit
            with pytest.raises(Exception, match="fit memory_capacity"):
                _plan(tiny_gpt, capacity)

    def compile_with(options):
        option = mw.ManualStageOption(tuple(tuple(range(*s.layers)) for s in stages),
                                      tuple(s.physical_shape for s in stages),
                                      tuple(tuple(s.mesh.shape) for s in stages), tuple(options))
        par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=2, stage_option=option,
                                                               devices=tuple(jax.devices()[:4])))
        s1, l1 = par(state, batch)
        s2, l2 = jax.jit(step)(state, batch)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
        assert_trees_close(s1, s2, rtol=1e-4, atol=1e-5)     # sharded sums: float32 summation order
        exe = par.last_executable
        return compiled_stage_memory(exe.program, exe.state.results["stage-outlining"])

    def priced_as_the_dp(s):          # what benchmarks/stage_programs.py compiles a planned stage with
        import dataclasses

        n = len(s.mesh.device_ids)
        _, alpha, beta = dataclasses.replace(mw.ClusterSpec(1, 4), devices_per_host=n,
                                             mesh_shape=tuple(s.mesh.shape)).logical_mesh()
        return {"alpha": alpha, "beta": beta, "time_limit": 5.0, "memory_price": s.auto_sharding.get("memory_price"),
                "device_flops": _FREE_COMPUTE, "combine_all_reduces": False}

    held = compile_with(priced_as_the_dp(s) for s in stages)
    assert held == pytest.approx([s.memory for s in stages], rel=1e-3)
    assert max(held) <= capacity
    if lean:
        unpriced = compile_with({**priced_as_the_dp(s), "memory_price": None} for s in stages)
        assert max(unpriced) > max(held) * 1.01


def test_micro_batch_search_picks_the_fastest_count_that_fits(tiny_gpt):
    capacity = 0.7 * _fastest_memory(tiny_gpt)
    result = _plan(tiny_gpt, capacity, micro_batches="auto")
    tries = result.micro_batch_search
    # a batch of 2^4: every count is a rung of the search's ladder (tests/test_micro_batch_search.py)
    assert sorted(t.micro_batches for t in tries) == [1, 2, 4, 8, 16]
    fitting = [t for t in tries if t.step_time is not None]
    assert fitting and result.predicted_step_time == min(t.step_time for t in fitting)
    assert result.stages.micro_batches == min(fitting, key=lambda t: t.step_time).micro_batches
    assert all(s.memory <= capacity for s in result.stages.stages)
    assert "micro_batch_search" in result.timings
    listed = _plan(tiny_gpt, capacity, micro_batches=(8, 2))
    assert [t.micro_batches for t in listed.micro_batch_search] == [2, 8]


def test_searched_micro_batch_count_runs_like_jit():
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 32, 32, 32, 8], opt)
    batch = mlp.synthetic_batch(key, 32, 16, 8)
    step = mlp.make_train_step(opt, grad_fn=mw.value_and_grad)
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=(1, 2, 4), devices=tuple(jax.devices()[:4])))
    s1 = s2 = state
    for _ in range(2):
        s1, l1 = par(s1, batch)
        s2, l2 = jax.jit(step)(s2, batch)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert_trees_close(s1, s2, rtol=1e-5, atol=1e-6)
    assert par.last_executable.program.num_micro_batches in (1, 2, 4)


def test_bad_micro_batch_and_memory_price_settings_say_what_to_change(tiny_gpt):
    for bad in (0, (), (2, 0), "many", 2.0):
        with pytest.raises(mw.MethodError, match="num_micro_batches"):
            mw.PipeshardParallel(num_micro_batches=bad)
    with pytest.raises(PipeshardError, match="do not divide the global batch of 16"):
        _plan(tiny_gpt, None, micro_batches=(2, 3))
    with pytest.raises(mw.MethodError, match="memory_budget_per_device"):
        mw.ShardParallel(auto_sharding=mw.AutoShardingOption(memory_price=mw.MemoryPrice(1e-12)))
    with pytest.raises(mw.MethodError, match="per_byte"):
        mw.MemoryPrice(-1.0)


def test_auto_micro_batch_counts_are_every_divisor_of_the_batch():
    """A batch of 1520 = 2^4 x 5 x 19: its powers of two stop at 16, too few micro-batches for
    Wide-ResNet-13B on 64 p3 GPUs (the counts that fit were 38 and up); "auto" offers every divisor."""
    from types import SimpleNamespace

    import jax.numpy as jnp
    from meshweave.pipeshard import micro_batch_counts

    x = jax.ShapeDtypeStruct((1520, 3), jnp.float32)
    call = SimpleNamespace(leaves=[x], leaf_roles=lambda: [(0, True)], spec=SimpleNamespace(batch_argnums=(1,)))
    counts = micro_batch_counts(call, "auto")
    assert counts == tuple(k for k in range(1, 1521) if 1520 % k == 0)
    assert 38 in counts and 380 in counts


def _grouped_mlp(group: int):
    """An MLP step whose loss groups the samples `group` at a time (as a MoE groups tokens for
    dispatch): it does not trace at micro-batches of fewer than `group` samples; batch of 8."""
    from meshweave.models import training

    def grouped_loss(params, batch):
        x = batch["x"].reshape(-1, group, batch["x"].shape[-1]).reshape(-1, batch["x"].shape[-1])
        return mlp.mse_loss(params, {"x": x, "y": batch["y"]})

    opt = optax.sgd(1e-2)
    key = jax.random.PRNGKey(0)
    return (training.make_train_step(grouped_loss, opt, mw.value_and_grad),
            mlp.init_state(key, [16, 32, 32, 8], opt), mlp.synthetic_batch(key, 8, 16, 8))


def test_micro_batch_search_skips_counts_at_which_the_step_does_not_trace():
    """A step that groups samples in pairs (as a MoE groups tokens for dispatch) does not trace at
    one sample per micro-batch: the search records that count as failed and keeps the others; a
    fixed count that does not trace still raises."""
    step, state, batch = _grouped_mlp(2)

    def plan(k):
        return mw.plan(step, state, batch, method=mw.PipeshardParallel(num_micro_batches=k),
                       cluster=mw.ClusterSpec(1, 4, device_flops=_FREE_COMPUTE))

    result = plan((4, 8))
    tries = {t.micro_batches: t for t in result.micro_batch_search}
    assert tries[4].step_time is not None and result.stages.micro_batches == 4
    assert tries[8].step_time is None and "does not trace at 8 micro-batches" in tries[8].error
    with pytest.raises(Exception, match="could not trace"):
        plan(8)


def test_auto_search_walks_down_from_a_count_the_step_cannot_trace():
    """Samples grouped in fours: at 8 samples, 4 and 8 micro-batches do not trace. "auto" starts at
    the middle count (4), so it must walk towards fewer micro-batches, not bisect towards more."""
    step, state, batch = _grouped_mlp(4)
    result = mw.plan(step, state, batch,
                     method=mw.PipeshardParallel(num_micro_batches="auto"),
                     cluster=mw.ClusterSpec(1, 4, device_flops=_FREE_COMPUTE))
    assert result.stages.micro_batches in (1, 2)
    assert any(t.step_time is None and "does not trace" in t.error for t in result.micro_batch_search)


# One matmul whose 4 GiB weight is priced: as a 39B-parameter model's layers are, too large for the
# old cap on the priced cost (1e9 units: a byte over the fastest link is 1), which scaled every
# price down to the same weak one, so that the memory-lean levels of GPT-39B on 64 p3 GPUs held
# what the fastest layouts hold and the DP's only fitting plan at 256 micro-batches was one
# 64-device stage at 46551 s per step.
_BIG_WEIGHT = """
module {
  func.func public @main(%w: tensor<32768x65536xbf16>, %x: tensor<4096x32768xbf16> {mw.batch_dim = 0 : i64})
      -> tensor<4096x65536xbf16> {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0]
        : (tensor<4096x32768xbf16>, tensor<32768x65536xbf16>) -> tensor<4096x65536xbf16>
    return %0 : tensor<4096x65536xbf16>
  }
}
"""


def _priced_weight_layout(per_byte: float):
    from meshweave.dialects.context import parse_module
    from meshweave.dialects.sharding import MeshSpec
    from meshweave.passes import Pipeline, PipelineState
    from meshweave.plugin.compile import arg_shardings

    module = parse_module(_BIG_WEIGHT)
    state = PipelineState(mesh=MeshSpec.from_shape((8,)))
    priced = f" memory-price={per_byte!r} priced-args=0 priced-arg-scale=4.0" if per_byte else ""
    Pipeline(f"install-mesh,auto-sharding{{alpha=1e-5 beta=1e-11 batch-axes={state.mesh.axis_names[0]}{priced}}}"
             ).run(module, state)
    return arg_shardings(module)[0].used_axes(), state.results["auto-sharding"].objective


def test_memory_price_of_a_large_weight_is_not_scaled_away():
    """Held at 4 bytes per weight byte and priced at one fastest-link byte per byte, keeping the
    weight sharded (all-gathered for the matmul, ~3.8 GB over the link once) beats holding 4 GiB
    x 4 on every device: the ILP must shard it, and report the all-gather's time, not the price."""
    assert _priced_weight_layout(0.0)[0] == ()                  # unpriced: replicated, no collective
    axes, objective = _priced_weight_layout(1e-11)
    assert axes, "the priced weight stays replicated: the memory price did not reach the ILP"
    gathered = 32768 * 65536 * 2 * 7 / 8 * 1e-11
    assert objective == pytest.approx(gathered, rel=0.05)


def test_a_memory_price_beyond_the_solvers_range_is_scaled_with_a_warning():
    with pytest.warns(UserWarning, match="memory-price=1e-09 .* scaled down"):
        axes, _ = _priced_weight_layout(1e-9)
    assert axes                                                 # scaled, still far above the break-even


def _given_back(auto):
    """The stages an automatic plan chose, written as a ManualStageOption (with their carried settings)."""
    st = auto.stages.stages
    return mw.ManualStageOption(tuple(tuple(range(*s.layers)) for s in st), tuple(s.physical_shape for s in st),
                                tuple(tuple(s.mesh.shape) for s in st), tuple(dict(s.auto_sharding) for s in st))


@pytest.mark.parametrize("fraction", [None, 0.8])
def test_hand_given_stages_are_priced_as_the_dp_prices_its_choice(tiny_gpt, fraction):
    """One model for both: the stages the DP chose, given back by hand, get the DP's latency and
    memory per stage (so a hand-written plan, e.g. Megatron's, is checked against the capacity)."""
    step, state, batch = tiny_gpt
    capacity = None if fraction is None else fraction * _fastest_memory(tiny_gpt)
    auto = _plan(tiny_gpt, capacity)
    cluster = mw.ClusterSpec(1, 4, device_memory=capacity, device_flops=_FREE_COMPUTE)
    hand = mw.plan(step, state, batch, cluster=cluster, method=mw.PipeshardParallel(
        num_micro_batches=2, stage_option=_given_back(auto),
        remat=tuple(s.remat for s in auto.stages.stages),
        default_auto_sharding_option=mw.AutoShardingOption(combine_all_reduces=False)))
    assert len(hand.stages.stages) == len(auto.stages.stages) >= (1 if fraction is None else 2)
    for a, h in zip(auto.stages.stages, hand.stages.stages):
        assert not a.remat
        assert h.latency == pytest.approx(a.latency, rel=1e-6)
        assert h.memory == pytest.approx(a.memory, rel=1e-6)
    assert hand.predicted_step_time == pytest.approx(auto.predicted_step_time, rel=1e-6)
    assert hand.memory_per_device == pytest.approx(auto.memory_per_device, rel=1e-6)
    assert not any("capacity" in w for w in hand.warnings)


def test_hand_given_stages_over_the_capacity_are_flagged(tiny_gpt):
    step, state, batch = tiny_gpt
    auto = _plan(tiny_gpt, None, micro_batches=2)
    capacity = 0.5 * auto.memory_per_device
    hand = mw.plan(step, state, batch, cluster=mw.ClusterSpec(1, 4, device_memory=capacity, device_flops=_FREE_COMPUTE),
                   method=mw.PipeshardParallel(num_micro_batches=2, stage_option=_given_back(auto)))
    assert hand.memory_per_device > capacity
    over = [w for w in hand.warnings if "capacity" in w]
    assert over and "more micro-batches" in over[0] and f"stage {auto.stages.stages[0].index}" in " ".join(over)

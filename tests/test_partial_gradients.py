"""partial-gradients pricing: what the stage DP stops charging per micro-batch is the all-reduce
the intra-op ILP priced for the gradient, and it is charged once per step instead."""
import pytest

from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.pipeline import Pipeline, PipelineState
from meshweave.passes.stage_profiling import GradientPricing, _gradients_once_per_step

WEIGHT_GRAD = """
module {
  func.func @main(%x: tensor<64x16xf32> {mw.batch_dim = 0 : i64}, %dy: tensor<64x32xf32> {mw.batch_dim = 0 : i64})
      -> (tensor<16x32xf32>, tensor<32xf32>) {
    %g = stablehlo.dot_general %x, %dy, contracting_dims = [0] x [0] : (tensor<64x16xf32>, tensor<64x32xf32>) -> tensor<16x32xf32>
    %z = stablehlo.constant dense<0.0> : tensor<f32>
    %b = stablehlo.reduce(%dy init: %z) applies stablehlo.add across dimensions = [0] : (tensor<64x32xf32>, tensor<f32>) -> tensor<32xf32>
    return %g, %b : tensor<16x32xf32>, tensor<32xf32>
  }
}
"""


def test_the_saved_per_micro_batch_cost_is_the_ilps_gradient_all_reduce():
    spec = MeshSpec.from_shape((4,))
    module = parse_module(WEIGHT_GRAD)
    state = PipelineState(mesh=spec, options={})
    Pipeline("install-mesh{shape=4},auto-sharding{batch-axes=x}").run(module, state, record_ir=False)
    ilp_all_reduce = state.results["auto-sharding"].predicted_costs.get("all-reduce", 0.0)
    assert ilp_all_reduce > 0                    # data parallel: both gradients are summed across x
    g = _gradients_once_per_step(module, state, spec, [0, 1], [0, 1])
    assert g.saved == pytest.approx(ilp_all_reduce)
    assert g.once == pytest.approx(g.saved)      # here the partial sums are the gradients themselves
    assert g.marked == 0.0                       # no micro-batches given to the ILP: nothing priced once
    assert g.accumulator_bytes == (16 * 32 + 32) * 4     # replicated accumulators, f32
    # With 8 micro-batches the per-run cost drops by 7/8 of that all-reduce.
    assert g.latency_adjustment(8) == pytest.approx(-g.saved / 8 + g.once / 8)
    assert [p.index for p in state.results["partial-gradients"].partial] == [0, 1]


def test_nothing_is_saved_when_the_plan_does_not_split_the_sum():
    spec = MeshSpec.from_shape((4,))
    module = parse_module(WEIGHT_GRAD)
    state = PipelineState(mesh=spec, options={})
    Pipeline("install-mesh{shape=4},auto-sharding").run(module, state, record_ir=False)
    assert not state.results["auto-sharding"].predicted_costs.get("all-reduce", 0.0)   # compute is free to the ILP
    g = _gradients_once_per_step(module, state, spec, [0, 1], [0, 1])
    assert g.saved == g.once == 0.0


def test_the_ilp_prices_marked_gradient_sums_once_per_step():
    """With micro-batches, the ILP charges 1/B of a gradient sum's all-reduce; what the
    partial-gradients pass cannot prove is charged back in full by the adjustment."""
    spec = MeshSpec.from_shape((4,))
    full, share = {}, {}
    for k, out in ((1, full), (8, share)):
        module = parse_module(WEIGHT_GRAD)
        state = PipelineState(mesh=spec, options={})
        Pipeline(f"install-mesh{{shape=4}},auto-sharding{{batch-axes=x gradient-results=0,1 micro-batches={k}}}").run(
            module, state, record_ir=False)
        out["objective"] = state.results["auto-sharding"].objective
        out["pricing"] = _gradients_once_per_step(module, state, spec, [0, 1], [0, 1])
    # (objectives also hold the ILP's tie-breakers: compare to 1%)
    assert share["objective"] == pytest.approx(full["objective"] / 8, rel=1e-2)
    p = share["pricing"]
    assert p.marked == pytest.approx(p.saved) and p.saved == pytest.approx(full["objective"], rel=1e-2)
    assert share["objective"] + p.latency_adjustment(8) == pytest.approx(p.once / 8, rel=1e-2)
    unproven = GradientPricing(marked=p.marked, saved=0.0, once=0.0, accumulator_bytes=0.0)
    assert share["objective"] + unproven.latency_adjustment(8) == pytest.approx(full["objective"], rel=1e-2)


NORM_SCALE_GRAD = """
module {
  func.func @main(%dy: tensor<64x32xf32>, %w: tensor<32x32xf32>, %xhat: tensor<64x32xf32>) -> (tensor<32xf32>, tensor<32xf32>, tensor<64x32xf32>) {
    %z = stablehlo.constant dense<0.0> : tensor<f32>
    %dx = stablehlo.dot_general %dy, %w, contracting_dims = [1] x [1] : (tensor<64x32xf32>, tensor<32x32xf32>) -> tensor<64x32xf32>
    %p = stablehlo.multiply %dx, %xhat : tensor<64x32xf32>
    %g = stablehlo.reduce(%p init: %z) applies stablehlo.add across dimensions = [0] : (tensor<64x32xf32>, tensor<f32>) -> tensor<32xf32>
    %dx2 = stablehlo.dot_general %dy, %w, contracting_dims = [1] x [0] : (tensor<64x32xf32>, tensor<32x32xf32>) -> tensor<64x32xf32>
    %p2 = stablehlo.multiply %dx2, %xhat : tensor<64x32xf32>
    %g2 = stablehlo.reduce(%p2 init: %z) applies stablehlo.add across dimensions = [0] : (tensor<64x32xf32>, tensor<f32>) -> tensor<32xf32>
    return %g, %g2, %dx : tensor<32xf32>, tensor<32xf32>, tensor<64x32xf32>
  }
}
"""


def test_a_sum_the_backward_pass_also_reads_is_not_marked_as_a_gradient_sum():
    """A norm scale's gradient reduces dx * xhat; dx (an activation gradient: a dot over the hidden
    dim) also flows on to the previous layer, so it can never stay partial: the ILP must price its
    all-reduce in full (marked at 1/B, a tensor-parallel plan looked nearly free). Where dx has no
    other reader, the walk still reaches it."""
    from meshweave.dialects import meshweave as mw
    from meshweave.passes.partial_gradients import mark_gradient_sums

    module = parse_module(NORM_SCALE_GRAD)
    func = mw.main_func(module)
    assert mark_gradient_sums(func, [0, 1]) == 3
    ops = {o.operation.name: [] for o in mw.entry_block(func).operations}
    for o in mw.entry_block(func).operations:
        ops[o.operation.name].append(mw.GRADIENT_SUM in o.attributes)
    assert ops["stablehlo.reduce"] == [True, True]
    assert ops["stablehlo.dot_general"] == [False, True]     # dx is returned too; dx2 only feeds g2


def _scaled_chain(n: int) -> str:
    """A weight gradient scaled n times after its dot (a stand-in for a whole stage's long chains)."""
    ops = "\n".join(f"    %s{i + 1} = stablehlo.multiply %s{i}, %c : tensor<16x32xf32>" for i in range(n))
    return f"""
module {{
  func.func @main(%x: tensor<64x16xf32> {{mw.batch_dim = 0 : i64}}, %dy: tensor<64x32xf32> {{mw.batch_dim = 0 : i64}})
      -> tensor<16x32xf32> {{
    %s0 = stablehlo.dot_general %x, %dy, contracting_dims = [0] x [0] : (tensor<64x16xf32>, tensor<64x32xf32>) -> tensor<16x32xf32>
    %c = stablehlo.constant dense<0.5> : tensor<16x32xf32>
{ops}
    return %s{n} : tensor<16x32xf32>
  }}
}}
"""


@pytest.mark.parametrize("n, partial", [(8, True), (600, False)])
def test_a_chain_longer_than_the_limit_stays_reduced_with_a_reason(n, partial):
    """A linear chain past partial_gradients.MAX_CHAIN ops is kept reduced (always correct) and says
    so, instead of recursing past Python's limit (a 48-layer stage's backward did)."""
    from meshweave.passes import partial_gradients

    assert (n <= partial_gradients.MAX_CHAIN) == partial
    spec = MeshSpec.from_shape((4,))
    module = parse_module(_scaled_chain(n))
    state = PipelineState(mesh=spec, options={})
    Pipeline("install-mesh{shape=4},auto-sharding{batch-axes=x},partial-gradients{results=0}").run(
        module, state, record_ir=False)
    result = state.results["partial-gradients"]
    assert [p.index for p in result.partial] == ([0] if partial else [])
    if not partial:
        assert "longer than" in result.kept[0]

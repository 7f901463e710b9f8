"""partial-gradients pricing: what the stage DP stops charging per micro-batch is the all-reduce
the intra-op ILP priced for the gradient, and it is charged once per step instead."""
import pytest

from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.pipeline import Pipeline, PipelineState
from meshweave.passes.stage_profiling import _gradients_once_per_step

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
    saved, once, acc = _gradients_once_per_step(module, state, spec, [0, 1], [0, 1])
    assert saved == pytest.approx(ilp_all_reduce)
    assert once == pytest.approx(saved)          # here the partial sums are the gradients themselves
    assert acc == (16 * 32 + 32) * 4             # replicated accumulators, f32
    assert [p.index for p in state.results["partial-gradients"].partial] == [0, 1]


def test_nothing_is_saved_when_the_plan_does_not_split_the_sum():
    spec = MeshSpec.from_shape((4,))
    module = parse_module(WEIGHT_GRAD)
    state = PipelineState(mesh=spec, options={})
    Pipeline("install-mesh{shape=4},auto-sharding").run(module, state, record_ir=False)
    assert not state.results["auto-sharding"].predicted_costs.get("all-reduce", 0.0)   # compute is free to the ILP
    saved, once, _ = _gradients_once_per_step(module, state, spec, [0, 1], [0, 1])
    assert saved == once == 0.0

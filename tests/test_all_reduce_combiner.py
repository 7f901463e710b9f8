"""XLA's all-reduce combiner in the ILP (issue 12, rule 5): independent gradient all-reduces over the
same axes compile to one op, so the ILP pays α once for them, and its prediction is what the
compiled program costs (meshweave.step_time)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.pipeline import Pipeline, PipelineState
from meshweave.step_time import estimate_executable
from conftest import assert_trees_close

# One host of 8 devices whose α / β = 16 kB: an embedding gradient of 32 kB then costs less as an
# all-to-all + all-gather (2α + 35840 β) than as an all-reduce (α + 57344 β) when every all-reduce
# pays its own α, and more when the all-reduce joins the other gradients' combined op (57344 β).
CLUSTER = mw.ClusterSpec(num_hosts=1, devices_per_host=8, intra_host_bandwidth=1e9, latency=16e-6,
                         device_flops=1e15, name="α/β = 16 kB")


def embedding_lm(vocab=128, d=64, layers=4, batch=16, seq=32):
    """Tied embedding, residual tanh layers: ten small gradients and one 32 kB embedding gradient."""
    def loss(p, b):
        h = jnp.take(p["embed"], b["tokens"], axis=0)
        for w in p["layers"]:
            h = h + jnp.tanh(h @ w["w"] + w["b"])
        logp = jax.nn.log_softmax(h @ p["embed"].T)
        return -jnp.mean(jnp.take_along_axis(logp, b["labels"][..., None], axis=-1))

    k = jax.random.split(jax.random.PRNGKey(0), 3 + layers)
    params = {"embed": jax.random.normal(k[0], (vocab, d)) / 8,
              "layers": [{"w": jax.random.normal(k[3 + i], (d, d)) / 8, "b": jnp.zeros(d)} for i in range(layers)]}
    opt = optax.sgd(1e-2)
    state = {"params": params, "opt_state": opt.init(params)}
    data = {"tokens": jax.random.randint(k[1], (batch, seq), 0, vocab),
            "labels": jax.random.randint(k[2], (batch, seq), 0, vocab)}

    def step(state, batch):
        value, grads = jax.value_and_grad(loss)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, value

    return step, state, data


def plan(step, state, data, combine: bool):
    _, alpha, beta = CLUSTER.logical_mesh()
    opt = mw.AutoShardingOption(alpha=alpha[1:], beta=beta[1:], combine_all_reduces=combine)
    f = mw.parallelize(step, method=mw.ShardParallel(devices=jax.devices()[:8], auto_sharding=opt))
    return f, f.get_executable(state, data)


def test_gradients_stay_all_reduces_and_the_prediction_is_the_compiled_cost():
    step, state, data = embedding_lm()
    f, exe = plan(step, state, data, combine=True)
    est = estimate_executable(exe, CLUSTER)
    assert {k.kind: k.count for k in est.kinds} == {"all-reduce": 1}        # every gradient in one op
    solved = exe.state.results["auto-sharding"]
    assert solved.predicted_collectives["all-reduce"]["count"] == 1
    assert solved.predicted_collectives["all-reduce"]["bytes"] == est.bytes("all-reduce")
    assert solved.predicted_costs["total"] == pytest.approx(est.communication_s, rel=1e-3)
    assert solved.objective == pytest.approx(est.communication_s, rel=1e-3)
    assert_trees_close(f(state, data), jax.jit(step)(state, data), rtol=1e-4, atol=1e-5)


def test_priced_one_by_one_the_embedding_gradient_moves_and_the_step_is_slower():
    """The failure the combiner model fixes: α per all-reduce makes the embedding gradient take an
    all-to-all + all-gather, which the compiled program pays for on top of the combined op."""
    step, state, data = embedding_lm()
    _, separate = plan(step, state, data, combine=False)
    _, combined = plan(step, state, data, combine=True)
    slow, fast = estimate_executable(separate, CLUSTER), estimate_executable(combined, CLUSTER)
    assert slow.count("all-to-all") == 1 and slow.count("all-gather") == 1
    assert fast.communication_s < slow.communication_s
    # Priced one by one, the ILP overestimates what XLA emits (it combines them anyway).
    assert separate.state.results["auto-sharding"].predicted_collectives["all-reduce"]["count"] > 1
    assert slow.count("all-reduce") == 1


ACTIVATION_CHAIN = """
module {
  func.func @main(%x: tensor<64x16xf32>, %w1: tensor<16x16xf32>, %w2: tensor<16x16xf32>) -> (tensor<64x16xf32>, tensor<16x16xf32>, tensor<16x16xf32>) {
    %h = stablehlo.dot_general %x, %w1, contracting_dims = [1] x [0] : (tensor<64x16xf32>, tensor<16x16xf32>) -> tensor<64x16xf32>
    %y = stablehlo.dot_general %h, %w2, contracting_dims = [1] x [0] : (tensor<64x16xf32>, tensor<16x16xf32>) -> tensor<64x16xf32>
    %g1 = stablehlo.dot_general %x, %y, contracting_dims = [0] x [0] : (tensor<64x16xf32>, tensor<64x16xf32>) -> tensor<16x16xf32>
    %g2 = stablehlo.dot_general %h, %y, contracting_dims = [0] x [0] : (tensor<64x16xf32>, tensor<64x16xf32>) -> tensor<16x16xf32>
    return %y, %g1, %g2 : tensor<64x16xf32>, tensor<16x16xf32>, tensor<16x16xf32>
  }
}
"""


def test_only_sums_that_feed_no_matmul_are_combined():
    """%h feeds a dot (an activation: its all-reduce is on the critical path, not combinable);
    %y feeds dots too; %g1 and %g2 are results only, so they may combine."""
    module = parse_module(ACTIVATION_CHAIN)
    state = PipelineState(mesh=MeshSpec.from_shape((4,)), options={})
    Pipeline("install-mesh{shape=4},auto-sharding").run(module, state, record_ir=False)
    graph = state.results["auto-sharding"].graph
    assert {graph.groups[st.group].name for st in graph.sum_steps} >= {"dot_general#1", "dot_general#3"}
    assert {graph.groups[g].name for c in graph.combined for g in c.members} == {"dot_general#3", "dot_general#4"}


@pytest.mark.parametrize("combine", [True, False])
def test_two_gradient_sums_pay_alpha_once(combine):
    """Data parallel: %g1 and %g2 are both summed over x; combined, the ILP (its hub node) pays
    α once and lists one all-reduce of both gradients' bytes."""
    module = parse_module(ACTIVATION_CHAIN.replace("%x: tensor<64x16xf32>", "%x: tensor<64x16xf32> {mw.batch_dim = 0 : i64}"))
    state = PipelineState(mesh=MeshSpec.from_shape((4,)), options={})
    Pipeline(f"install-mesh{{shape=4}},auto-sharding{{batch-axes=x combine-all-reduces={str(combine).lower()}}}").run(
        module, state, record_ir=False)
    solved = state.results["auto-sharding"]
    assert solved.predicted_collectives["all-reduce"] == {"count": 1 if combine else 2, "bytes": 2 * 16 * 16 * 4}
    lm = solved.graph.lmesh
    one_op = lm.all_reduce(2 * 16 * 16 * 4, ("x",))
    assert solved.predicted_costs["all-reduce"] == pytest.approx(one_op + (0 if combine else lm.all_reduce(0, ("x",))))
    hubs = [n for n in solved.problem.node_names if n.startswith("combined all-reduce")]
    assert hubs == (["combined all-reduce over x (f32 add)"] if combine else [])


MAX_AND_SUM = """
module {
  func.func @main(%x: tensor<64x16xf32> {mw.batch_dim = 0 : i64}) -> (tensor<16xf32>, tensor<16xf32>, tensor<16xf32>) {
    %z = stablehlo.constant dense<0.0> : tensor<f32>
    %m = stablehlo.constant dense<0xFF800000> : tensor<f32>
    %a = stablehlo.reduce(%x init: %z) applies stablehlo.add across dimensions = [0] : (tensor<64x16xf32>, tensor<f32>) -> tensor<16xf32>
    %x2 = stablehlo.multiply %x, %x : tensor<64x16xf32>
    %b = stablehlo.reduce(%x2 init: %z) applies stablehlo.add across dimensions = [0] : (tensor<64x16xf32>, tensor<f32>) -> tensor<16xf32>
    %c = stablehlo.reduce(%x init: %m) applies stablehlo.maximum across dimensions = [0] : (tensor<64x16xf32>, tensor<f32>) -> tensor<16xf32>
    return %a, %b, %c : tensor<16xf32>, tensor<16xf32>, tensor<16xf32>
  }
}
"""


def test_a_max_all_reduce_does_not_combine_with_sums():
    """XLA combines all-reduces of one reduction only: two sums make one op, the max its own."""
    module = parse_module(MAX_AND_SUM)
    state = PipelineState(mesh=MeshSpec.from_shape((4,)), options={})
    Pipeline("install-mesh{shape=4},auto-sharding{batch-axes=x}").run(module, state, record_ir=False)
    solved = state.results["auto-sharding"]
    assert sorted((c.dtype, sum(len(v) for m in c.members.values() for v in m.values()))
                  for c in solved.graph.combined) == [("f32 add", 2), ("f32 maximum", 1)]
    assert solved.predicted_collectives["all-reduce"] == {"count": 2, "bytes": 3 * 16 * 4}


def test_explain_lists_the_combined_all_reduces():
    module = parse_module(MAX_AND_SUM)
    state = PipelineState(mesh=MeshSpec.from_shape((4,)), options={})
    Pipeline("install-mesh{shape=4},auto-sharding{batch-axes=x}").run(module, state, record_ir=False)
    text = state.results["auto-sharding"].explain()
    assert "XLA's all-reduce combiner" in text and "2 sums combined by XLA (combined all-reduce over x (f32 add))" in text


@pytest.mark.parametrize("kwargs", [{"combine_all_reduces": "no"}, {"all_reduce_combine_threshold_bytes": 0},
                                    {"all_reduce_combine_threshold_bytes": -5}, {"all_reduce_combine_threshold_bytes": 1.5},
                                    {"all_reduce_combine_threshold_bytes": True}])
def test_combiner_options_are_checked(kwargs):
    from meshweave.methods import MethodError

    with pytest.raises(MethodError, match=next(iter(kwargs))):
        mw.AutoShardingOption(**kwargs)
    mw.AutoShardingOption(combine_all_reduces=False, all_reduce_combine_threshold_bytes=31457280)

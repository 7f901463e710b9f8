"""The intra-op ILP prices compute (AutoShardingOption.device_flops): a dot/convolution strategy pays
its per-device FLOPs at the device rate, in the objective's time unit, beside its communication."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import meshweave as mw
from meshweave.methods import MethodError

CLUSTER = mw.ClusterSpec(num_hosts=2, devices_per_host=4)
SLOW_DEVICE = 1e12          # FLOP/s: a device slow enough that a 1e8-FLOP dot outweighs one all-reduce


def _loss(w, x):
    return jnp.sum(jnp.tanh(x @ w))


def _args():
    # 1028 = 4 x 257 rows: the batch splits 4 (or 2) ways but not 8, and 255 splits neither way, so
    # no strategy of the dot uses the whole 2x4 mesh; splitting the batch costs an all-reduce of the sum.
    kw, kx = jax.random.split(jax.random.PRNGKey(0))
    return jax.random.normal(kw, (255, 255)) / 16, jax.random.normal(kx, (1028, 255))


def _option(device_flops):
    _, alpha, beta = CLUSTER.logical_mesh()
    return mw.AutoShardingOption(alpha=alpha, beta=beta, device_flops=device_flops)


def _dot_layout(device_flops):
    w, x = _args()
    planned = mw.plan(_loss, w, x, method=mw.ShardParallel(auto_sharding=_option(device_flops)), cluster=CLUSTER)
    auto = planned.auto_sharding
    (dot,) = [r for r in auto.graph.ops if r.heavy]
    return planned, auto.graph.tensors[dot.results[0]].shardings[auto.choice[dot.group]]


def test_compute_pricing_splits_a_dot_left_replicated():
    """Without compute in the objective the dot runs whole on every device (it looks free, and
    splitting it costs an all-reduce); priced, the batch is split and the all-reduce paid."""
    _, unpriced = _dot_layout(None)
    assert unpriced.used_axes() == ()
    planned, priced = _dot_layout(SLOW_DEVICE)
    assert priced.dims[0] and not priced.dims[1]          # rows (the batch) split, columns whole
    ways = planned.mesh.axes_size(priced.dims[0])
    assert ways > 1
    assert planned.compute_time == pytest.approx(2 * 1028 * 255 * 255 / ways / SLOW_DEVICE)
    assert planned.auto_sharding.compute_priced
    assert planned.objective > 0                             # the all-reduce, priced as communication


def test_compute_priced_plan_matches_jit():
    w, x = _args()
    method = mw.ShardParallel(mesh_shape=(2, 4), auto_sharding=_option(SLOW_DEVICE))
    step = mw.parallelize(_loss, method=method)
    got = step(w, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(_loss)(w, x)), rtol=1e-5)
    assert "all-reduce" in step.get_executable(w, x).hlo_text(0)
    assert "compute" in step.get_executable(w, x).explain()


def test_plan_splits_the_objective_into_communication_and_compute():
    """mw.plan's step time is communication + compute, each counted once: the compute part is what
    the ILP chose (at least the step's FLOPs over all devices), the rest of the objective is communication."""
    from meshweave.models import gpt
    import optax

    cfg = gpt.GPTConfig(vocab=256, seq_len=32, d_model=64, heads=4, layers=2)
    opt = optax.sgd(1e-2)
    state = jax.eval_shape(lambda: gpt.init_state(jax.random.PRNGKey(0), cfg, opt))
    batch = jax.eval_shape(lambda: gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 16))
    method = mw.ShardParallel(auto_sharding=mw.AutoShardingOption(device_flops=SLOW_DEVICE))
    planned = mw.plan(gpt.make_train_step(opt), state, batch, method=method, cluster=CLUSTER)
    auto = planned.auto_sharding
    assert auto.compute_priced
    flops = sum(r.flops for r in auto.graph.ops)
    assert planned.compute_time >= flops / CLUSTER.num_devices / SLOW_DEVICE * (1 - 1e-9)
    assert planned.compute_time < flops / SLOW_DEVICE / 2          # the work is split, not replicated
    assert planned.compute_time == pytest.approx(auto.compute_cost)
    assert planned.predicted_step_time == pytest.approx(auto.objective)
    assert planned.objective == pytest.approx(auto.objective - auto.compute_cost)


@pytest.mark.parametrize("rate", [0, -1.0, True, "fast"])
def test_bad_device_flops_is_refused_with_the_fix(rate):
    with pytest.raises(MethodError, match="device_flops"):
        mw.AutoShardingOption(device_flops=rate)


_PATCHIFY = """
func.func public @c(%x: tensor<16x64x64x3xf32>, %k: tensor<16x16x3x64xf32>) -> tensor<16x4x4x64xf32> {
  %0 = stablehlo.convolution(%x, %k) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f], window = {stride = [16, 16]} {batch_group_count = 1 : i64, feature_group_count = 1 : i64} : (tensor<16x64x64x3xf32>, tensor<16x16x3x64xf32>) -> tensor<16x4x4x64xf32>
  return %0 : tensor<16x4x4x64xf32>
}
"""


def test_patch_embedding_convolution_never_splits_its_window():
    """Shardy factors a strided convolution's input rows as (window x output); a plan splitting the
    window with the kernel's rows and summing compiled to a wrong ViT loss, so those stay whole
    (with compute priced such partial splits became cheap enough to be chosen)."""
    from jaxlib.mlir.passmanager import PassManager

    from meshweave.dialects.context import parse_module
    from meshweave.dialects.sharding import MeshSpec
    from meshweave.passes import sharding_rules as sr

    m = parse_module(_PATCHIFY)
    PassManager.parse("builtin.module(func.func(sdy-populate-op-sharding-rules))", context=m.context).run(m.operation)
    conv = next(op for op in m.body.operations[0].regions[0].blocks[0].operations
                if op.operation.name == "stablehlo.convolution")
    rule = sr.Rule.from_attr(conv.attributes["sdy.sharding_rule"])
    compound = {f for dims in rule.operands for fs in dims if len(fs) > 1 and set(fs) & rule.permutation for f in fs}
    assert compound and any(rule.shardable(f) for f in compound)      # what Shardy offers
    safe = sr.whole_compound_dims(rule)
    mesh = MeshSpec.from_shape((4, 2), ("x", "y"))
    assigns = sr.enumerate_assignments(safe, mesh)
    assert assigns and all(not a[f] for a in assigns for f in compound)
    assert any(a[0] for a in assigns)                                  # the batch still splits


def test_convolution_compute_counts_the_kernel_window():
    """A convolution's sharding rule gives its kernel window size-1 factors: the ILP's FLOPs come
    from its shapes (2 x outputs x window x input features), for the forward, input-gradient (lhs
    dilated when strided) and weight-gradient convolutions alike."""
    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    w, x = jnp.ones((3, 3, 8, 16)), jnp.ones((4, 16, 16, 8))
    planned = mw.plan(jax.grad(loss, argnums=(0, 1)), w, x,
                      method=mw.ShardParallel(auto_sharding=_option(SLOW_DEVICE)), cluster=CLUSTER)
    convs = sorted(r.flops for r in planned.auto_sharding.graph.ops if r.heavy)
    forward = 2.0 * (4 * 8 * 8 * 16) * (3 * 3 * 8)
    assert convs == [pytest.approx(forward)] * 3          # forward, weight and input gradients

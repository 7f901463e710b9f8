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

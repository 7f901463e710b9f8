"""What a first call pays for beyond trace + plan + compile (issue 13): placing one-device inputs
onto the mesh compiles nothing, and the Shardy fidelity view is computed only when read, with
the same rows as computing it at once."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import monitoring

import meshweave as mw
from meshweave import fidelity
from meshweave.plan_builder import _shardy_view
from meshweave.runtime.placement import place
from conftest import assert_trees_close

# shapes no other test uses, so no jax cache can hide a compile
SIZES = (24, 40, 56)
OPT = optax.sgd(0.05)


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w0"])
    return jnp.mean((h @ params["w1"] - batch["y"]) ** 2)


def _step(state, batch):
    loss, g = mw.value_and_grad(_loss)(state["params"], batch)
    updates, opt_state = OPT.update(g, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def _inputs(seed):
    rng = np.random.default_rng(seed)
    a, b, c = SIZES
    params = {"w0": jnp.asarray(rng.standard_normal((a, b)), jnp.float32) / 5,
              "w1": jnp.asarray(rng.standard_normal((b, c)), jnp.float32) / 7}
    batch = {"x": jnp.asarray(rng.standard_normal((32, a)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((32, c)), jnp.float32)}
    return {"params": params, "opt_state": OPT.init(params)}, batch


class _Compiles:
    """Counts XLA compiles through jax's public monitoring events."""

    def __init__(self):
        self.count = 0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, name, secs, **kw):
        if name.endswith("backend_compile_duration"):
            self.count += 1


COMPILES = _Compiles()


def test_placing_one_device_inputs_compiles_nothing():
    step = mw.parallelize(_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    state, batch = _inputs(0)
    exe = step.get_executable(state, batch)
    sharded = [p for p in exe.plan.stages[0].inputs if '"' in p.sharding]
    assert sharded, "the plan shards no input: the test would not exercise placement"
    jax.clear_caches()
    state, batch = _inputs(1)                  # fresh arrays on one device, not yet on the mesh
    before = COMPILES.count
    out = exe(state, batch)
    jax.block_until_ready(out)
    assert COMPILES.count == before, f"placing inputs compiled {COMPILES.count - before} program(s)"
    assert_trees_close(out, jax.jit(_step)(*_inputs(1)), rtol=2e-5, atol=2e-6)
    # a loop: the outputs go back in (already placed), with a fresh one-device batch
    _, batch2 = _inputs(2)
    before = COMPILES.count
    out2 = exe(out[0], batch2)
    jax.block_until_ready(out2)
    assert COMPILES.count == before
    assert_trees_close(out2, jax.jit(_step)(jax.jit(_step)(*_inputs(1))[0], batch2), rtol=2e-5, atol=2e-6)


def test_place_keeps_values_and_prng_keys():
    mesh = jax.make_mesh((2, 4), ("x", "y"))
    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    x = jnp.arange(8 * 12, dtype=jnp.bfloat16).reshape(8, 12)
    y = place(x, s)
    assert y.sharding == s and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    keys = jax.random.split(jax.random.key(0), 8)         # extended dtype: no host view, jax places it
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    np.testing.assert_array_equal(jax.random.key_data(place(keys, rep)), jax.random.key_data(keys))


def test_lazy_shardy_view_equals_eager():
    step = mw.parallelize(_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    exe = step.get_executable(*_inputs(0))
    stage = exe.plan.stages[0]
    assert "_deferred_fidelity" in vars(stage) and callable(vars(stage)["_deferred_fidelity"]), \
        "the fidelity rows were computed at compile time"
    auto = exe.state.results["auto-sharding"]
    eager = fidelity.compare(auto.predicted_collectives, stage.collectives,
                             _shardy_view(exe.state, exe.state.mesh, exe.plan))
    assert stage.fidelity == eager and eager
    assert any(r["shardy_count"] for r in eager), eager       # Shardy's view did run
    assert exe.plan.to_dict()["stages"][0]["fidelity"] == eager


def test_pass_records_print_on_read():
    step = mw.parallelize(_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    exe = step.get_executable(*_inputs(0))
    rec = exe.pass_records[-1]
    assert not isinstance(vars(rec)["_ir"], str) or rec.name == "auto-sharding"
    text = exe.ir_after("auto-sharding")
    assert "sdy.sharding" in text and text is exe.ir_after("auto-sharding")     # printed once, kept

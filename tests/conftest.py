"""Shared test set-up: 8 simulated CPU devices (set before jax is imported) and numerics helpers."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


def assert_trees_close(actual, expected, rtol=1e-5, atol=1e-5):
    """Same pytree structure and values (the parallel result against single-device jax.jit)."""
    a_leaves, a_tree = jax.tree.flatten(actual)
    e_leaves, e_tree = jax.tree.flatten(expected)
    assert a_tree == e_tree, f"pytree structure differs: {a_tree} vs {e_tree}"
    for i, (a, e) in enumerate(zip(a_leaves, e_leaves)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol,
                                   err_msg=f"leaf {i} of {a_tree}")


@pytest.fixture(scope="session")
def ray_runtime():
    """meshweave's Ray runtime (a private local Ray: 2 simulated hosts x 4 CPU devices), started
    once per pytest session by the first test that asks for it."""
    pytest.importorskip("ray")
    from meshweave.runtime import ray as mw_ray

    cluster = mw_ray.start(num_hosts=2, devices_per_host=4)
    yield cluster
    mw_ray.shutdown()


def abstract_gpt_4x512():
    """(step, abstract state, abstract batch) of a 4-layer GPT (d_model 512, seq 256, vocab 8192,
    batch 16) with Adam, for plan-only tests of the stage DP's memory."""
    import jax.numpy as jnp
    import optax

    import meshweave as mw
    from meshweave.models import gpt

    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=8192, seq_len=256, d_model=512, heads=8, layers=4)
    state = jax.eval_shape(lambda: gpt.init_state(jax.random.PRNGKey(0), cfg, opt))
    batch = {"tokens": jax.ShapeDtypeStruct((16, 256), jnp.int32),
             "targets": jax.ShapeDtypeStruct((16, 256), jnp.int32)}
    return gpt.make_train_step(opt, grad_fn=mw.value_and_grad), state, batch


def run_against_jit(step, state, batch, method, steps=2, rtol=1e-5):
    """`steps` training steps of `mw.parallelize(step, method)` beside `jax.jit(step)`: losses equal
    at every step, states close at the end; returns the last executable."""
    import jax
    import numpy as np

    import meshweave as mw

    par = mw.parallelize(step, method=method)
    s1 = s2 = state
    for _ in range(steps):
        s1, l1 = par(s1, batch)
        s2, l2 = jax.jit(step)(s2, batch)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert_trees_close(s1, s2, rtol=rtol, atol=1e-6)
    return par.last_executable

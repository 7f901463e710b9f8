"""Flax (linen and nnx) models with optax Adam parallelize unchanged with every method and match
single-device jax.jit."""
import jax
import jax.numpy as jnp
import optax
import pytest

import meshweave as mw
from conftest import assert_trees_close

flax = pytest.importorskip("flax")
from flax import linen as nn  # noqa: E402
from flax import nnx  # noqa: E402

METHODS = {
    "data": lambda: mw.DataParallel(mesh_shape=(4,), devices=tuple(jax.devices()[:4])),
    "shard-2x2": lambda: mw.ShardParallel(mesh_shape=(2, 2), devices=tuple(jax.devices()[:4])),
    "zero2": lambda: mw.Zero2Parallel(mesh_shape=(4,), devices=tuple(jax.devices()[:4])),
    "zero3": lambda: mw.Zero3Parallel(mesh_shape=(4,), devices=tuple(jax.devices()[:4])),
    "grad-acc": lambda: mw.ShardParallel(mesh_shape=(4,), devices=tuple(jax.devices()[:4]), num_micro_batches=2),
}


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.gelu(nn.Dense(64)(x)))
        return nn.Dense(8)(x)


def _data():
    k = jax.random.split(jax.random.PRNGKey(1), 2)
    return {"x": jax.random.normal(k[0], (32, 16)), "y": jax.random.normal(k[1], (32, 8))}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_linen_with_adam(method):
    model, opt = LinenMLP(), optax.adam(1e-3)
    batch = _data()
    params = model.init(jax.random.PRNGKey(0), batch["x"])
    state = {"params": params, "opt_state": opt.init(params)}

    def step(state, batch):
        loss_fn = lambda p, b: jnp.mean((model.apply(p, b["x"]) - b["y"]) ** 2)
        loss, grads = mw.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    out = mw.parallelize(step, method=METHODS[method]())(state, batch)
    assert_trees_close(out, jax.jit(step)(state, batch), rtol=1e-3, atol=1e-5)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 64, rngs=rngs)
        self.norm = nnx.LayerNorm(64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 8, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.norm(nnx.gelu(self.fc1(x))))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_nnx_functional_split_merge_with_adam(method):
    model = NnxMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.adam(1e-3)
    state = {"params": params, "opt_state": opt.init(params)}
    batch = _data()

    def step(state, batch):
        def loss_fn(p, b):
            m = nnx.merge(graphdef, p)
            return jnp.mean((m(b["x"]) - b["y"]) ** 2)

        loss, grads = mw.value_and_grad(loss_fn)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    out = mw.parallelize(step, method=METHODS[method]())(state, batch)
    assert_trees_close(out, jax.jit(step)(state, batch), rtol=1e-3, atol=1e-5)

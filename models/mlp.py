"""A multi-layer perceptron (Dense with bias, ReLU) and its optax training step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meshweave.markers import mark_pipeline_boundary
from meshweave.models import training


def init(key, sizes, dtype=jnp.float32):
    """Parameters of an MLP with layer widths `sizes` (input first): a list of {kernel, bias}."""
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        k = jax.random.fold_in(key, i)
        params.append({"kernel": (jax.random.normal(k, (a, b)) / np.sqrt(a)).astype(dtype),
                       "bias": jnp.zeros((b,), dtype)})
    return params


def apply(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["kernel"] + layer["bias"]
        if i < len(params) - 1:
            x = mark_pipeline_boundary(jax.nn.relu(x))   # a pipeline layer per dense layer (identity elsewhere)
    return x


def mse_loss(params, batch):
    return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2)


def make_train_step(optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(mse_loss, optimizer, grad_fn)


def init_state(key, sizes, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, sizes, dtype), optimizer)


def synthetic_batch(key, batch_size, in_dim, out_dim, dtype=jnp.float32):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (batch_size, in_dim), dtype)
    w = jax.random.normal(kw, (in_dim, out_dim), dtype) / np.sqrt(in_dim)
    return {"x": x, "y": jnp.tanh(x @ w)}

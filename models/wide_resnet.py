"""A Wide-ResNet block (Zagoruyko & Komodakis 2016: batch norm, ReLU, 3x3 convolutions, a 1x1
projection shortcut; NHWC) with a classifier head, in plain JAX, with an optax training step.

Batch norm uses the batch statistics of the step (training mode), so its mean and variance
are reductions over the batch dimension the planner may split.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from meshweave.models import training
from meshweave.models.cnn import synthetic_batch  # noqa: F401  (the same images and labels)

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


def batch_norm(p, x, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    var = jnp.square(x - mean).mean(axis=(0, 1, 2))
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def init(key, in_channels=8, width=32, classes=10):
    k = jax.random.split(key, 4)
    norm = lambda c: {"scale": jnp.ones((c,)), "bias": jnp.zeros((c,))}
    return {"bn1": norm(in_channels), "conv1": jax.random.normal(k[0], (3, 3, in_channels, width)) * 0.1,
            "bn2": norm(width), "conv2": jax.random.normal(k[1], (3, 3, width, width)) * 0.05,
            "shortcut": jax.random.normal(k[2], (1, 1, in_channels, width)) * 0.2,
            "head": jax.random.normal(k[3], (width, classes)) * 0.1}


def apply(params, x):
    h = jax.nn.relu(batch_norm(params["bn1"], x))
    out = _conv(h, params["conv1"])
    out = _conv(jax.nn.relu(batch_norm(params["bn2"], out)), params["conv2"])
    out = out + _conv(h, params["shortcut"])
    return out.mean(axis=(1, 2)) @ params["head"]


loss_fn = training.classification_loss(apply)


def make_train_step(optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(loss_fn, optimizer, grad_fn)


def init_state(key, optimizer, **kw):
    return training.init_state(init(key, **kw), optimizer)



"""A small convolutional classifier (two 3x3 convolutions, a depthwise convolution, global average
pooling, a dense head; NHWC) with softmax cross-entropy and an optax training step."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from meshweave.models import training

_DN = ("NHWC", "HWIO", "NHWC")


def init(key, in_channels=8, channels=32, classes=10):
    k = jax.random.split(key, 4)
    return {"conv1": jax.random.normal(k[0], (3, 3, in_channels, channels)) * 0.1,
            "conv2": jax.random.normal(k[1], (3, 3, channels, channels)) * 0.05,
            "depthwise": jax.random.normal(k[2], (3, 3, 1, channels)) * 0.1,
            "head": jax.random.normal(k[3], (channels, classes)) * 0.1}


def apply(params, x):
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, params["conv1"], (1, 1), "SAME", dimension_numbers=_DN))
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, params["conv2"], (1, 1), "SAME", dimension_numbers=_DN))
    h = jax.lax.conv_general_dilated(h, params["depthwise"], (1, 1), "SAME", dimension_numbers=_DN,
                                     feature_group_count=h.shape[-1])
    return h.mean(axis=(1, 2)) @ params["head"]


loss_fn = training.classification_loss(apply)


def make_train_step(optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(loss_fn, optimizer, grad_fn)


def init_state(key, optimizer, **kw):
    return training.init_state(init(key, **kw), optimizer)


def synthetic_batch(key, batch_size, size=8, in_channels=8, classes=10):
    kx, ky = jax.random.split(key)
    images = jax.random.normal(kx, (batch_size, size, size, in_channels))
    labels = (images.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32) + jax.random.randint(ky, (batch_size,), 0, classes - 1)
    return {"images": images, "labels": labels % classes}

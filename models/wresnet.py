"""A Wide-ResNet (bottleneck blocks, ResNet-50/101 layout, the 3x3 convolution widened by the width factor,
batch norm with the step's batch statistics; NHWC) as Alpa benchmarked it, with a pipeline
boundary before every block after the first. (One WRN block for tests lives on the quality
branch as models/wide_resnet.py; this is the full network the benchmark needs.)
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meshweave.markers import mark_pipeline_boundary
from meshweave.models import training

_DN = ("NHWC", "HWIO", "NHWC")
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 8: (1, 1, 1, 1)}


@dataclass(frozen=True)
class WResNetConfig:
    image_size: int = 32
    layers: int = 8            # 50 or 101 (8: a 4-block network for tests)
    channels: int = 8          # filters of the first stage (doubling per stage)
    width_factor: int = 2
    classes: int = 16

    @property
    def blocks(self) -> tuple[int, ...]:
        return STAGE_BLOCKS[self.layers]


def _conv(x, w, stride=1):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=_DN)


def batch_norm(p, x, eps=1e-5):
    mean = x.mean(axis=(0, 1, 2))
    centered = x - mean
    var = (centered * centered).mean(axis=(0, 1, 2))   # not jnp.square: chlo.square has no sharding rule yet
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def init(key, cfg: WResNetConfig, dtype=jnp.float32):
    keys = iter(jax.random.split(key, 2 + 4 * sum(cfg.blocks)))
    conv = lambda k, cin, cout: (jax.random.normal(next(keys), (k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(dtype)
    norm = lambda c: {"scale": jnp.ones((c,), dtype), "bias": jnp.zeros((c,), dtype)}
    c0 = cfg.channels
    params = {"stem": conv(7, 3, c0), "stem_bn": norm(c0), "blocks": []}
    cin = c0
    for stage, n in enumerate(cfg.blocks):
        f = cfg.channels * 2 ** stage
        wide = f * cfg.width_factor
        for b in range(n):
            blk = {"conv1": conv(1, cin, f), "bn1": norm(f), "conv2": conv(3, f, wide), "bn2": norm(wide),
                   "conv3": conv(1, wide, 4 * f), "bn3": norm(4 * f)}
            if b == 0:
                blk["proj"], blk["bn_proj"] = conv(1, cin, 4 * f), norm(4 * f)
            params["blocks"].append(blk)
            cin = 4 * f
    params["head"] = (jax.random.normal(next(keys), (cin, cfg.classes)) / np.sqrt(cin)).astype(dtype)
    return params


def apply(params, images, cfg: WResNetConfig):
    x = jax.nn.relu(batch_norm(params["stem_bn"], _conv(images, params["stem"], 2)))
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    i = 0
    for stage, n in enumerate(cfg.blocks):
        for b in range(n):
            blk = params["blocks"][i]
            if i:
                x = mark_pipeline_boundary(x)
            stride = 2 if b == 0 and stage > 0 else 1
            h = jax.nn.relu(batch_norm(blk["bn1"], _conv(x, blk["conv1"])))
            h = jax.nn.relu(batch_norm(blk["bn2"], _conv(h, blk["conv2"], stride)))
            h = batch_norm(blk["bn3"], _conv(h, blk["conv3"]))
            short = batch_norm(blk["bn_proj"], _conv(x, blk["proj"], stride)) if "proj" in blk else x
            x = jax.nn.relu(h + short)
            i += 1
    return x.mean(axis=(1, 2)) @ params["head"]


def make_loss_fn(cfg: WResNetConfig):
    def loss_fn(params, batch):
        logp = jax.nn.log_softmax(apply(params, batch["images"], cfg))
        return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))

    return loss_fn


def make_train_step(cfg: WResNetConfig, optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(make_loss_fn(cfg), optimizer, grad_fn)


def init_state(key, cfg: WResNetConfig, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, cfg, dtype), optimizer)


def synthetic_batch(key, cfg: WResNetConfig, batch_size):
    kx, ky = jax.random.split(key)
    images = jax.random.normal(kx, (batch_size, cfg.image_size, cfg.image_size, 3))
    labels = (images.mean(axis=(1, 2, 3)) > 0).astype(jnp.int32) + jax.random.randint(ky, (batch_size,), 0, 2)
    return {"images": images, "labels": labels % cfg.classes}

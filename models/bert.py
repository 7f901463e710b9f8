"""A BERT encoder (post-LN: attention and MLP each followed by a residual add and layer norm,
GELU) with a masked-token prediction head, in plain JAX, with an optax training step.

A pipeline layer per encoder layer (`mark_pipeline_boundary` between layers; identity outside
PipeshardParallel). Layer norms use `jnp.square` for the variance, as many user models do (on jax 0.10 that lowers
to `chlo.square`, which the planner must shard like any elementwise op).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meshweave.markers import mark_pipeline_boundary
from meshweave.models import training


@dataclass(frozen=True)
class BertConfig:
    vocab: int = 128
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    d_ff: int = 256

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def _dense(key, shape, fan_in, dtype=jnp.float32):
    return (jax.random.normal(key, shape) / np.sqrt(fan_in)).astype(dtype)


def _norm(d, dtype=jnp.float32):
    return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}


def init(key, cfg: BertConfig, dtype=jnp.float32):
    d, h, k, f = cfg.d_model, cfg.heads, cfg.head_dim, cfg.d_ff
    keys = iter(jax.random.split(key, 3 + 6 * cfg.layers))
    params = {"embed": _dense(next(keys), (cfg.vocab, d), 1.0, dtype) * 0.02,
              "pos": _dense(next(keys), (cfg.seq_len, d), 1.0, dtype) * 0.02,
              "ln_embed": _norm(d, dtype),
              "head": {"kernel": _dense(next(keys), (d, cfg.vocab), d, dtype), "bias": jnp.zeros((cfg.vocab,), dtype)},
              "layers": []}
    for _ in range(cfg.layers):
        params["layers"].append({
            "qkv": {"kernel": _dense(next(keys), (d, 3, h, k), d, dtype), "bias": jnp.zeros((3, h, k), dtype)},
            "out": {"kernel": _dense(next(keys), (h, k, d), d, dtype), "bias": jnp.zeros((d,), dtype)},
            "ln_attn": _norm(d, dtype),
            "fc1": {"kernel": _dense(next(keys), (d, f), d, dtype), "bias": jnp.zeros((f,), dtype)},
            "fc2": {"kernel": _dense(next(keys), (f, d), f, dtype), "bias": jnp.zeros((d,), dtype)},
            "ln_mlp": _norm(d, dtype),
        })
    return params


def layer_norm(p, x, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def encoder_layer(p, x, mask):
    qkv = jnp.einsum("btd,dihk->ibthk", x, p["qkv"]["kernel"]) + p["qkv"]["bias"][:, None, None]
    q, k, v = qkv[0], qkv[1], qkv[2]
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    logits = jnp.where(mask[:, None, None, :], logits, -1e9)
    ctx = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(logits, axis=-1), v)
    x = layer_norm(p["ln_attn"], x + jnp.einsum("bqhk,hkd->bqd", ctx, p["out"]["kernel"]) + p["out"]["bias"])
    h = jax.nn.gelu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"], approximate=False)   # erf: chlo.erf
    return layer_norm(p["ln_mlp"], x + h @ p["fc2"]["kernel"] + p["fc2"]["bias"])


def apply(params, tokens, mask):
    x = layer_norm(params["ln_embed"], params["embed"][tokens] + params["pos"][None, : tokens.shape[1]])
    for i, p in enumerate(params["layers"]):
        if i:
            x = mark_pipeline_boundary(x)   # a pipeline layer per encoder layer (identity elsewhere)
        x = encoder_layer(p, x, mask)
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, batch):
    logp = jax.nn.log_softmax(apply(params, batch["tokens"], batch["mask"]), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return jnp.sum(nll * batch["weights"]) / jnp.maximum(jnp.sum(batch["weights"]), 1.0)


def make_train_step(optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(loss_fn, optimizer, grad_fn)


def init_state(key, cfg: BertConfig, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, cfg, dtype), optimizer)


def synthetic_batch(key, cfg: BertConfig, batch_size):
    """Masked-token prediction on a learnable pattern: every 4th position is masked out."""
    start = jax.random.randint(key, (batch_size, 1), 0, cfg.vocab)
    pos = jnp.arange(cfg.seq_len)[None, :]
    targets = ((start + 5 * pos) % cfg.vocab).astype(jnp.int32)
    masked = (pos % 4 == 1) & jnp.ones((batch_size, 1), bool)
    return {"tokens": jnp.where(masked, 0, targets), "targets": targets,
            "mask": jnp.ones((batch_size, cfg.seq_len), bool), "weights": masked.astype(jnp.float32)}

"""A GPT stack (token + position embedding, pre-LN causal attention, MLP, final LN, LM head,
softmax cross-entropy) in plain JAX, with an optax training step.

Attention weights are kept per head (`d_model x heads x head_dim`), the layout Megatron shards.
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
class GPTConfig:
    vocab: int = 256
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def _dense(key, shape, fan_in, dtype):
    return (jax.random.normal(key, shape) / np.sqrt(fan_in)).astype(dtype)


def init(key, cfg: GPTConfig, dtype=jnp.float32):
    d, h, k, f = cfg.d_model, cfg.heads, cfg.head_dim, cfg.d_model * cfg.mlp_ratio
    keys = iter(jax.random.split(key, 4 + 6 * cfg.layers))
    params = {
        "embed": _dense(next(keys), (cfg.vocab, d), 1.0, dtype) * 0.02,
        "pos": _dense(next(keys), (cfg.seq_len, d), 1.0, dtype) * 0.02,
        "ln_f": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
        "head": _dense(next(keys), (d, cfg.vocab), d, dtype),
        "blocks": [],
    }
    for _ in range(cfg.layers):
        params["blocks"].append({
            "ln1": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
            "wq": _dense(next(keys), (d, h, k), d, dtype),
            "wk": _dense(next(keys), (d, h, k), d, dtype),
            "wv": _dense(next(keys), (d, h, k), d, dtype),
            "wo": _dense(next(keys), (h, k, d), d, dtype),
            "ln2": {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)},
            "fc1": {"kernel": _dense(next(keys), (d, f), d, dtype), "bias": jnp.zeros((f,), dtype)},
            "fc2": {"kernel": _dense(next(keys), (f, d), f, dtype), "bias": jnp.zeros((d,), dtype)},
        })
    return params


def layer_norm(p, x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(blk, x):
    q = jnp.einsum("btd,dhk->bthk", x, blk["wq"])
    k = jnp.einsum("btd,dhk->bthk", x, blk["wk"])
    v = jnp.einsum("btd,dhk->bthk", x, blk["wv"])
    t = x.shape[1]
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
    probs = jax.nn.softmax(logits, axis=-1)
    ctx = jnp.einsum("bhqs,bshk->bqhk", probs, v)
    return jnp.einsum("bqhk,hkd->bqd", ctx, blk["wo"])


def mlp(blk, x):
    h = jax.nn.gelu(x @ blk["fc1"]["kernel"] + blk["fc1"]["bias"])
    return h @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]


def apply(params, tokens):
    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    for i, blk in enumerate(params["blocks"]):
        if i:
            x = mark_pipeline_boundary(x)   # a pipeline layer per block (identity elsewhere)
        x = x + attention(blk, layer_norm(blk["ln1"], x))
        x = x + mlp(blk, layer_norm(blk["ln2"], x))
    return layer_norm(params["ln_f"], x) @ params["head"]


def loss_fn(params, batch):
    logits = apply(params, batch["tokens"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
    return nll.mean()


def make_train_step(optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(loss_fn, optimizer, grad_fn)


def init_state(key, cfg: GPTConfig, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, cfg, dtype), optimizer)


def synthetic_batch(key, cfg: GPTConfig, batch_size):
    """Next-token prediction on a fixed random sequence pattern (learnable, not noise)."""
    start = jax.random.randint(key, (batch_size, 1), 0, cfg.vocab)
    steps = jnp.arange(cfg.seq_len + 1)[None, :]
    seq = (start + 7 * steps + (steps * steps) % 5) % cfg.vocab
    return {"tokens": seq[:, :-1].astype(jnp.int32), "targets": seq[:, 1:].astype(jnp.int32)}

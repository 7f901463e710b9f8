"""A GShard mixture-of-experts language model as Alpa benchmarked it: GPT blocks whose MLP is a
top-2 gated mixture of experts with a fixed capacity per expert, tokens routed in groups.

Attention and layer norm are models/gpt.py's. A pipeline boundary precedes every block after the
first. Expert weights (`E x M x H`, `E x H x M`) are what expert parallelism splits. The gating
and the expert feed-forward are models/moe.py's (the single MoE layer the tests use).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meshweave.markers import mark_pipeline_boundary
from meshweave.models import gpt, moe, training


@dataclass(frozen=True)
class MoELMConfig:
    vocab: int = 256
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    experts: int = 4
    group_size: int = 32        # tokens routed together (Alpa: 2048)
    capacity_factor: float = 2.0
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def capacity(self) -> int:
        """Tokens each expert takes from a group (GShard: factor x group / experts)."""
        return max(1, int(self.capacity_factor * self.group_size / self.experts))


def init(key, cfg: MoELMConfig, dtype=jnp.float32):
    d, h, k, f, e = cfg.d_model, cfg.heads, cfg.head_dim, cfg.d_model * cfg.mlp_ratio, cfg.experts
    keys = iter(jax.random.split(key, 4 + 7 * cfg.layers))
    dense = lambda shape, fan_in: (jax.random.normal(next(keys), shape) / np.sqrt(fan_in)).astype(dtype)
    norm = lambda: {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}
    params = {"embed": dense((cfg.vocab, d), 1.0) * 0.02, "pos": dense((cfg.seq_len, d), 1.0) * 0.02,
              "ln_f": norm(), "head": dense((d, cfg.vocab), d), "blocks": []}
    for _ in range(cfg.layers):
        params["blocks"].append({"ln1": norm(), "wq": dense((d, h, k), d), "wk": dense((d, h, k), d),
                                 "wv": dense((d, h, k), d), "wo": dense((h, k, d), d), "ln2": norm(),
                                 "gate": dense((d, e), d), "wi": dense((e, d, f), d), "wo_e": dense((e, f, d), f)})
    return params


top2_dispatch = moe.top2_gating        # the name this module exported before the layer was shared


def moe_mlp(blk, x, cfg: MoELMConfig):
    b, t, d = x.shape
    tokens = x.reshape(-1, cfg.group_size, d)              # [G, S, M]
    out = moe.experts_layer(tokens, blk["gate"], blk["wi"], blk["wo_e"], cfg.capacity, jax.nn.gelu)
    return out.reshape(b, t, d)


def apply(params, tokens, cfg: MoELMConfig):
    x = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]
    for i, blk in enumerate(params["blocks"]):
        if i:
            x = mark_pipeline_boundary(x)
        x = x + gpt.attention(blk, gpt.layer_norm(blk["ln1"], x))
        x = x + moe_mlp(blk, gpt.layer_norm(blk["ln2"], x), cfg)
    return gpt.layer_norm(params["ln_f"], x) @ params["head"]


def make_loss_fn(cfg: MoELMConfig):
    def loss_fn(params, batch):
        logp = jax.nn.log_softmax(apply(params, batch["tokens"], cfg).astype(jnp.float32), axis=-1)
        return -jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1).mean()

    return loss_fn


def make_train_step(cfg: MoELMConfig, optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(make_loss_fn(cfg), optimizer, grad_fn)


def init_state(key, cfg: MoELMConfig, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, cfg, dtype), optimizer)


def synthetic_batch(key, cfg: MoELMConfig, batch_size):
    return gpt.synthetic_batch(key, gpt.GPTConfig(vocab=cfg.vocab, seq_len=cfg.seq_len), batch_size)

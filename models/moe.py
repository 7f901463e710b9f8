"""A GShard mixture-of-experts layer (Lepikhin et al. 2020): top-2 gating with expert capacity,
expert-batched einsums, in plain JAX, with an optax training step.

Tokens come in groups (`G x S x M`), pass a dense input projection, and each group dispatches
at most `capacity` tokens to each of `experts` feed-forward experts. The expert weights
(`E x M x H`, `E x H x M`) are what expert parallelism splits; the projection and the gate
(`M x E`) are the non-expert weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meshweave.models import training


@dataclass(frozen=True)
class MoEConfig:
    groups: int = 8          # G: token groups (the batch)
    group_size: int = 32     # S: tokens per group
    d_model: int = 32        # M
    d_ff: int = 64           # H
    experts: int = 8         # E
    capacity: int = 8        # C: tokens per expert per group


def init(key, cfg: MoEConfig, dtype=jnp.float32):
    k = jax.random.split(key, 4)
    m, h, e = cfg.d_model, cfg.d_ff, cfg.experts
    return {"proj": (jax.random.normal(k[3], (m, m)) / np.sqrt(m)).astype(dtype),
            "gate": (jax.random.normal(k[0], (m, e)) / np.sqrt(m)).astype(dtype),
            "wi": (jax.random.normal(k[1], (e, m, h)) / np.sqrt(m)).astype(dtype),
            "wo": (jax.random.normal(k[2], (e, h, m)) / np.sqrt(h)).astype(dtype)}


def top2_gating(logits, capacity):
    """(combine [G,S,E,C], dispatch [G,S,E,C]): GShard's top-2 routing with capacity; tokens over
    an expert's capacity are dropped. The routing runs in float32 whatever the logits' dtype."""
    experts = logits.shape[-1]
    gates = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    index1 = jnp.argmax(gates, axis=-1)
    mask1 = jax.nn.one_hot(index1, experts, dtype=gates.dtype)
    index2 = jnp.argmax(gates * (1.0 - mask1), axis=-1)
    mask2 = jax.nn.one_hot(index2, experts, dtype=gates.dtype)
    pos1 = jnp.cumsum(mask1, axis=1) - mask1                        # place in the expert's queue
    mask1 = mask1 * (pos1 < capacity)
    pos2 = jnp.cumsum(mask2, axis=1) - mask2 + jnp.sum(mask1, axis=1, keepdims=True)
    mask2 = mask2 * (pos2 < capacity)
    gate1 = jnp.sum(gates * mask1, axis=-1)
    gate2 = jnp.sum(gates * mask2, axis=-1)
    norm = gate1 + gate2 + 1e-9
    slot1 = jax.nn.one_hot(jnp.sum(pos1 * mask1, axis=-1).astype(jnp.int32), capacity, dtype=gates.dtype)
    slot2 = jax.nn.one_hot(jnp.sum(pos2 * mask2, axis=-1).astype(jnp.int32), capacity, dtype=gates.dtype)
    combine = ((gate1 / norm)[..., None, None] * mask1[..., None] * slot1[:, :, None, :]
               + (gate2 / norm)[..., None, None] * mask2[..., None] * slot2[:, :, None, :])
    return combine.astype(logits.dtype), (combine > 0).astype(logits.dtype)


def experts_layer(tokens, gate, wi, wo, capacity, activation=jax.nn.relu):
    """The expert feed-forward of token groups [G, S, M]: top-2 dispatch to `capacity` slots per
    expert (E x M x H and E x H x M expert weights), combined back to [G, S, M]."""
    combine, dispatch = top2_gating(jnp.einsum("gsm,me->gse", tokens, gate), capacity)
    expert_in = jnp.einsum("gsec,gsm->egcm", dispatch, tokens)
    h = activation(jnp.einsum("egcm,emh->egch", expert_in, wi))
    expert_out = jnp.einsum("egch,ehm->egcm", h, wo)
    return jnp.einsum("gsec,egcm->gsm", combine, expert_out)


def apply(params, x, cfg: MoEConfig):
    x = jnp.tanh(x @ params["proj"])
    return x + experts_layer(x, params["gate"], params["wi"], params["wo"], cfg.capacity)


def make_loss_fn(cfg: MoEConfig):
    def loss_fn(params, batch):
        return jnp.mean(jnp.square(apply(params, batch["x"], cfg) - batch["y"]))

    return loss_fn


def make_train_step(cfg: MoEConfig, optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss); see models/training.py."""
    return training.make_train_step(make_loss_fn(cfg), optimizer, grad_fn)


def init_state(key, cfg: MoEConfig, optimizer, dtype=jnp.float32):
    return training.init_state(init(key, cfg, dtype), optimizer)


def synthetic_batch(key, cfg: MoEConfig):
    kx, kw = jax.random.split(key)
    x = jax.random.normal(kx, (cfg.groups, cfg.group_size, cfg.d_model))
    w = jax.random.normal(kw, (cfg.d_model, cfg.d_model)) / np.sqrt(cfg.d_model)
    return {"x": x, "y": jnp.tanh(x @ w)}

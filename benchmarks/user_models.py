"""Models a user brings, written outside the zoo (plain JAX + optax AdamW), to test the planner on
programs it was not tuned on: a LLaMA-style decoder, a ViT and a T5-style encoder-decoder.

- llama: RMSNorm, rotary position embeddings, grouped-query attention (kv heads = heads / 4),
  SwiGLU MLP, untied LM head.
- vit: patch embedding as a strided convolution, a class token, pre-LN encoder blocks (attention
  without q/k/v bias, GELU MLP with biases), a classifier head on the class token.
- t5: shared token embedding tied to the LM head, RMS-style layer norms without bias, an encoder,
  a decoder with causal self-attention and cross-attention to the encoder, ReLU MLPs.

Each model gives `(train_step, init_state, synthetic_batch)` from one size description and its
Megatron-style dp x tp PartitionSpecs (`megatron_specs(model, params, tp)`): attention by head
(q/k/v column-parallel, output row-parallel; kv heads replicated when they do not divide tp), MLP
column- then row-parallel, embedding and head vocab/class-parallel, norms and patch embedding
replicated.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec as P

USER_MODELS = ("llama", "vit", "t5")
TP = "y"


@dataclass(frozen=True)
class Size:
    vocab: int          # vocabulary (llama, t5) or classes (vit)
    seq_len: int        # tokens (llama; t5 encoder, its decoder has half); vit: about 2x its patches
    d_model: int
    heads: int
    layers: int         # t5: encoder and decoder layers each


def _w(key, shape, fan_in):
    return jax.random.normal(key, shape, jnp.float32) / np.sqrt(fan_in)


def _rms_norm(scale, x, eps=1e-6):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _layer_norm(p, x, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def _attend(q, k, v, causal: bool):
    """q: (b, t, h, d); k, v: (b, s, g, d) with h a multiple of g (grouped-query attention)."""
    b, t, h, d = q.shape
    g = k.shape[2]
    q = q.reshape(b, t, g, h // g, d)
    logits = jnp.einsum("btgrd,bsgd->bgrts", q, k) / np.sqrt(d)
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((t, k.shape[1]), bool)), logits, jnp.finfo(logits.dtype).min)
    ctx = jnp.einsum("bgrts,bsgd->btgrd", jax.nn.softmax(logits, axis=-1), v)
    return ctx.reshape(b, t, h, d)


def _cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


# ----------------------------------------------------------------------------- llama
def _llama_ff(d):
    return 8 * (((8 * d) // 3 + 7) // 8)     # SwiGLU's 8/3 d, a multiple of 8


def _llama_init(key, s: Size):
    d, h, kv, hd, f = s.d_model, s.heads, max(1, s.heads // 4), s.d_model // s.heads, _llama_ff(s.d_model)
    keys = iter(jax.random.split(key, 2 + 7 * s.layers))
    blocks = [{"attn_norm": jnp.ones((d,)), "wq": _w(next(keys), (d, h, hd), d), "wk": _w(next(keys), (d, kv, hd), d),
               "wv": _w(next(keys), (d, kv, hd), d), "wo": _w(next(keys), (h, hd, d), d), "mlp_norm": jnp.ones((d,)),
               "w_gate": _w(next(keys), (d, f), d), "w_up": _w(next(keys), (d, f), d), "w_down": _w(next(keys), (f, d), f)}
              for _ in range(s.layers)]
    return {"embed": _w(next(keys), (s.vocab, d), 1.0) * 0.02, "blocks": blocks, "norm": jnp.ones((d,)),
            "head": _w(next(keys), (d, s.vocab), d)}


def _rotary(x, base=10000.0):
    """Rotary position embedding of x (b, t, heads, d) over its sequence axis."""
    t, d = x.shape[1], x.shape[-1]
    freq = base ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]
    cos, sin = jnp.cos(angle)[None, :, None, :], jnp.sin(angle)[None, :, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def _llama_loss(params, batch):
    x = params["embed"][batch["tokens"]]
    for blk in params["blocks"]:
        y = _rms_norm(blk["attn_norm"], x)
        q = _rotary(jnp.einsum("btd,dhk->bthk", y, blk["wq"]))
        k = _rotary(jnp.einsum("btd,dhk->bthk", y, blk["wk"]))
        v = jnp.einsum("btd,dhk->bthk", y, blk["wv"])
        x = x + jnp.einsum("bthk,hkd->btd", _attend(q, k, v, causal=True), blk["wo"])
        y = _rms_norm(blk["mlp_norm"], x)
        x = x + (jax.nn.silu(y @ blk["w_gate"]) * (y @ blk["w_up"])) @ blk["w_down"]
    return _cross_entropy(_rms_norm(params["norm"], x) @ params["head"], batch["targets"])


def _token_batch(key, vocab, batch, seq):
    start = jax.random.randint(key, (batch, 1), 0, vocab)
    steps = jnp.arange(seq + 1)[None, :]
    tokens = (start + 7 * steps + (steps * steps) % 5) % vocab
    return tokens[:, :-1].astype(jnp.int32), tokens[:, 1:].astype(jnp.int32)


def _llama_batch(key, s: Size, batch):
    tokens, targets = _token_batch(key, s.vocab, batch, s.seq_len)
    return {"tokens": tokens, "targets": targets}


def _llama_specs(params, tp):
    kv = params["blocks"][0]["wk"].shape[1]
    kv_spec = P(None, TP, None) if kv % tp == 0 else P()
    blocks = [{"attn_norm": P(), "wq": P(None, TP, None), "wk": kv_spec, "wv": kv_spec, "wo": P(TP, None, None),
               "mlp_norm": P(), "w_gate": P(None, TP), "w_up": P(None, TP), "w_down": P(TP, None)}
              for _ in params["blocks"]]
    return {"embed": P(TP, None), "blocks": blocks, "norm": P(), "head": P(None, TP)}


# ----------------------------------------------------------------------------- vit
PATCH = 16


def _vit_grid(s: Size) -> int:
    return max(2, int(np.sqrt(s.seq_len // 2)))


def _ln(d):
    return {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))}


def _vit_init(key, s: Size):
    d, h, hd, f, n = s.d_model, s.heads, s.d_model // s.heads, 4 * s.d_model, _vit_grid(s) ** 2
    keys = iter(jax.random.split(key, 4 + 6 * s.layers))
    blocks = [{"ln1": _ln(d), "wqkv": _w(next(keys), (d, 3, h, hd), d),
               "wo": _w(next(keys), (h, hd, d), d), "bo": jnp.zeros((d,)), "ln2": _ln(d),
               "fc1": {"kernel": _w(next(keys), (d, f), d), "bias": jnp.zeros((f,))},
               "fc2": {"kernel": _w(next(keys), (f, d), f), "bias": jnp.zeros((d,))}} for _ in range(s.layers)]
    return {"patch": {"kernel": _w(next(keys), (PATCH, PATCH, 3, d), PATCH * PATCH * 3), "bias": jnp.zeros((d,))},
            "cls": jnp.zeros((1, 1, d)), "pos": _w(next(keys), (n + 1, d), 1.0) * 0.02, "blocks": blocks,
            "ln_f": _ln(d), "head": {"kernel": _w(next(keys), (d, s.vocab), d), "bias": jnp.zeros((s.vocab,))}}


def _vit_loss(params, batch):
    x = jax.lax.conv_general_dilated(batch["images"], params["patch"]["kernel"], (PATCH, PATCH), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["patch"]["bias"]
    b = x.shape[0]
    x = x.reshape(b, -1, x.shape[-1])
    x = jnp.concatenate([jnp.broadcast_to(params["cls"], (b, 1, x.shape[-1])), x], axis=1) + params["pos"]
    for blk in params["blocks"]:
        # No q/k/v bias: a key bias has a zero gradient (softmax ignores it), which AdamW turns into
        # noise-sized updates that no two summation orders agree on.
        qkv = jnp.einsum("btd,dchk->cbthk", _layer_norm(blk["ln1"], x), blk["wqkv"])
        ctx = _attend(qkv[0], qkv[1], qkv[2], causal=False)
        x = x + jnp.einsum("bthk,hkd->btd", ctx, blk["wo"]) + blk["bo"]
        y = jax.nn.gelu(_layer_norm(blk["ln2"], x) @ blk["fc1"]["kernel"] + blk["fc1"]["bias"])
        x = x + y @ blk["fc2"]["kernel"] + blk["fc2"]["bias"]
    logits = _layer_norm(params["ln_f"], x[:, 0]) @ params["head"]["kernel"] + params["head"]["bias"]
    return _cross_entropy(logits, batch["labels"])


def _vit_batch(key, s: Size, batch):
    side = _vit_grid(s) * PATCH
    ki, kl = jax.random.split(key)
    labels = jax.random.randint(kl, (batch,), 0, s.vocab)
    images = jax.random.normal(ki, (batch, side, side, 3)) + (labels % 7)[:, None, None, None] * 0.1
    return {"images": images, "labels": labels.astype(jnp.int32)}


def _vit_specs(params, tp):
    blocks = [{"ln1": P(), "wqkv": P(None, None, TP, None), "wo": P(TP, None, None),
               "bo": P(), "ln2": P(), "fc1": {"kernel": P(None, TP), "bias": P(TP)},
               "fc2": {"kernel": P(TP, None), "bias": P()}} for _ in params["blocks"]]
    return {"patch": P(), "cls": P(), "pos": P(), "blocks": blocks, "ln_f": P(),
            "head": {"kernel": P(None, TP), "bias": P(TP)}}


# ----------------------------------------------------------------------------- t5
def _t5_attention(key, d, h):
    k = jax.random.split(key, 4)
    hd = d // h
    return {"wq": _w(k[0], (d, h, hd), d), "wk": _w(k[1], (d, h, hd), d), "wv": _w(k[2], (d, h, hd), d),
            "wo": _w(k[3], (h, hd, d), d)}


def _t5_init(key, s: Size):
    d, h, f = s.d_model, s.heads, 4 * s.d_model
    keys = iter(jax.random.split(key, 1 + 8 * s.layers))
    mlp = lambda: {"wi": _w(next(keys), (d, f), d), "wo": _w(next(keys), (f, d), f)}
    enc = [{"norm1": jnp.ones((d,)), "attn": _t5_attention(next(keys), d, h), "norm2": jnp.ones((d,)), "mlp": mlp()}
           for _ in range(s.layers)]
    dec = [{"norm1": jnp.ones((d,)), "self": _t5_attention(next(keys), d, h), "norm2": jnp.ones((d,)),
            "cross": _t5_attention(next(keys), d, h), "norm3": jnp.ones((d,)), "mlp": mlp()} for _ in range(s.layers)]
    return {"embed": _w(next(keys), (s.vocab, d), 1.0), "encoder": enc, "enc_norm": jnp.ones((d,)),
            "decoder": dec, "dec_norm": jnp.ones((d,))}


def _t5_mha(p, x, ctx, causal):
    q = jnp.einsum("btd,dhk->bthk", x, p["wq"])
    k = jnp.einsum("btd,dhk->bthk", ctx, p["wk"])
    v = jnp.einsum("btd,dhk->bthk", ctx, p["wv"])
    return jnp.einsum("bthk,hkd->btd", _attend(q, k, v, causal), p["wo"])


def _t5_loss(params, batch):
    mlp = lambda p, x: jax.nn.relu(x @ p["wi"]) @ p["wo"]
    x = params["embed"][batch["inputs"]]
    for blk in params["encoder"]:
        y = _rms_norm(blk["norm1"], x)
        x = x + _t5_mha(blk["attn"], y, y, causal=False)
        x = x + mlp(blk["mlp"], _rms_norm(blk["norm2"], x))
    enc = _rms_norm(params["enc_norm"], x)
    x = params["embed"][batch["decoder_inputs"]]
    for blk in params["decoder"]:
        y = _rms_norm(blk["norm1"], x)
        x = x + _t5_mha(blk["self"], y, y, causal=True)
        x = x + _t5_mha(blk["cross"], _rms_norm(blk["norm2"], x), enc, causal=False)
        x = x + mlp(blk["mlp"], _rms_norm(blk["norm3"], x))
    x = _rms_norm(params["dec_norm"], x) * (x.shape[-1] ** -0.5)
    return _cross_entropy(x @ params["embed"].T, batch["targets"])


def _t5_batch(key, s: Size, batch):
    ke, kd = jax.random.split(key)
    inputs, _ = _token_batch(ke, s.vocab, batch, s.seq_len)
    dec, targets = _token_batch(kd, s.vocab, batch, s.seq_len // 2)
    return {"inputs": inputs, "decoder_inputs": dec, "targets": targets}


def _t5_specs(params, tp):
    attn = lambda: {"wq": P(None, TP, None), "wk": P(None, TP, None), "wv": P(None, TP, None), "wo": P(TP, None, None)}
    mlp = lambda: {"wi": P(None, TP), "wo": P(TP, None)}
    enc = [{"norm1": P(), "attn": attn(), "norm2": P(), "mlp": mlp()} for _ in params["encoder"]]
    dec = [{"norm1": P(), "self": attn(), "norm2": P(), "cross": attn(), "norm3": P(), "mlp": mlp()}
           for _ in params["decoder"]]
    return {"embed": P(TP, None), "encoder": enc, "enc_norm": P(), "decoder": dec, "dec_norm": P()}


# ----------------------------------------------------------------------------- common
_MODELS = {"llama": (_llama_init, _llama_loss, _llama_batch, _llama_specs),
           "vit": (_vit_init, _vit_loss, _vit_batch, _vit_specs),
           "t5": (_t5_init, _t5_loss, _t5_batch, _t5_specs)}


def _model(name):
    if name not in _MODELS:
        raise ValueError(f"unknown user model {name!r}; known: {', '.join(USER_MODELS)}")
    return _MODELS[name]


def make(name: str, size: Size, optimizer=None):
    """(train_step, init_state(key), synthetic_batch(key, batch_size)) of a user model."""
    init, loss, batch_of, _ = _model(name)
    optimizer = optimizer or optax.adamw(1e-3, weight_decay=0.01)

    def train_step(state, batch):
        loss_value, grads = jax.value_and_grad(loss)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss_value

    def init_state(key):
        params = init(key, size)
        return {"params": params, "opt_state": optimizer.init(params)}

    return train_step, init_state, lambda key, batch: batch_of(key, size, batch)


def megatron_specs(name: str, params, tp: int) -> dict:
    """Megatron-style PartitionSpecs of a user model's parameters, tensor parallel over axis "y" of size tp."""
    return _model(name)[3](params, tp)

"""Random JAX training steps for fuzzing the planner: compositions of elementwise, broadcast,
reshape, transpose, dot/einsum, reduce, gather, scatter, concatenate, slice, scan and cond ops
on random shapes, followed by an SGD update. `program(seed)` is deterministic in its seed."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

BATCH = 8
WIDTHS = (4, 6, 8, 12, 16)
OPS = ("elementwise", "broadcast", "reshape", "transpose", "dot", "einsum", "reduce", "gather",
       "scatter", "concatenate", "slice", "scan", "cond")


@dataclass
class Program:
    seed: int
    ops: list[str]                       # the op kinds in order (what the program exercises)
    step: Callable                       # step(state, batch) -> (state, loss)
    state: Any
    batch: Any
    params: dict = field(default_factory=dict)


def program(seed: int, length: int = 6) -> Program:
    rng = random.Random(seed)
    values = np.random.default_rng(seed)        # numpy: building a program dispatches nothing
    params, layers = {}, []
    shape = (BATCH, rng.choice(WIDTHS))        # the running activation: batch first, rank 2 or 3
    in_width = shape[1]

    def new_param(name, shp, scale=None):
        scale = scale if scale is not None else 1 / np.sqrt(shp[0])
        params[name] = (values.standard_normal(shp) * scale).astype(np.float32)
        return name

    for i in range(length):
        kind = rng.choice(OPS)
        feat = shape[-1]
        if kind == "elementwise":
            fn = rng.choice(["tanh", "sin", "square", "gelu", "mul", "bias"])
            p = new_param(f"b{i}", (feat,), 0.1) if fn == "bias" else None
            layers.append((kind, fn, p))
        elif kind == "broadcast":
            p = new_param(f"g{i}", shape[1:], 0.5)
            layers.append((kind, p, None))
        elif kind == "reshape":
            if len(shape) == 2 and feat % 2 == 0:
                shape = (BATCH, 2, feat // 2)
                layers.append((kind, shape, None))
            elif len(shape) == 3:
                shape = (BATCH, shape[1] * shape[2])
                layers.append((kind, shape, None))
        elif kind == "transpose" and len(shape) == 3:
            shape = (BATCH, shape[2], shape[1])
            layers.append((kind, None, None))
        elif kind == "dot":
            out = rng.choice(WIDTHS)
            p = new_param(f"w{i}", (feat, out))
            shape = shape[:-1] + (out,)
            layers.append((kind, p, None))
        elif kind == "einsum" and len(shape) == 3:
            out = rng.choice(WIDTHS)
            p = new_param(f"e{i}", (shape[1], shape[2], out), 1 / np.sqrt(shape[1] * shape[2]))
            shape = (BATCH, out)
            layers.append((kind, p, None))
        elif kind == "reduce":
            fn = rng.choice(["sum", "mean", "max"])
            layers.append((kind, fn, None))                 # keepdims over the last axis, then broadcast back
        elif kind == "gather":
            idx = np.array([rng.randrange(feat) for _ in range(feat)], dtype=np.int32)
            layers.append((kind, idx, None))
        elif kind == "scatter":
            idx = np.array([rng.randrange(feat) for _ in range(max(1, feat // 2))], dtype=np.int32)
            layers.append((kind, idx, None))
        elif kind == "concatenate":
            shape = shape[:-1] + (2 * feat,)
            layers.append((kind, None, None))
        elif kind == "slice" and feat >= 4:
            shape = shape[:-1] + (feat // 2,)
            layers.append((kind, None, None))
        elif kind == "scan" and len(shape) == 2:
            p = new_param(f"s{i}", (3, feat, feat), 0.5 / np.sqrt(feat))
            layers.append((kind, p, None))
        elif kind == "cond":
            p = new_param(f"c{i}", (feat, feat))
            layers.append((kind, p, None))

    def apply(prm, x):
        h = x
        for kind, a, b in layers:
            if kind == "elementwise":
                h = {"tanh": jnp.tanh, "sin": jnp.sin, "square": lambda v: jnp.square(v) * 0.5,
                     "gelu": jax.nn.gelu, "mul": lambda v: v * jnp.tanh(v),
                     "bias": lambda v: v + prm[b]}[a](h)
            elif kind == "broadcast":
                h = h * prm[a][None]
            elif kind == "reshape":
                h = h.reshape(a)
            elif kind == "transpose":
                h = jnp.swapaxes(h, 1, 2)
            elif kind == "dot":
                h = h @ prm[a]
            elif kind == "einsum":
                h = jnp.einsum("bij,ijk->bk", h, prm[a])
            elif kind == "reduce":
                r = {"sum": jnp.sum, "mean": jnp.mean, "max": jnp.max}[a](h, axis=-1, keepdims=True)
                h = h - r * 0.5
            elif kind == "gather":
                h = jnp.take(h, jnp.asarray(a), axis=-1)
            elif kind == "scatter":
                h = h.at[..., jnp.asarray(a)].add(jnp.tanh(h[..., : len(a)]))
            elif kind == "concatenate":
                h = jnp.concatenate([h, jnp.sin(h)], axis=-1)
            elif kind == "slice":
                h = h[..., : h.shape[-1] // 2]
            elif kind == "scan":
                h = jax.lax.scan(lambda c, w: (jnp.tanh(c @ w), None), h, prm[a])[0]
            elif kind == "cond":
                h = jax.lax.cond(jnp.sum(h) > 0, lambda v: v @ prm[a], lambda v: jnp.tanh(v), h)
        return h

    def loss_fn(prm, batch):
        out = apply(prm, batch["x"])
        return jnp.mean(jnp.square(out)) + 0.01 * jnp.mean(out)

    def step(state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
        new = jax.tree.map(lambda p, g: p - 0.05 * g, state["params"], grads)
        return {"params": new}, loss

    x = jnp.asarray(values.standard_normal((BATCH, in_width)).astype(np.float32))
    params = {k: jnp.asarray(v) for k, v in params.items()}
    return Program(seed, [k for k, _, _ in layers], step, {"params": params}, {"x": x}, params)

"""User-facing markers: `grad` / `value_and_grad` (gradient boundary) and `mark_pipeline_boundary`.

`value_and_grad` is also where gradient accumulation happens: while the spine traces a step
for `ShardParallel(num_micro_batches=k)`, it splits the batch into k micro-batches and, inside
each, into one slice per data-parallel replica (a vmapped leading axis). Per-replica gradients
accumulate locally over the micro-batch loop and are summed over replicas once at the end, so
the partitioner reduces gradients across devices once per step, not once per micro-batch.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

from meshweave.plugin.markers import mark, mark_boundary

_ACCUMULATION = threading.local()
_PIPELINE = threading.local()


class AccumulationError(ValueError):
    """Gradient accumulation cannot split this step's batch; the message says why."""


@contextlib.contextmanager
def accumulate_gradients(num_micro_batches: int, replicas: int, batch_size: int):
    """While tracing: value_and_grad splits batch_size-leading arrays into micro-batches."""
    _ACCUMULATION.config = {"k": num_micro_batches, "replicas": replicas, "batch": batch_size, "used": 0}
    try:
        yield _ACCUMULATION.config
    finally:
        _ACCUMULATION.config = None


def _config():
    return getattr(_ACCUMULATION, "config", None)


def grad(fun, argnums=0, has_aux: bool = False, **kwargs):
    """Like `jax.grad`, and marks the gradients so passes know where the backward pass ends."""
    vg = value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        value, g = vg(*args, **kw)
        return (g, value[1]) if has_aux else g

    return wrapped


def value_and_grad(fun, argnums=0, has_aux: bool = False, **kwargs):
    """Like `jax.value_and_grad`, with the gradients marked (see `grad`).

    Under gradient accumulation the loss must be a mean over the batch (the result is the mean
    of the micro-batch losses, which equals the full-batch mean for equal micro-batches).
    """
    vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        if _pipeline_config() is not None:
            return _pipelined(fun, argnums, has_aux, kwargs, args, kw)
        cfg = _config()
        if cfg is None or cfg["k"] * cfg["replicas"] == 1:
            value, g = vg(*args, **kw)
        else:
            value, g = _accumulated(vg, cfg, argnums, args, kw)
        return value, mark(g, "grad", "grad")

    return wrapped


def _accumulated(vg, cfg, argnums, args, kw):
    k, r, b = cfg["k"], cfg["replicas"], cfg["batch"]
    diff = {argnums} if isinstance(argnums, int) else set(argnums)
    # Batch-carrying arguments: not differentiated, every array leaf leading with the batch size.
    is_batch = [i not in diff and jax.tree.leaves(a) and
                all(getattr(x, "ndim", 0) >= 1 and x.shape[0] == b for x in jax.tree.leaves(a))
                for i, a in enumerate(args)]
    if not any(is_batch):
        raise AccumulationError(
            f"num_micro_batches: no argument of the differentiated function carries the batch "
            f"(size {b} on dimension 0); pass the batch to the loss function as an argument")
    if b % (k * r):
        raise AccumulationError(f"num_micro_batches={k}: batch size {b} is not divisible by "
                                f"{k} micro-batches x {r} data-parallel replicas")
    cfg["used"] += 1

    def split(x):   # (b, ...) -> (k, r, b / (k r), ...)
        return x.reshape((k, r, b // (k * r)) + x.shape[1:])

    batch_parts = [jax.tree.map(split, a) if is_batch[i] else None for i, a in enumerate(args)]

    def one(micro):   # value and grads of one micro-batch, per replica (leading axis r)
        def per_replica(*slices):
            full = [s if is_batch[i] else args[i] for i, s in enumerate(slices)]
            return vg(*full, **kw)

        in_axes = tuple(0 if is_batch[i] else None for i in range(len(args)))
        return jax.vmap(per_replica, in_axes=in_axes)(*[micro[i] if is_batch[i] else None
                                                        for i in range(len(args))])

    def body(acc, i):
        micro = [jax.tree.map(lambda x: x[i], p) if p is not None else None for p in batch_parts]
        v, g = one(micro)
        return jax.tree.map(jnp.add, acc, (v, g)), None

    shapes = jax.eval_shape(one, [jax.tree.map(lambda x: x[0], p) if p is not None else None
                                  for p in batch_parts])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # Unrolled: the planner sees (and shards) every micro-batch's ops; a rolled loop would hide them.
    (v, g), _ = jax.lax.scan(body, zeros, jnp.arange(k), unroll=True)
    n = k * r
    return jax.tree.map(lambda x: x.sum(0) / n, v), jax.tree.map(lambda x: x.sum(0) / n, g)


def mark_pipeline_boundary(tree, name: str | None = None):
    """Mark a layer boundary on `tree` (identity); its backward gets a matching marker.

    Under PipeshardParallel with AutoLayerOption the automatic cut replaces hand-placed ones."""
    cfg = _pipeline_config()
    if cfg is not None and type(cfg["layer_option"]).__name__ == "AutoLayerOption":
        return tree
    return mark_boundary(tree, name)


# ----------------------------------------------------------------------------- pipelining
@contextlib.contextmanager
def pipeline_tracing(layer_option=None):
    """While tracing a PipeshardParallel step: value_and_grad marks the end of the forward pass
    (a "loss" marker, whose backward twin starts the backward pass), marks the loss and the
    gradients with the "grad" marker (the compute-grad / apply-grad boundary), and, for
    AutoLayerOption, cuts the loss function into layers with boundary markers."""
    _PIPELINE.config = {"layer_option": layer_option, "used": 0, "clustering": None}
    try:
        yield _PIPELINE.config
    finally:
        _PIPELINE.config = None


def _pipeline_config():
    return getattr(_PIPELINE, "config", None)


def _pipelined(fun, argnums, has_aux, vg_kwargs, args, kw):
    cfg = _pipeline_config()
    cfg["used"] += 1
    if cfg["used"] > 1:
        raise AccumulationError("PipeshardParallel: the step calls meshweave.grad/value_and_grad more than once; "
                                "a pipelined step has one gradient computation")
    body = fun
    option = cfg["layer_option"]
    if option is not None and type(option).__name__ == "AutoLayerOption":
        from meshweave.plugin.auto_layers import auto_layered

        body, cfg["clustering"] = auto_layered(fun, args, kw, option.layer_num, option.eps)

    def loss_marked(*a, **k):
        out = body(*a, **k)
        if has_aux:
            loss, aux = out
            return mark_boundary(loss, "loss", kind="loss"), aux
        return mark_boundary(out, "loss", kind="loss")

    value, g = jax.value_and_grad(loss_marked, argnums=argnums, has_aux=has_aux, **vg_kwargs)(*args, **kw)
    return mark((value, g), "grad", "grad")

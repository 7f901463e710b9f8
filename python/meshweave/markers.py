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


AUX_REDUCTIONS = ("concat", "mean", "sum")


def grad(fun, argnums=0, has_aux: bool = False, aux_reduction: str = "concat", **kwargs):
    """Like `jax.grad`, and marks the gradients so passes know where the backward pass ends."""
    vg = value_and_grad(fun, argnums=argnums, has_aux=has_aux, aux_reduction=aux_reduction, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        value, g = vg(*args, **kw)
        return (g, value[1]) if has_aux else g

    return wrapped


def value_and_grad(fun, argnums=0, has_aux: bool = False, aux_reduction: str = "concat", **kwargs):
    """Like `jax.value_and_grad`, with the gradients marked (see `grad`).

    Under gradient accumulation (`num_micro_batches=k`) the batch is cut into k micro-batches,
    each split over the data-parallel replicas, and:
      * the loss must be a mean over the batch; the result is the mean of the slice losses
        (the full-batch mean for equal slices), and gradients are averaged the same way;
      * `has_aux` outputs follow `aux_reduction`: "concat" returns them per example,
        concatenated along the batch in the original order (each aux leaf must lead with the
        slice's batch size); "sum" adds them over slices in their own dtype (counts stay
        integers); "mean" averages them over slices (as jnp.mean: integers become floats);
        a pytree prefix of the aux output, e.g. `("concat", "sum")` for `(predictions, count)`,
        chooses per part;
      * typed random keys (`jax.random.key`) passed to `fun` are folded with the micro-batch
        and replica index, so every slice draws its own randomness. Results then follow the
        same distribution as `jax.jit` on the whole batch, not the same bits. Raw uint32 keys
        are refused (they cannot be told from data): use typed keys, or put one key per
        example in the batch.
    """
    if not all(isinstance(h, str) and h in AUX_REDUCTIONS for h in jax.tree.leaves(aux_reduction)):
        raise ValueError(f"aux_reduction={aux_reduction!r}: expected one of {', '.join(AUX_REDUCTIONS)}, or a "
                         f"pytree prefix of the aux output holding them (e.g. ('concat', 'sum'))")
    vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        if _pipeline_config() is not None:
            return _pipelined(fun, argnums, has_aux, kwargs, args, kw)
        cfg = _config()
        if cfg is None or cfg["k"] * cfg["replicas"] == 1:
            value, g = vg(*args, **kw)
        else:
            value, g = _accumulated(vg, cfg, argnums, has_aux, aux_reduction, args, kw)
        return value, mark(g, "grad", "grad")

    return wrapped


def _is_typed_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _is_raw_key(x) -> bool:
    return getattr(x, "dtype", None) == jnp.uint32 and getattr(x, "shape", ())[-1:] == (2,)


def _accumulated(vg, cfg, argnums, has_aux, aux_reduction, args, kw):
    k, r, b = cfg["k"], cfg["replicas"], cfg["batch"]
    diff = {argnums} if isinstance(argnums, int) else set(argnums)
    # Batch-carrying arguments: not differentiated, every array leaf leading with the batch size.
    is_batch = [i not in diff and bool(jax.tree.leaves(a)) and
                all(getattr(x, "ndim", 0) >= 1 and x.shape[0] == b for x in jax.tree.leaves(a))
                for i, a in enumerate(args)]
    if not any(is_batch):
        raise AccumulationError(
            f"num_micro_batches: no argument of the differentiated function carries the batch "
            f"(size {b} on dimension 0); pass the batch to the loss function as an argument")
    if b % (k * r):
        raise AccumulationError(f"num_micro_batches={k}: batch size {b} is not divisible by "
                                f"{k} micro-batches x {r} data-parallel replicas")
    for i, a in enumerate(args):
        if not is_batch[i] and any(_is_raw_key(x) for x in jax.tree.leaves(a)):
            raise AccumulationError(
                f"num_micro_batches={k}: argument {i} of the loss holds a raw uint32 random key; under gradient "
                f"accumulation every micro-batch must draw its own randomness. Pass a typed key "
                f"(jax.random.key(seed), which meshweave folds with the micro-batch and replica index), or "
                f"pass one key per example inside the batch")
    cfg["used"] += 1
    m = b // (k * r)

    def split(x):   # (b, ...) -> (k, r, b / (k r), ...)
        return x.reshape((k, r, m) + x.shape[1:])

    batch_parts = [jax.tree.map(split, a) if is_batch[i] else None for i, a in enumerate(args)]

    def one(micro, index):   # value and grads of one micro-batch, per replica (leading axis r)
        def per_replica(replica, *slices):
            def fold(x):
                return jax.random.fold_in(jax.random.fold_in(x, index), replica) if _is_typed_key(x) else x

            full = [s if is_batch[i] else jax.tree.map(fold, args[i]) for i, s in enumerate(slices)]
            return vg(*full, **kw)

        in_axes = (0,) + tuple(0 if is_batch[i] else None for i in range(len(args)))
        return jax.vmap(per_replica, in_axes=in_axes)(jnp.arange(r), *[micro[i] if is_batch[i] else None
                                                                        for i in range(len(args))])

    def body(acc, i):
        micro = [jax.tree.map(lambda x: x[i], p) if p is not None else None for p in batch_parts]
        v, g = one(micro, i)
        loss, aux = (v if has_aux else (v, None))
        return jax.tree.map(jnp.add, acc, (loss, g)), aux

    first = [jax.tree.map(lambda x: x[0], p) if p is not None else None for p in batch_parts]
    v_shape, g_shape = jax.eval_shape(one, first, 0)
    loss_shape = v_shape[0] if has_aux else v_shape
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_shape, g_shape))
    # Unrolled: the planner sees (and shards) every micro-batch's ops; a rolled loop would hide them.
    (loss, g), aux = jax.lax.scan(body, zeros, jnp.arange(k), unroll=True)
    n = k * r
    loss, g = jax.tree.map(lambda x: x.sum(0) / n, loss), jax.tree.map(lambda x: x.sum(0) / n, g)
    if not has_aux:
        return loss, g
    return (loss, _reduce_aux(aux, aux_reduction, k, r, m)), g


def _reduce_aux(aux, how, k, r, m):
    """aux leaves are stacked (k, r, ...) over micro-batches and replicas; `how` is a string or a
    pytree prefix of `aux` holding strings."""
    if not isinstance(how, str):
        try:
            return jax.tree.map(lambda h, sub: _reduce_aux(sub, h, k, r, m), how, aux)
        except ValueError as e:
            raise AccumulationError(f"aux_reduction={how!r} does not match the structure of the aux output: {e}") \
                from None

    def reduce(path, x):
        if how == "sum":
            return x.sum((0, 1), dtype=x.dtype)
        if how == "mean":
            return x.mean((0, 1))
        if x.ndim < 3 or x.shape[2] != m:
            raise AccumulationError(
                f"has_aux output{jax.tree_util.keystr(path)} has shape {x.shape[2:]} per slice, which does not lead "
                f"with the slice's batch size {m}, so it cannot be concatenated per example; declare how to combine "
                f"it: meshweave.value_and_grad(..., aux_reduction='sum' or 'mean')")
        return x.reshape((k * r * m,) + x.shape[3:])

    return jax.tree_util.tree_map_with_path(reduce, aux)


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

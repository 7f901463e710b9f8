"""Marker primitives: identity ops that survive tracing, autodiff and lowering, so passes can
see where gradients are produced (`grad`) or where a user cut pipeline layers (`boundary`).

They lower to `stablehlo.optimization_barrier` tagged with `mw.marker` frontend attributes
(see dialects/meshweave.py); `strip-markers` removes them before XLA compiles.
"""
from __future__ import annotations

import contextlib
import contextvars
import itertools

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import batching
from jax.interpreters import mlir as jax_mlir
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import stablehlo as hlo

from meshweave.dialects import meshweave as mw

marker_p = Primitive("meshweave_marker")
marker_p.multiple_results = True
marker_p.def_impl(lambda *xs, kind, name: xs)
marker_p.def_abstract_eval(lambda *avals, kind, name: avals)


def _lower(ctx, *xs, kind, name):
    op = hlo.OptimizationBarrierOp(xs)
    op.attributes[mw.FRONTEND_ATTRS] = ir.DictAttr.get(
        {k: ir.StringAttr.get(v) for k, v in mw.frontend_marker_attrs(kind, name).items()})
    return op.results


jax_mlir.register_lowering(marker_p, _lower)
batching.primitive_batchers[marker_p] = lambda args, dims, **kw: (marker_p.bind(*args, **kw), dims)

# Unnamed markers are numbered within one trace (meshweave's `trace` opens a scope), so two
# identical compiles print identical IR. Outside a scope (a plain `jax.jit` of the same step, as
# a reference) no meshweave pass reads the names, and unnamed markers are all called `<kind>`.
_NAMES: contextvars.ContextVar = contextvars.ContextVar("meshweave_marker_names", default=None)


@contextlib.contextmanager
def marker_names():
    """Number unnamed markers from 0 while tracing one step."""
    token = _NAMES.set(itertools.count())
    try:
        yield
    finally:
        _NAMES.reset(token)


def _fresh_name(kind: str) -> str:
    counter = _NAMES.get()
    return kind if counter is None else f"{kind}{next(counter)}"


def _is_markable(x) -> bool:
    return isinstance(x, (jax.Array, jax.core.Tracer)) and jnp.issubdtype(x.dtype, jnp.inexact)


def mark(tree, kind: str, name: str | None = None):
    """Identity on a pytree; inexact array leaves pass through one marker op."""
    name = name or _fresh_name(kind)
    leaves, treedef = jax.tree.flatten(tree)
    idx = [i for i, x in enumerate(leaves) if _is_markable(x)]
    if not idx:
        return tree
    outs = marker_p.bind(*[leaves[i] for i in idx], kind=kind, name=name)
    for i, o in zip(idx, outs):
        leaves[i] = o
    return jax.tree.unflatten(treedef, leaves)


def mark_boundary(tree, name: str | None = None, kind: str = "boundary"):
    """Pipeline layer boundary on `tree`; its cotangents get a matching `.bwd` marker."""
    name = name or _fresh_name(kind)

    @jax.custom_vjp
    def f(t):
        return mark(t, kind, name)

    f.defvjp(lambda t: (f(t), None), lambda _, g: (mark(g, kind, name + ".bwd"),))
    return f(tree)

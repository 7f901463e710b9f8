"""User-facing markers: `grad` / `value_and_grad` (gradient boundary) and `mark_pipeline_boundary`."""
from __future__ import annotations

import functools

import jax

from meshweave.plugin.markers import mark, mark_boundary


def grad(fun, argnums=0, has_aux: bool = False, **kwargs):
    """Like `jax.grad`, and marks the gradients so passes know where the backward pass ends."""
    vg = value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        value, g = vg(*args, **kw)
        return (g, value[1]) if has_aux else g

    return wrapped


def value_and_grad(fun, argnums=0, has_aux: bool = False, **kwargs):
    """Like `jax.value_and_grad`, with the gradients marked (see `grad`)."""
    vg = jax.value_and_grad(fun, argnums=argnums, has_aux=has_aux, **kwargs)

    @functools.wraps(fun)
    def wrapped(*args, **kw):
        value, g = vg(*args, **kw)
        return value, mark(g, "grad", "grad")

    return wrapped


def mark_pipeline_boundary(tree, name: str | None = None):
    """Mark a layer boundary on `tree` (identity); its backward gets a matching marker."""
    return mark_boundary(tree, name)

"""AutoLayerOption at trace time: cut a loss function's jaxpr into layers with boundary markers.

The cut is chosen on the forward jaxpr (passes/layer_dp.py: balanced FLOPs, few bytes crossing
each boundary) and realized by re-evaluating the jaxpr with `mark_boundary` on every
intermediate value live across a cut. Doing it before differentiation (as Alpa does inside
`alpa.grad`) lets autodiff place the matching `.bwd` markers in the backward pass, which the
`layer-clustering` pass then reads like hand-placed markers.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.extend import core as jcore

from meshweave.plugin.markers import mark_boundary


def _nbytes(aval) -> int:
    shape = getattr(aval, "shape", ())
    dtype = getattr(aval, "dtype", None)
    # Extended dtypes (typed PRNG keys, `key<fry>`) are no numpy dtypes but carry their itemsize.
    size = getattr(dtype, "itemsize", None) if dtype is not None else 4
    return int(math.prod(shape)) * (size if size is not None else np.dtype(dtype).itemsize)


def _sub_jaxprs(params):
    for v in params.values():
        for x in (v if isinstance(v, (tuple, list)) else (v,)):
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def eqn_flops(eqn) -> float:
    """FLOPs of the heavy ops (dot_general, convolution) in an equation, nested jaxprs included."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lc, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        contracted = math.prod(lhs.shape[d] for d in lc)
        return 2.0 * math.prod(eqn.outvars[0].aval.shape) * contracted
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        out = eqn.outvars[0].aval
        dn = eqn.params["dimension_numbers"]
        out_feature = rhs.shape[dn.rhs_spec[0]]
        return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / max(out_feature, 1)
    return sum(eqn_flops(e) for j in _sub_jaxprs(eqn.params) for e in j.eqns)


def layer_ops(jaxpr):
    """The jaxpr's equations as passes.layer_dp.LayerOp records (ids are the jaxpr's variables)."""
    from meshweave.passes.layer_dp import LayerOp

    ids: dict = {}

    def vid(v):
        return ids.setdefault(v, len(ids))

    ops = []
    for eqn in jaxpr.eqns:
        defs = tuple((vid(v), _nbytes(v.aval)) for v in eqn.outvars if not isinstance(v, jcore.DropVar))
        uses = tuple(vid(v) for v in eqn.invars if isinstance(v, jcore.Var) and v in ids)
        ops.append(LayerOp(flops=eqn_flops(eqn), defs=defs, uses=uses))
    return ops


def auto_layered(fun, args, kwargs, layer_num: int, eps: float):
    """(fun with boundary markers at the chosen cuts, the LayerClustering)."""
    from meshweave.passes.layer_dp import cluster_layers

    flat, tree = jax.tree.flatten((args, kwargs))

    def flat_fun(*xs):
        a, k = jax.tree.unflatten(tree, list(xs))
        return fun(*a, **k)

    closed = jax.make_jaxpr(flat_fun)(*flat)
    out_tree = jax.tree.structure(jax.eval_shape(flat_fun, *flat))
    jaxpr = closed.jaxpr
    clustering = cluster_layers(layer_ops(jaxpr), layer_num, eps=eps)
    cuts = sorted(set(c for c in clustering.cuts if 0 < c < len(jaxpr.eqns)))
    last_use: dict = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last_use[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last_use[v] = len(jaxpr.eqns)
    defined_at = {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}

    def layered(*a, **k):
        xs = jax.tree.leaves((a, k))
        env = dict(zip(jaxpr.invars, xs))
        env.update(zip(jaxpr.constvars, closed.consts))

        def read(v):
            return v.val if isinstance(v, jcore.Literal) else env[v]

        for i, eqn in enumerate(jaxpr.eqns):
            if i in cuts:
                live = [v for v, d in defined_at.items() if d < i and last_use.get(v, -1) >= i and v in env]
                if live:
                    marked = mark_boundary([env[v] for v in live], f"layer{cuts.index(i) + 1}")
                    env.update(zip(live, marked))
            params = eqn.primitive.get_bind_params(eqn.params)
            subfuns, params = params if isinstance(params, tuple) else ((), params)   # older jax: (subfuns, params)
            outs = eqn.primitive.bind(*subfuns, *[read(v) for v in eqn.invars], **params)
            if not eqn.primitive.multiple_results:
                outs = [outs]
            for v, o in zip(eqn.outvars, outs):
                if not isinstance(v, jcore.DropVar):
                    env[v] = o
        return jax.tree.unflatten(out_tree, [read(v) for v in jaxpr.outvars])

    return layered, clustering

"""Tracing and lowering a user step: `jax.jit(...).lower` on abstract values, the private module copy.

The module keeps one argument per flat input leaf (`keep_unused=True`), in the order of
`jax.tree.leaves((dynamic args, kwargs))` (plugin/arguments.py), and this module writes
meshweave's argument annotations (`mw.arg_path`, `mw.batch_dim`, `mw.donated`) so passes and
dumps can name them.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.plugin.arguments import ArgumentError, ArgumentSpec, BoundCall, abstract  # noqa: F401 (ArgumentError re-exported)
from meshweave.plugin.jax_adapter import lowered_module_text
from meshweave.plugin.markers import marker_names


@dataclass
class TracedStep:
    lowered: jax.stages.Lowered
    arg_paths: list[str]
    arg_avals: list
    batch_dims: list[int | None]
    donated: list[bool]
    result_paths: list[str]
    out_avals: list
    keeps_arg: list[int | None]      # per flat result: the flat argument it is the new value of

    def module(self) -> ir.Module:
        """A private, annotated copy of the lowered StableHLO (safe to mutate)."""
        m = parse_module(lowered_module_text(self.lowered))
        annotate(m, self)
        return m


def check_call(fun, args, kwargs, static_argnums, donate_argnums, batch_argnums):
    """(static, donate, batch, names): the call's argument numbers, checked (arguments.py)."""
    call = ArgumentSpec.create(fun, static_argnums=static_argnums, donate_argnums=donate_argnums,
                               batch_argnums=batch_argnums).bind(tuple(args), kwargs)
    call.check_traceable()
    return (tuple(i for i, _ in call.statics), tuple(sorted(call.donate)), tuple(sorted(call.batch)),
            [call.spec.arg_name(i) for i in range(len(args))])


def trace(fun, call, kwargs=None, *, static_argnums=(), donate_argnums=(), batch_argnums=(), mesh=None,
          batch_dim: int = 0) -> TracedStep:
    """Lower `fun` for the call's abstract values (shape, dtype, weak type; never its placement),
    so an argument placed anywhere traces the same. The lowered function takes the call's flat
    leaves; on `mesh` every input is replicated until the passes decide.

    `call` is a BoundCall, or positional arguments with `kwargs` and the argument numbers."""
    if not isinstance(call, BoundCall):
        call = ArgumentSpec.create(fun, static_argnums=static_argnums, donate_argnums=donate_argnums,
                                   batch_argnums=batch_argnums).bind(tuple(call), kwargs or {})
    call.check_traceable()
    roles = call.leaf_roles()
    jit_kwargs = dict(donate_argnums=tuple(i for i, r in enumerate(roles) if r[2]), keep_unused=True)
    if mesh is not None:
        jit_kwargs["in_shardings"] = NamedSharding(mesh, PartitionSpec())

    def flat_step(*leaves):   # a new function object per trace: jit's cache must not skip our trace-time hooks
        args, kwargs = call.rebuild(leaves)
        return fun(*args, **kwargs)

    # Name it after the step (dumps say jit_<name>), but no functools.wraps: jit would read the
    # step's own signature through __wrapped__ and reject donate_argnums over the flat leaves.
    flat_step.__name__ = flat_step.__qualname__ = getattr(fun, "__name__", "step")

    avals = [abstract(x) for x in call.leaves]
    try:
        with marker_names():
            lowered = jax.jit(flat_step, **jit_kwargs).lower(*avals)
    except TypeError as e:
        raise ArgumentError(f"jax could not trace {call.spec.fun_name}: {e}") from e
    arg_paths = [r[0] for r in roles]
    batch_dims = [batch_dim if (r[1] and len(a.shape) > batch_dim) else None for r, a in zip(roles, avals)]
    donated = [r[2] for r in roles]
    out_leaves = jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(lowered.out_tree, list(range(lowered.out_tree.num_leaves))))[0]
    result_paths = ["result" + jax.tree_util.keystr(p) for p, _ in out_leaves]
    out_avals = [o for o in jax.tree.leaves(lowered.out_info)]
    dyn_args = jax.tree.unflatten(call.treedef, call.leaves)[0]
    keeps = state_in_state_out(list(dyn_args), lowered.out_info)
    return TracedStep(lowered, arg_paths, avals, batch_dims, donated, result_paths, out_avals, keeps)


def _signature(tree):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(np.shape(x)), str(jax.numpy.result_type(x) if not hasattr(x, "dtype") else x.dtype))
                          for x in leaves)


def state_in_state_out(dyn_args, out_info) -> list[int | None]:
    """Match whole positional arguments to whole top-level results with the same structure, shapes
    and dtypes (`train_step(state, batch) -> (state, loss)`): those results are the arguments' new
    values, so the planner keeps their layout and the step can be called again without resharding."""
    n_out = len(jax.tree.leaves(out_info))
    keeps: list[int | None] = [None] * n_out
    parts = list(out_info) if isinstance(out_info, tuple) else [out_info]
    offsets, off = [], 0
    for p in parts:
        offsets.append(off)
        off += len(jax.tree.leaves(p))
    arg_offsets, off = [], 0
    for a in dyn_args:
        arg_offsets.append(off)
        off += len(jax.tree.leaves(a))
    taken = set()
    for j, a in enumerate(dyn_args):
        sig = _signature(a)
        if not sig[1]:
            continue
        for k, p in enumerate(parts):
            if k not in taken and _signature(p) == sig:
                taken.add(k)
                for leaf in range(len(sig[1])):
                    keeps[offsets[k] + leaf] = arg_offsets[j] + leaf
                break
    return keeps


def annotate(module: ir.Module, step: TracedStep) -> None:
    """Write mw.arg_path / mw.batch_dim / mw.donated / mw.result_path on @main."""
    main = mw.main_func(module)
    attrs = mw.arg_attr_dicts(main)
    if len(attrs) != len(step.arg_paths):
        raise RuntimeError(f"lowered module has {len(attrs)} arguments, expected {len(step.arg_paths)}")
    with module.context:
        for d, path, bd, don in zip(attrs, step.arg_paths, step.batch_dims, step.donated):
            d[mw.ARG_PATH] = mw.string_attr(path)
            if bd is not None:
                d[mw.BATCH_DIM] = mw.i64_attr(bd)
            if don:
                d[mw.DONATED] = ir.UnitAttr.get()
        mw.set_arg_attr_dicts(main, attrs)
        res = mw.result_attr_dicts(main)
        for d, path, keep in zip(res, step.result_paths, step.keeps_arg):
            d[mw.RESULT_PATH] = mw.string_attr(path)
            if keep is not None:
                d[mw.KEEPS_ARG] = mw.i64_attr(keep)
        mw.set_result_attr_dicts(main, res)

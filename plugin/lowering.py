"""Tracing and lowering a user step: argument checks, `jax.jit(...).lower`, the private module copy.

The module keeps one argument per flat input leaf (`keep_unused=True`), in the order of
`jax.tree.leaves((dynamic args, kwargs))`, and this module writes meshweave's argument
annotations (`mw.arg_path`, `mw.batch_dim`, `mw.donated`) so passes and dumps can name them.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.plugin.jax_adapter import lowered_module_text


class ArgumentError(ValueError):
    """A call's arguments cannot be traced or do not fit the method; the message names the fix."""


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


def param_names(fun, n: int) -> list[str]:
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(n):
        if i < len(params) and params[i].kind in (params[i].POSITIONAL_ONLY, params[i].POSITIONAL_OR_KEYWORD):
            names.append(params[i].name)
        else:
            names.append(f"args[{i}]")
    return names


def _is_traceable(x) -> bool:
    return (isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))
            or hasattr(x, "__jax_array__") or isinstance(x, jax.ShapeDtypeStruct))


def normalize_argnums(argnums, nargs: int, what: str, fun_name: str) -> tuple[int, ...]:
    if argnums is None:
        return ()
    if isinstance(argnums, int):
        argnums = (argnums,)
    try:
        argnums = tuple(int(a) for a in argnums)
    except TypeError:
        raise ArgumentError(f"{what} must be an int or a tuple of ints, got {argnums!r}") from None
    out = []
    for a in argnums:
        b = a + nargs if a < 0 else a
        if not 0 <= b < nargs:
            raise ArgumentError(
                f"{what}={argnums} names argument {a}, but {fun_name} was called with {nargs} positional "
                f"argument(s); fix {what} or pass the argument positionally")
        out.append(b)
    return tuple(sorted(set(out)))


def check_call(fun, args, kwargs, static_argnums, donate_argnums, batch_argnums):
    """Validate a call before jax sees it; returns the normalized argnums and parameter names."""
    fun_name = getattr(fun, "__name__", "the function")
    n = len(args)
    static = normalize_argnums(static_argnums, n, "static_argnums", fun_name)
    donate = normalize_argnums(donate_argnums, n, "donate_argnums", fun_name)
    batch = tuple(b for b in normalize_argnums(batch_argnums, max(n, 1), "batch_argnums", fun_name) if b < n) \
        if n else ()
    names = param_names(fun, n)
    both = set(static) & set(donate)
    if both:
        raise ArgumentError(f"argument {names[min(both)]} is in both static_argnums and donate_argnums; "
                            "a static argument has no buffer to donate")
    for i in static:
        try:
            hash(args[i])
        except TypeError:
            raise ArgumentError(
                f"static argument {names[i]} (static_argnums includes {i}) has unhashable type "
                f"{type(args[i]).__name__}; pass a hashable value (e.g. a tuple instead of a list), "
                f"or remove {i} from static_argnums if it is an array") from None
    for i, a in enumerate(args):
        if i in static:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            if not _is_traceable(leaf):
                where = names[i] + jax.tree_util.keystr(path)
                raise ArgumentError(
                    f"argument {where} has type {type(leaf).__name__}, which jax cannot trace; "
                    f"mark argument {i} static with static_argnums=({i},) or pass an array instead")
    for k, v in kwargs.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]:
            if not _is_traceable(leaf):
                raise ArgumentError(f"keyword argument {k}{jax.tree_util.keystr(path)} has type "
                                    f"{type(leaf).__name__}, which jax cannot trace; pass it positionally "
                                    "and mark it static with static_argnums, or pass an array")
    return static, donate, batch, names


def trace(fun, args, kwargs, *, static_argnums=(), donate_argnums=(), batch_argnums=(), mesh=None,
          batch_dim: int = 0) -> TracedStep:
    """Lower `fun(*args, **kwargs)` on `mesh` (inputs replicated; passes decide the shardings)."""
    static, donate, batch, names = check_call(fun, args, kwargs, static_argnums, donate_argnums, batch_argnums)
    jit_kwargs = dict(static_argnums=static, donate_argnums=donate, keep_unused=True)
    if mesh is not None:
        jit_kwargs["in_shardings"] = NamedSharding(mesh, PartitionSpec())
    @functools.wraps(fun)
    def fresh(*a, **k):   # a new function object: jit's trace cache must not skip our trace-time hooks
        return fun(*a, **k)

    try:
        lowered = jax.jit(fresh, **jit_kwargs).lower(*args, **kwargs)
    except TypeError as e:
        raise ArgumentError(f"jax could not trace {getattr(fun, '__name__', 'the function')}: {e}") from e
    arg_paths, arg_avals, batch_dims, donated = [], [], [], []
    for i, a in enumerate(args):
        if i in static:
            continue
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            aval = jax.typeof(leaf) if not isinstance(leaf, jax.ShapeDtypeStruct) else leaf
            arg_paths.append(names[i] + jax.tree_util.keystr(path))
            arg_avals.append(aval)
            nd = len(aval.shape)
            batch_dims.append(batch_dim if (i in batch and nd > batch_dim) else None)
            donated.append(i in donate)
    for k, v in sorted(kwargs.items()):
        for path, leaf in jax.tree_util.tree_flatten_with_path(v)[0]:
            arg_paths.append(k + jax.tree_util.keystr(path))
            arg_avals.append(jax.typeof(leaf))
            batch_dims.append(None)
            donated.append(False)
    out_leaves = jax.tree_util.tree_flatten_with_path(
        jax.tree.unflatten(lowered.out_tree, list(range(lowered.out_tree.num_leaves))))[0]
    result_paths = ["result" + jax.tree_util.keystr(p) for p, _ in out_leaves]
    out_avals = [o for o in jax.tree.leaves(lowered.out_info)]
    dyn_args = [a for i, a in enumerate(args) if i not in static]
    keeps = state_in_state_out(dyn_args, lowered.out_info)
    return TracedStep(lowered, arg_paths, arg_avals, batch_dims, donated, result_paths, out_avals, keeps)


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

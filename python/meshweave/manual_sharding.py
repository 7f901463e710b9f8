"""Hand-written shardings (`ManualShardingOption`) resolved against one call and written on @main.

The option's PartitionSpec pytrees are prefixes of the step's arguments (and results), as jax's
in_shardings are: a PartitionSpec (or None) at a node applies to every leaf below it. Each
resolved leaf becomes `mw.pinned_sharding` on @main's argument or result; the auto-sharding pass
keeps exactly that layout for it and chooses the rest. Every spec is checked here against the
leaf it lands on (rank, mesh axes, divisibility), and every spec must land on some leaf, so a
typo in a pytree key is an error, not a silently unpinned parameter.
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec
from jax.tree_util import DictKey, GetAttrKey, SequenceKey, keystr

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import MeshSpec, TensorSharding
from meshweave.methods import ManualShardingOption, MethodError


class ManualShardingError(MethodError):
    """A hand-written sharding does not fit its argument or the mesh; the message names both."""


def _is_spec_leaf(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _child(node, key):
    if isinstance(key, SequenceKey):
        return node[key.idx]
    if isinstance(key, DictKey):
        return node[key.key]
    if isinstance(key, GetAttrKey):
        return getattr(node, key.name)
    raise TypeError(f"pytree key {key!r} of an unsupported kind")


def _spec_for(tree, keypath, where: str, used: set):
    """The PartitionSpec (or None) that applies at `keypath` of the spec pytree `tree`."""
    node, walked = tree, []
    for key in keypath:
        if _is_spec_leaf(node):
            break
        try:
            node = _child(node, key)
        except (KeyError, IndexError, AttributeError, TypeError):
            raise ManualShardingError(
                f"{where}{keystr(tuple(walked))} has no entry {keystr((key,))} for the argument leaf "
                f"{where}{keystr(tuple(keypath))}; make the spec pytree a prefix of the argument's structure "
                f"(use None for leaves the planner should choose)") from None
        walked.append(key)
    if not _is_spec_leaf(node):
        raise ManualShardingError(f"{where}{keystr(tuple(walked))} is a {type(node).__name__}, but the argument is a "
                                  f"single array there; give a PartitionSpec or None")
    used.add(tuple(walked))
    return node


def broadcast_specs(spec_tree, target) -> list:
    """The PartitionSpec (or None) of every leaf of `target` under the prefix pytree `spec_tree`."""
    used: set = set()
    return [_spec_for(spec_tree, path, "spec", used) for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]]


def to_tensor_sharding(spec: PartitionSpec, shape, mesh: MeshSpec, what: str) -> TensorSharding:
    """A PartitionSpec for an array of `shape`, checked against the mesh: wrong rank, unknown or
    repeated axes and dimensions the axes do not divide are errors naming `what`."""
    entries = list(spec)
    if len(entries) > len(shape):
        raise ManualShardingError(f"{what}: PartitionSpec {spec} has {len(entries)} entries but the array has rank "
                                  f"{len(shape)} (shape {tuple(shape)}); give at most one entry per dimension")
    dims, seen = [], set()
    for d, entry in enumerate(entries + [None] * (len(shape) - len(entries))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for a in axes:
            if not isinstance(a, str) or a not in mesh.axis_names:
                raise ManualShardingError(f"{what}: PartitionSpec {spec} names mesh axis {a!r}, but the mesh {mesh} "
                                          f"has axes {mesh.axis_names}; use those names (ShardParallel(axis_names=...) "
                                          f"renames them)")
            if a in seen:
                raise ManualShardingError(f"{what}: PartitionSpec {spec} uses mesh axis {a!r} twice; an axis can "
                                          "split one dimension only")
            seen.add(a)
        n = mesh.axes_size(axes)
        if shape[d] % n:
            raise ManualShardingError(f"{what}: dimension {d} of shape {tuple(shape)} is {shape[d]}, not divisible "
                                      f"by {n} (mesh axes {', '.join(axes)} of PartitionSpec {spec}); pick axes whose "
                                      f"size divides it, or None")
        dims.append(axes)
    return TensorSharding(tuple(dims), mesh.name)


def _resolve(tree, where: str, name: str, leaves_with_paths, mesh: MeshSpec) -> list[TensorSharding | None]:
    """Per leaf of one argument (or of the results): its spec from the prefix pytree `tree`,
    checked; `where` names the spec in messages, `name` the argument."""
    if tree is None:
        return [None] * len(leaves_with_paths)
    used: set = set()
    out = []
    for keypath, leaf in leaves_with_paths:
        spec = _spec_for(tree, keypath, where, used)
        out.append(None if spec is None else
                   to_tensor_sharding(spec, getattr(leaf, "shape", ()), mesh, f"{name}{keystr(tuple(keypath))} "
                                      f"({where}{keystr(tuple(keypath))})"))
    for keypath, spec in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec_leaf)[0]:
        if spec is not None and tuple(keypath) not in used:
            raise ManualShardingError(f"{where}{keystr(tuple(keypath))} = {spec} matches no array of {name}; "
                                      "check the pytree keys against the step's arguments/results")
    return out


def resolve_inputs(option: ManualShardingOption, call, mesh: MeshSpec) -> list[TensorSharding | None]:
    """One TensorSharding (or None: the planner chooses) per flat leaf of `call`, in leaf order."""
    res = option.in_axis_resources
    if res is None:
        return [None] * len(call.leaves)
    nargs = len(call.args)
    by_name = isinstance(res, dict)
    if not by_name and (not isinstance(res, (tuple, list)) or len(res) != nargs):
        raise ManualShardingError(
            f"ManualShardingOption.in_axis_resources needs one entry per positional argument of "
            f"{call.spec.fun_name} ({nargs} in this call), or a dict by parameter name; got "
            f"{type(res).__name__}{f' of length {len(res)}' if isinstance(res, (tuple, list)) else ''}")
    dyn, kwargs = jax.tree.unflatten(call.treedef, call.leaves)
    names = [call.spec.arg_name(i) for i in range(nargs)]
    if by_name:
        unknown = sorted(set(res) - set(names) - set(kwargs))
        if unknown:
            raise ManualShardingError(f"in_axis_resources names {unknown}, which are not arguments of this call to "
                                      f"{call.spec.fun_name} (arguments: {', '.join(names + sorted(kwargs))})")
    for i, _ in call.statics:
        if (res.get(names[i]) if by_name else res[i]) is not None:
            raise ManualShardingError(f"in_axis_resources gives a sharding for {names[i]}, a static argument "
                                      f"(static_argnums includes {i}); use None there")
    out = []
    for j, arg in enumerate(dyn):
        i = call.positions[j]
        where = f"in_axis_resources[{names[i]!r}]" if by_name else f"in_axis_resources[{i}]"
        sub = res.get(names[i]) if by_name else res[i]
        out += _resolve(sub, where, names[i], jax.tree_util.tree_flatten_with_path(arg)[0], mesh)
    for k in sorted(kwargs):
        sub = res.get(k) if by_name else None
        out += _resolve(sub, f"in_axis_resources[{k!r}]", k, jax.tree_util.tree_flatten_with_path(kwargs[k])[0], mesh)
    return out


def resolve_outputs(option: ManualShardingOption, out_tree_leaves, mesh: MeshSpec) -> list[TensorSharding | None]:
    """One TensorSharding (or None) per flat result; `out_tree_leaves`: [(keypath, aval)]."""
    return _resolve(option.out_axis_resources, "out_axis_resources", "result", out_tree_leaves, mesh)


def pin(module, inputs, outputs) -> int:
    """Write `mw.pinned_sharding` on @main's arguments and results; returns how many were pinned."""
    main = mw.main_func(module)
    n = 0
    with module.context:
        for getter, setter, pins in ((mw.arg_attr_dicts, mw.set_arg_attr_dicts, inputs),
                                     (mw.result_attr_dicts, mw.set_result_attr_dicts, outputs)):
            dicts = getter(main)
            if len(dicts) != len(pins):
                raise RuntimeError(f"@main has {len(dicts)} entries, {len(pins)} shardings resolved")
            for d, ts in zip(dicts, pins):
                if ts is not None:
                    d[mw.PINNED_SHARDING] = ts.to_attr()
                    n += 1
            setter(main, dicts)
    return n

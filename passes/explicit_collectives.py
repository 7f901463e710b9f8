"""Rewrites that spell a planned collective out explicitly, where XLA's partitioner would not
pick it by itself: an op whose plan sums over mesh axes *and* scatters the sum (ZeRO's gradient
reduce-scatter) becomes an `sdy.manual_computation` holding the local op and a
`stablehlo.reduce_scatter`. Without it, XLA's CPU pipeline emits all-reduce + slice instead.
"""
from __future__ import annotations

import re

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy
from jaxlib.mlir.dialects import stablehlo as hlo
from jaxlib.mlir.passmanager import PassManager

from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec, TensorSharding
from meshweave.passes.cost_graph import tensor_bytes



def channel_ids(module: ir.Module):
    """New channel ids for `module`: numbered after the largest one it already uses, so the ids
    depend on the module alone (two identical compiles print identical IR)."""
    used = [int(h) for h in re.findall(r"channel_handle<handle = (\d+)", str(module.operation))]
    start = max(used, default=0) + 1
    while True:
        yield start
        start += 1


def replica_groups(mesh: MeshSpec, axes) -> np.ndarray:
    """Device-id groups that vary over `axes` (in mesh order), one group per other-axes index."""
    ids = np.arange(mesh.num_devices).reshape(mesh.shape)
    idx = [mesh.axis_names.index(a) for a in axes]
    rest = [i for i in range(len(mesh.shape)) if i not in idx]
    return np.ascontiguousarray(ids.transpose(rest + idx).reshape(-1, int(np.prod([mesh.shape[i] for i in idx]))))


def _local_type(t: ir.Type, sharding: TensorSharding, mesh: MeshSpec) -> ir.Type:
    rt = ir.RankedTensorType(t)
    shape = [d // n for d, n in zip(rt.shape, sharding.shards_per_dim(mesh))]
    return ir.RankedTensorType.get(shape, rt.element_type)


def _per_value(shardings) -> ir.Attribute:
    return ir.Attribute.parse("#sdy.sharding_per_value<[" + ", ".join(
        s.to_text()[len("#sdy.sharding"):] for s in shardings) + "]>")


def wrap_reduce_scatter(op, operand_shardings, partial: TensorSharding, result: TensorSharding,
                        reduced_axes, scatter_dim: int, mesh: MeshSpec, channel: int) -> ir.Value:
    """Replace single-result `op` by a manual computation: local op, then reduce-scatter over
    `reduced_axes` along `scatter_dim`. `partial` is the op's result layout before scattering."""
    manual = ir.Attribute.parse("#sdy<manual_axes{" + ", ".join(f'"{a}"' for a in mesh.axis_names) + "}>")
    with ir.InsertionPoint(op):
        mc = sdy.ManualComputationOp([op.result.type], list(op.operands), _per_value(operand_shardings),
                                     _per_value([result]), manual)
    block = mc.regions[0].blocks.append(*[_local_type(v.type, s, mesh) for v, s in zip(op.operands, operand_shardings)])
    with ir.InsertionPoint(block):
        # A clone keeps the op's regions (a reduce's body) and attributes; sdy/mw annotations go.
        local = op.operation.clone()
        for k, arg in enumerate(block.arguments):
            local.operands[k] = arg
        local.results[0].set_type(_local_type(op.result.type, partial, mesh))
        for name in [local.attributes[i].name for i in range(len(local.attributes))]:
            if name.startswith("sdy.") or name.startswith("mw."):
                del local.attributes[name]
        groups = replica_groups(mesh, reduced_axes)
        rs = hlo.ReduceScatterOp(
            _local_type(op.result.type, result, mesh), local.results[0], scatter_dim,
            ir.DenseElementsAttr.get(groups.astype(np.int64)),
            channel_handle=ir.Attribute.parse(f"#stablehlo.channel_handle<handle = {channel}, type = 1>"),
            use_global_device_ids=True)
        scalar = ir.RankedTensorType.get([], ir.RankedTensorType(op.result.type).element_type)
        body = rs.regions[0].blocks.append(scalar, scalar)
        with ir.InsertionPoint(body):
            hlo.ReturnOp([hlo.add(body.arguments[0], body.arguments[1])])
        sdy.ReturnOp([rs.result])
    op.result.replace_all_uses_with(mc.result)
    op.operation.erase()
    return mc.result


def wrap_local(op, operand_shardings, result_shardings, mesh: MeshSpec, attributes=None) -> None:
    """Replace `op` by a manual computation running it on each device's shards: for an op whose
    plan needs no collective (e.g. a scatter into unsplit rows of window-split operands), so that
    XLA's partitioner cannot add any. `attributes` override the local op's (a grouped
    convolution's group counts per device)."""
    manual = ir.Attribute.parse("#sdy<manual_axes{" + ", ".join(f'"{a}"' for a in mesh.axis_names) + "}>")
    with ir.InsertionPoint(op):
        mc = sdy.ManualComputationOp([r.type for r in op.results], list(op.operands), _per_value(operand_shardings),
                                     _per_value(result_shardings), manual)
    block = mc.regions[0].blocks.append(*[_local_type(v.type, s, mesh) for v, s in zip(op.operands, operand_shardings)])
    with ir.InsertionPoint(block):
        local = op.operation.clone()
        for k, arg in enumerate(block.arguments):
            local.operands[k] = arg
        for r, sh in zip(local.results, result_shardings):
            r.set_type(_local_type(r.type, sh, mesh))
        for name in [local.attributes[i].name for i in range(len(local.attributes))]:
            if name.startswith("sdy.") or name.startswith("mw."):
                del local.attributes[name]
        for name, attr in (attributes or {}).items():
            local.attributes[name] = attr
        sdy.ReturnOp(list(local.results))
    for old, new in zip(op.results, mc.results):
        old.replace_all_uses_with(new)
    op.operation.erase()


def all_to_all_dims(src: TensorSharding, dst: TensorSharding) -> tuple[int, int, tuple] | None:
    """(from dim, to dim, axes) when dst is src with trailing axes of one dim moved to the end of
    another -- the layouts one stablehlo.all_to_all connects; None otherwise."""
    diff = [d for d, (a, b) in enumerate(zip(src.dims, dst.dims)) if a != b]
    if len(diff) != 2:
        return None
    for i, j in (diff, diff[::-1]):
        s_i, s_j, d_i, d_j = src.dims[i], src.dims[j], dst.dims[i], dst.dims[j]
        moved = s_i[len(d_i):]
        if moved and s_i[:len(d_i)] == d_i and d_j == s_j + moved:
            return i, j, moved
    return None


def explicit_all_to_all(value: ir.Value, src: TensorSharding, dst: TensorSharding, mesh: MeshSpec,
                        channel: int) -> ir.Value | None:
    """`value` (laid out as src) resharded to dst by one explicit all-to-all in a manual
    computation, inserted at the current insertion point; None when one all-to-all cannot do it.
    XLA's partitioner, given only a sharding constraint, may instead gather the producer's
    operands and recompute; spelling the collective out makes it do what the plan priced."""
    dims = all_to_all_dims(src, dst)
    if dims is None:
        return None
    concat_dim, split_dim, axes = dims
    manual = ir.Attribute.parse("#sdy<manual_axes{" + ", ".join(f'"{a}"' for a in mesh.axis_names) + "}>")
    mc = sdy.ManualComputationOp([value.type], [value], _per_value([src]), _per_value([dst]), manual)
    block = mc.regions[0].blocks.append(_local_type(value.type, src, mesh))
    with ir.InsertionPoint(block):
        groups = replica_groups(mesh, axes)
        a2a = hlo.AllToAllOp([block.arguments[0]], split_dim, concat_dim, groups.shape[1],
                             ir.DenseElementsAttr.get(groups.astype(np.int64)),
                             channel_handle=ir.Attribute.parse(
                                 f"#stablehlo.channel_handle<handle = {channel}, type = 1>"),
                             results=[_local_type(value.type, dst, mesh)])
        sdy.ReturnOp([a2a.results[0]])
    return mc.result


def shardy_collectives(module_text: str, mesh: MeshSpec) -> dict:
    """{kind: {count, bytes}}: the collectives Shardy's own partitioner inserts for a planned
    module (propagation + explicit collectives on a private copy). The auto-sharding ILP prices
    exactly these; comparing them with the compiled HLO separates model error from XLA's choices."""
    m = parse_module(module_text)
    PassManager.parse("builtin.module(sdy-propagation-pipeline)", context=m.context).run(m.operation)
    PassManager.parse("builtin.module(sdy-export-pipeline{enable-insert-explicit-collectives=true})",
                      context=m.context).run(m.operation)
    kinds = {"sdy.all_reduce": "all-reduce", "sdy.all_gather": "all-gather", "sdy.all_to_all": "all-to-all",
             "sdy.reduce_scatter": "reduce-scatter", "sdy.collective_permute": "collective-permute"}
    out: dict = {}

    def visit(op):
        kind = kinds.get(op.name)
        if kind is not None:
            ts = TensorSharding.from_attr(op.attributes["out_sharding"])
            s = out.setdefault(kind, {"count": 0, "bytes": 0})
            s["count"] += 1
            s["bytes"] += int(round(tensor_bytes(op.results[0].type) / mesh.axes_size(ts.used_axes())))
        elif op.name == "stablehlo.all_to_all":
            s = out.setdefault("all-to-all", {"count": 0, "bytes": 0})
            s["count"] += 1
            s["bytes"] += tensor_bytes(op.results[0].type)   # inside a manual computation: local type
        elif op.name == "stablehlo.reduce_scatter":
            s = out.setdefault("reduce-scatter", {"count": 0, "bytes": 0})
            s["count"] += 1
            s["bytes"] += tensor_bytes(op.results[0].type)   # inside a manual computation: local type
        return ir.WalkResult.ADVANCE

    m.operation.walk(visit)
    return dict(sorted(out.items()))


def spell_reshard(value: ir.Value, src: TensorSharding, dst: TensorSharding, plan, mesh: MeshSpec,
                  channels) -> ir.Value:
    """`value` (laid out as src) resharded to dst step by step as `plan` (the cost model's
    [(kind, axes, bytes)]) says, at the current insertion point: a sharding constraint per
    all-gather (XLA gathers exactly those axes), an explicit all-to-all where one can do the move
    (else a constraint: XLA's own all-to-all, with the collective-permute the plan priced), and a
    last constraint to dst, which only slices. Left to itself XLA may take another route."""
    cur = src
    if any(k == "collective-permute" for k, _, _ in plan) and not any(k == "all-to-all" for k, _, _ in plan):
        plan = []                   # a relayout within one dim: XLA's route from src to dst as it is
    for kind, axes, _ in plan:
        if kind == "all-gather":
            nxt = TensorSharding(tuple(tuple(a for a in d if a not in axes) for d in cur.dims), cur.mesh)
        elif kind == "all-to-all":
            held = set(cur.used_axes())
            nxt = TensorSharding(tuple(tuple(a for a in d if a in held) for d in dst.dims), cur.mesh)
        else:                       # a collective-permute comes with the all-to-all's constraint
            continue
        moved = explicit_all_to_all(value, cur, nxt, mesh, next(channels)) if kind == "all-to-all" else None
        value = moved or sdy.ShardingConstraintOp(value, nxt.to_attr()).result
        cur = nxt
    if cur != dst or not plan:
        value = sdy.ShardingConstraintOp(value, dst.to_attr()).result
    return value

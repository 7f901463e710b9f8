"""partial-gradients: leave a backward fragment's weight gradients partial (unreduced) over the axes
they are summed across, so a pipeline sums them across devices once per step, not per micro-batch.

After auto-sharding, a weight gradient is a sum over the batch: each device computes the sum over
its batch shard (a dot_general or add-reduce whose summed dimensions are split over mesh axes U,
or a scatter-add -- an embedding's gradient -- whose updates are split over U along the dims it
scatters, into a zero or partial table) and XLA all-reduces over U. Megatron and Alpa keep those per-device partial sums through gradient
accumulation and reduce once in apply-grad. This pass proves, for each listed result of @main,
that it is a linear function of such partial sums -- through convert, reshape, transpose, negate,
add/subtract of partials, multiply/divide by a reduced value, add-reduce -- in which every partial
value is read in the layout it was made in. Each op of that chain then runs as an
`sdy.manual_computation` on the local shards, its partial operands and result declared
`unreduced={U}` (Shardy: each device holds a summand): the local op is the per-device sum by
construction, and XLA cannot move summands between devices (a reshard of an unreduced value
across its own axes is what jaxlib 0.10's partitioner gets wrong). Whoever reads the result with
those axes unreduced (the accumulator, apply-grad) gets the sum where it needs it. Results it
cannot prove stay as they were; the report says why.
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass, field

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy, stablehlo

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import MeshSpec, TensorSharding
from meshweave.passes.explicit_collectives import wrap_local
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register

_ELEMENTWISE = ("stablehlo.convert", "stablehlo.negate", "stablehlo.add", "stablehlo.subtract",
                "stablehlo.multiply", "stablehlo.divide")
_FLOATS = (ir.F32Type, ir.BF16Type, ir.F16Type, ir.F64Type)


@dataclass(frozen=True)
class PartialGradient:
    """A result left partial: its layout (with `unreduced` axes) and per-device bytes of the sums
    it no longer reduces here (`root_bytes`: the dot/reduce results) and of itself (`bytes`)."""

    index: int
    sharding: TensorSharding
    root_bytes: float
    bytes: float
    root_sums: tuple[float, ...] = ()     # per-device bytes of each all-reduce the fragment no longer does


@dataclass
class PartialGradientsResult(PassResult):
    partial: list[PartialGradient] = field(default_factory=list)
    kept: dict[int, str] = field(default_factory=dict)       # result index -> why it stays reduced

    def explain(self) -> str:
        lines = [f"{len(self.partial)} result(s) left partial, {len(self.kept)} kept reduced"]
        lines += [f"  result {p.index}: {p.sharding.to_text()}" for p in self.partial]
        lines += [f"  result {i} kept reduced: {why}" for i, why in sorted(self.kept.items())]
        return "\n".join(lines)


class _NotPartial(Exception):
    """The value is not provably a linear function of partial sums (message: why)."""


class _ChainTooLong(_NotPartial):
    """The walk gave up (MAX_CHAIN): the whole chain stays reduced, whichever operand it was in."""


@dataclass
class _Step:
    """One chain op: the layouts (dims only) its operands are read in, which operands are partial,
    its result layout and the axes its result is partial over."""

    value: ir.Value
    reads: list[TensorSharding]
    partial_operands: list[bool]
    result: TensorSharding
    axes: frozenset


@dataclass
class _Chain:
    axes: frozenset
    steps: list[_Step]              # producers first
    root_bytes: float = 0.0
    root_sums: tuple[float, ...] = ()     # one entry per op whose sum the chain leaves partial


def sharding_of(value: ir.Value) -> TensorSharding | None:
    """The planned layout of `value`: its op's sdy.sharding, a constraint's, or @main's argument attr."""
    if isinstance(value, ir.BlockArgument):
        owner = value.owner.owner
        if owner is None or owner.operation.name != "func.func":
            return None
        d = mw.arg_attr_dicts(owner)[value.arg_number]
        return TensorSharding.from_attr(d[mw.SDY_SHARDING]) if mw.SDY_SHARDING in d else None
    op = value.owner
    if op.operation.name == "sdy.sharding_constraint":
        return TensorSharding.from_attr(op.attributes["sharding"])
    if "sdy.sharding" not in op.attributes:
        return None
    per_value = sdy.TensorShardingPerValueAttr(op.attributes["sdy.sharding"]).shardings
    return TensorSharding.from_attr(per_value[ir.OpResult(value).result_number])


def _shape(value: ir.Value) -> list[int]:
    return list(ir.RankedTensorType(value.type).shape)


def _bytes_per_device(value: ir.Value, ts: TensorSharding, mesh: MeshSpec) -> float:
    rt = ir.RankedTensorType(value.type)
    width = getattr(rt.element_type, "width", 32)
    return math.prod(rt.shape) * max(width // 8, 1) / mesh.axes_size(ts.used_axes())


def _dims_attr(op, name: str) -> list[int]:
    return [int(x) for x in ir.DenseI64ArrayAttr(op.attributes[name])]


def _dot_dims(op) -> dict[str, list[int]]:
    text = str(op.attributes["dot_dimension_numbers"])
    out = {}
    for key in ("lhs_batching", "rhs_batching", "lhs_contracting", "rhs_contracting"):
        m = re.search(key + r"_dimensions = \[([\d, ]*)\]", text)
        out[key] = [int(x) for x in m.group(1).split(",") if x.strip()] if m else []
    return out


def _partial_or_none(value: ir.Value, mesh: MeshSpec) -> _Chain | None:
    try:
        return _trace(value, mesh)
    except _ChainTooLong:
        raise
    except _NotPartial:
        return None


MAX_CHAIN = 256
"""Ops a chain may pass through (a whole stage's backward holds long elementwise chains, e.g. the
residual stream's gradient over many layers): beyond it the value stays reduced, which is always
correct, rather than recursing past Python's limit."""

_walk = threading.local()


def _trace(value: ir.Value, mesh: MeshSpec) -> _Chain:
    """The chain of ops making `value` a linear function of partial sums, or _NotPartial. Values
    found not partial are remembered for the walk (a backward's DAG reaches them by many paths)."""
    failed = getattr(_walk, "failed", None)
    if failed is None:
        failed = _walk.failed = {}
        _walk.depth = 0
    if value in failed:
        raise _NotPartial(failed[value])
    if _walk.depth >= MAX_CHAIN:
        raise _ChainTooLong(f"the chain of linear ops is longer than {MAX_CHAIN} ops")
    _walk.depth += 1
    try:
        return _trace_op(value, mesh)
    except _ChainTooLong:
        raise
    except _NotPartial as e:
        failed[value] = str(e)
        raise
    finally:
        _walk.depth -= 1
        if _walk.depth == 0:
            _walk.failed = None


def _trace_op(value: ir.Value, mesh: MeshSpec) -> _Chain:
    if isinstance(value, ir.BlockArgument):
        raise _NotPartial("it is (a linear function of) a fragment argument, not a sum over the batch")
    op = value.owner
    name = op.operation.name
    if name == "sdy.manual_computation":
        raise _NotPartial("auto-sharding already runs its op per device (a local scatter or convolution, which "
                          "sums over no mesh axis, or a reduce-scatter): this pass does not look inside")
    result = sharding_of(value)
    if result is None:
        raise _NotPartial(f"{name} has no planned sharding")
    if name == "sdy.sharding_constraint":
        inner = _trace(op.operands[0], mesh)
        if sharding_of(op.operands[0]).dims != result.dims:
            raise _NotPartial("the plan reshards a partial sum (a constraint changes its layout)")
        return inner                      # a no-op on the layout: dropped when the chain is rewritten
    if name == "stablehlo.dot_general":
        return _dot_root(op, value, result, mesh)
    if name == "stablehlo.reduce":
        return _reduce(op, value, result, mesh)
    if name == "stablehlo.scatter":
        return _scatter(op, value, result, mesh)
    if name in _ELEMENTWISE:
        if name == "stablehlo.convert" and not all(
                isinstance(ir.RankedTensorType(v.type).element_type, _FLOATS) for v in (value, op.operands[0])):
            raise _NotPartial("a convert to or from a non-float type is not linear")
        chains = [_partial_or_none(v, mesh) for v in op.operands]
        partial = [c is not None for c in chains]
        if not any(partial):
            raise _NotPartial(f"{name} of values that are not partial sums")
        if name in ("stablehlo.add", "stablehlo.subtract") and not all(partial):
            raise _NotPartial(f"{name} of a partial sum and a reduced value")
        if name == "stablehlo.divide" and (not partial[0] or partial[1]):
            raise _NotPartial("a divide whose numerator is not the (only) partial sum")
        if name == "stablehlo.multiply" and sum(partial) != 1:
            raise _NotPartial("a multiply of two partial sums (or of none)")
        axes = {c.axes for c in chains if c is not None}
        if len(axes) != 1:
            raise _NotPartial(f"{name} of partial sums over different axes")
        reads = [result] * len(op.operands)
        return _link([c for c in chains if c is not None], _Step(value, reads, partial, result, axes.pop()), mesh)
    if name == "stablehlo.transpose":
        perm = _dims_attr(op, "permutation")
        read = TensorSharding(tuple(result.dims[perm.index(i)] for i in range(len(perm))), result.mesh)
        return _link([_trace(op.operands[0], mesh)], _Step(value, [read], [True], result, None), mesh)
    if name == "stablehlo.reshape":
        src, dst = _shape(op.operands[0]), _shape(value)
        if [s for s in src if s != 1] != [s for s in dst if s != 1]:
            raise _NotPartial("a reshape that merges or splits dimensions (only size-1 dimensions may come and go)")
        kept = iter(d for s, d in zip(dst, result.dims) if s != 1)
        if any(d for s, d in zip(dst, result.dims) if s == 1):
            raise _NotPartial("a reshape whose result splits a size-1 dimension")
        read = TensorSharding(tuple(next(kept) if s != 1 else () for s in src), result.mesh)
        return _link([_trace(op.operands[0], mesh)], _Step(value, [read], [True], result, None), mesh)
    raise _NotPartial(f"{name} is not linear in a partial sum")


def _link(inners: list[_Chain], step: _Step, mesh: MeshSpec) -> _Chain:
    """Append `step` to its operands' chains, checking each partial operand is read as it was made."""
    axes = frozenset().union(*(c.axes for c in inners))
    step.axes = step.axes if step.axes is not None else axes
    inner_iter = iter(inners)
    for v, read, partial in zip(step.value.owner.operands, step.reads, step.partial_operands):
        if partial:
            made = sharding_of(v)
            next(inner_iter)
            if made is None or made.dims != read.dims:
                raise _NotPartial(f"{step.value.owner.operation.name} reads a partial sum in another layout "
                                  "than it was made in")
    if set(step.axes) & set(step.result.used_axes()):
        raise _NotPartial("the plan splits a partial sum over an axis it is summed across")
    steps = [s for c in inners for s in c.steps]
    return _Chain(step.axes, steps + [step], sum(c.root_bytes for c in inners),
                  tuple(b for c in inners for b in c.root_sums))


def _dot_root(op, value, result: TensorSharding, mesh: MeshSpec) -> _Chain:
    d = _dot_dims(op)
    lhs, rhs = sharding_of(op.operands[0]), sharding_of(op.operands[1])
    if (lhs is None or rhs is None) and mw.STRATEGY in op.attributes:
        lhs, rhs = _strategy_operands(ir.StringAttr(op.attributes[mw.STRATEGY]).value, mesh, result.mesh)
    if lhs is None or rhs is None:
        raise _NotPartial("a dot_general operand has no planned sharding")
    contracted = [lhs.dims[i] for i in d["lhs_contracting"]]
    if contracted != [rhs.dims[i] for i in d["rhs_contracting"]]:
        raise _NotPartial("the operands of a dot_general split its contracted dimensions differently")
    axes = frozenset(a for c in contracted for a in c)
    if not axes:
        raise _NotPartial("its dot_general sums over dimensions the plan does not split (nothing to keep partial)")
    # The result is batch dims, then lhs free dims, then rhs free dims: each read in the result's layout.
    nb = len(d["lhs_batching"])
    lhs_free = [i for i in range(len(lhs.dims)) if i not in d["lhs_batching"] + d["lhs_contracting"]]
    rhs_free = [i for i in range(len(rhs.dims)) if i not in d["rhs_batching"] + d["rhs_contracting"]]
    read_l, read_r = [()] * len(lhs.dims), [()] * len(rhs.dims)
    for k, (i, j) in enumerate(zip(d["lhs_batching"], d["rhs_batching"])):
        read_l[i] = read_r[j] = result.dims[k]
    for k, i in enumerate(lhs_free):
        read_l[i] = result.dims[nb + k]
    for k, j in enumerate(rhs_free):
        read_r[j] = result.dims[nb + len(lhs_free) + k]
    for i, j, c in zip(d["lhs_contracting"], d["rhs_contracting"], contracted):
        read_l[i] = read_r[j] = c
    step = _Step(value, [TensorSharding(tuple(read_l), result.mesh), TensorSharding(tuple(read_r), result.mesh)],
                 [False, False], result, axes)
    if axes & set(result.used_axes()):
        raise _NotPartial("the plan scatters the sum of a dot_general over the axes it sums across")
    nbytes = _bytes_per_device(value, result, mesh)
    return _Chain(axes, [step], nbytes, (nbytes,) * sum(1 for c in contracted if c))


def _strategy_operands(text: str, mesh: MeshSpec, mesh_name: str):
    """A dot's two operand layouts from auto-sharding's strategy label, e.g. "[-,x] x [x,y] -> [-,y]"."""
    layouts = _strategy_layouts(text, mesh, mesh_name)
    return tuple(layouts) if layouts is not None and len(layouts) == 2 else (None, None)


def _strategy_layouts(text: str, mesh: MeshSpec, mesh_name: str) -> list | None:
    """Every operand's layout from a strategy label "[..] x [..] x .. -> [..]" (None: unreadable)."""
    if "->" not in text:
        return None
    parts = [p.strip() for p in text.split("->")[0].split(" x ")]
    if not all(p.startswith("[") and p.endswith("]") for p in parts):
        return None
    names = sorted(mesh.axis_names, key=len, reverse=True)

    def dims(part: str):
        out = []
        for tok in part.split(",") if part else ():
            tok, axes = tok.strip(), []
            while tok and tok != "-":
                name = next((n for n in names if tok.startswith(n)), None)
                if name is None:
                    return None
                axes.append(name)
                tok = tok[len(name):]
            out.append(tuple(axes))
        return TensorSharding(tuple(out), mesh_name)

    return [dims(p[1:-1]) for p in parts]


def _scatter(op, value, result: TensorSharding, mesh: MeshSpec) -> _Chain:
    """A scatter-add whose updates are split over axes U along their scattered (batch) dims: each
    device scatter-adds its own updates, so the sum over U of the local tables is the result --
    given a table that is zero (an embedding gradient) or itself partial over U."""
    body = [o.operation.name for o in op.regions[0].blocks[0].operations]
    if len(op.operands) != 3 or body != ["stablehlo.add", "stablehlo.return"]:
        raise _NotPartial("a scatter that is not a single scatter-add")
    nums = stablehlo.ScatterDimensionNumbers(op.attributes["scatter_dimension_numbers"])
    if list(nums.input_batching_dims):
        raise _NotPartial("a scatter with batching dimensions")
    table, indices, updates = op.operands
    lay_i, lay_u = sharding_of(indices), sharding_of(updates)
    if (lay_i is None or lay_u is None) and mw.STRATEGY in op.attributes:
        parsed = _strategy_layouts(ir.StringAttr(op.attributes[mw.STRATEGY]).value, mesh, result.mesh)
        if parsed is not None and len(parsed) == 3 and None not in parsed:
            lay_i, lay_u = parsed[1], parsed[2]
    if lay_i is None or lay_u is None:
        raise _NotPartial("a scatter operand has no planned sharding")
    if any(result.dims[d] for d in list(nums.scattered_dims_to_operand_dims) + list(nums.inserted_window_dims)):
        raise _NotPartial("the plan splits a dimension the scatter indexes (each device would need the rows "
                          "its indices hit)")
    window = list(nums.update_window_dims)
    scattered = [d for d in range(len(lay_u.dims)) if d not in window]
    index_batch = [d for d in range(len(_shape(indices))) if d != nums.index_vector_dim]
    table_window = [d for d in range(len(result.dims)) if d not in nums.inserted_window_dims]
    read_u = list(lay_u.dims)
    for w, t in zip(window, table_window):
        read_u[w] = result.dims[t]
    read_i = [()] * len(_shape(indices))
    for i, u in zip(index_batch, scattered):
        read_i[i] = lay_u.dims[u]
    axes = frozenset(a for u in scattered for a in lay_u.dims[u])
    if not axes:
        raise _NotPartial("its scatter adds updates the plan does not split (nothing to keep partial)")
    if axes & set(result.used_axes()):
        raise _NotPartial("the plan scatters the sum of a scatter-add over the axes it sums across")
    reads = [TensorSharding(result.dims, result.mesh), TensorSharding(tuple(read_i), result.mesh),
             TensorSharding(tuple(read_u), result.mesh)]
    inner = _partial_or_none(table, mesh)
    nbytes = _bytes_per_device(value, result, mesh)
    sums = (nbytes,) * sum(1 for u in scattered if lay_u.dims[u])
    if inner is None:
        if not _is_zero(table):
            raise _NotPartial("a scatter-add into a table that is neither zero nor a partial sum (each device "
                              "would add the table once)")
        return _Chain(axes, [_Step(value, reads, [False, False, False], result, axes)], nbytes, sums)
    if inner.axes != axes:
        raise _NotPartial("a scatter-add into a partial sum over other axes than its updates are split over")
    chain = _link([inner], _Step(value, reads, [True, False, False], result, axes), mesh)
    chain.root_bytes += nbytes
    chain.root_sums += sums
    return chain


def _is_zero(value: ir.Value) -> bool:
    """A constant zero, or a broadcast of one (through sharding constraints)."""
    value = _strip_constraints(value)
    if isinstance(value, ir.BlockArgument):
        return False
    op = value.owner
    if op.operation.name == "stablehlo.broadcast_in_dim":
        return _is_zero(op.operands[0])
    if op.operation.name != "stablehlo.constant":
        return False
    attr = ir.DenseElementsAttr(op.attributes["value"])
    if not attr.is_splat:
        return False
    try:
        return ir.FloatAttr(attr.get_splat_value()).value == 0.0
    except (ValueError, TypeError):       # an integer table: not a gradient
        return False


def _reduce(op, value, result: TensorSharding, mesh: MeshSpec) -> _Chain:
    body = [o.operation.name for o in op.regions[0].blocks[0].operations]
    if len(op.operands) != 2 or body != ["stablehlo.add", "stablehlo.return"]:
        raise _NotPartial("a reduce that is not a single add-reduction")
    source = sharding_of(op.operands[0])
    if source is None:
        raise _NotPartial("a reduce operand has no planned sharding")
    dims = _dims_attr(op, "dimensions")
    kept = iter(result.dims)
    read = TensorSharding(tuple(source.dims[i] if i in dims else next(kept) for i in range(len(source.dims))),
                          result.mesh)
    summed = frozenset(a for i in dims for a in source.dims[i])
    init = TensorSharding((), result.mesh)
    inner = _partial_or_none(op.operands[0], mesh)     # a sum of a partial sum is one too (bias: reduce of reduce)
    if inner is None:
        if not summed:
            raise _NotPartial("its reduce sums over dimensions the plan does not split (nothing to keep partial)")
        if summed & set(result.used_axes()):
            raise _NotPartial("the plan scatters the sum of a reduce over the axes it sums across")
        nbytes = _bytes_per_device(value, result, mesh)
        return _Chain(summed, [_Step(value, [read, init], [False, False], result, summed)], nbytes,
                      (nbytes,) * sum(1 for i in dims if source.dims[i]))
    chain = _link([inner], _Step(value, [read, init], [True, False], result, inner.axes | summed), mesh)
    if summed:                      # its own sums over split dims are left partial too
        chain.root_sums += (_bytes_per_device(value, result, mesh),) * sum(1 for i in dims if source.dims[i])
    return chain


def _strip_constraints(v: ir.Value) -> ir.Value:
    while not isinstance(v, ir.BlockArgument) and v.owner.operation.name == "sdy.sharding_constraint":
        v = v.owner.operands[0]
    return v


def mesh_of(module) -> MeshSpec:
    for op in module.body.operations:
        if op.operation.name == "sdy.mesh":
            axes = [sdy.MeshAxisAttr(a) for a in sdy.MeshAttr(op.attributes["mesh"]).axes]
            return MeshSpec(tuple(a.name for a in axes), tuple(a.size for a in axes),
                            ir.StringAttr(op.attributes["sym_name"]).value)
    raise PassError("partial-gradients", "the module has no sdy.mesh (run install-mesh and auto-sharding first)")


def partial_candidates(outlined) -> dict[str, list[int]]:
    """Per backward fragment, the outputs that may stay partial sums through accumulation: the
    accumulated values whose only readers are apply-grad fragments on the producer's own mesh
    (a value that leaves the mesh or the micro-batch loop any other way is reduced first)."""
    frags = {f.name: f for f in outlined.fragments}
    readers: dict[tuple[str, int], list] = {}
    for f in outlined.fragments:
        for s in f.inputs:
            if s.fragment is not None:
                readers.setdefault((s.fragment, s.index), []).append((f, s))
    step_outputs = {(s.fragment, s.index) for s in outlined.results if s.fragment is not None}
    out: dict[str, list[int]] = {}
    for (name, i), rs in sorted(readers.items()):
        producer = frags[name]
        if producer.phase != "backward" or (name, i) in step_outputs:
            continue
        if all(f.phase == "apply" and f.mesh == producer.mesh and s.accumulated for f, s in rs):
            out.setdefault(name, []).append(i)
    return out


def mark_gradient_sums(func, results) -> int:
    """Mark (mw.gradient_sum) the dot_generals, add-reduces and scatter-adds whose sums the listed
    results are linear in, walking back through the ops `_trace` accepts; before auto-sharding, so
    layouts are not known yet (the ILP prices their all-reduce once per step; what partial-gradients
    then cannot prove is priced back per micro-batch by the stage DP). The walk stops at a value
    some other op also reads (an activation gradient the backward pass goes on with): it can never
    stay partial (`_users_outside`), so its sum is priced in full. Returns how many were marked."""
    block = mw.entry_block(func)
    ret = block.operations[len(block.operations) - 1]
    linear = _ELEMENTWISE + ("stablehlo.transpose", "stablehlo.reshape", "sdy.sharding_constraint")
    todo, seen, marked = [(ret.operands[r], ret.operation) for r in results], set(), 0
    while todo:
        v, reader = todo.pop()
        if isinstance(v, ir.BlockArgument) or v in seen:
            continue
        if any(use.owner.operation != reader for use in v.uses):
            continue
        seen.add(v)
        op = v.owner
        name = op.operation.name
        if name in ("stablehlo.dot_general", "stablehlo.reduce", "stablehlo.scatter"):
            op.attributes[mw.GRADIENT_SUM] = ir.UnitAttr.get(func.context)
            marked += 1
            if name in ("stablehlo.reduce", "stablehlo.scatter"):
                todo.append((op.operands[0], op.operation))  # bias: the inner reduce is the sum; a scatter's table
        elif name in linear:
            todo.extend((x, op.operation) for x in op.operands)
    return marked


def expect_partial_args(module, shardings: dict[int, TensorSharding]) -> None:
    """Give @main's argument i the layout `shardings[i]` (a producer's partial layout): the
    fragment then reads it as it arrives and Shardy reduces it where its ops need the sum."""
    main = mw.main_func(module)
    with module.context:
        attrs = mw.arg_attr_dicts(main)
        for i, ts in shardings.items():
            attrs[i][mw.SDY_SHARDING] = ts.to_attr()
        mw.set_arg_attr_dicts(main, attrs)


def _users_outside(chain: _Chain, ret, r: int) -> str | None:
    """Why the chain cannot be rewritten: a partial value read by an op outside the chain."""
    members = {s.value.owner.operation for s in chain.steps}
    final = chain.steps[-1].value
    for step in chain.steps:
        for use in step.value.uses:
            user = use.owner.operation
            while user.name == "sdy.sharding_constraint" and user not in members:
                # a no-op constraint between chain ops: look through it
                inner_users = [u.owner.operation for u in user.results[0].uses]
                if len(inner_users) != 1:
                    return "a partial value is read by more than one op"
                user = inner_users[0]
            if user in members:
                continue
            if user == ret.operation and step.value == final:
                continue
            return f"a partial value is also read by {user.name} (it needs the sum)"
    return None


@register
class PartialGradients(Pass):
    name = "partial-gradients"
    summary = "Leave the listed results (weight gradients) partial over the axes they sum across (sdy unreduced)"
    options = (Option("results", "int-list", (), "indices of @main results to leave partial when provable"),)

    def run(self, module, state):
        main = mw.main_func(module)
        block = mw.entry_block(main)
        ret = block.operations[len(block.operations) - 1]
        mesh = mesh_of(module)
        out = PartialGradientsResult()
        res_attrs = mw.result_attr_dicts(main)
        chains = {}
        for r in self.results:
            if not 0 <= r < len(ret.operands):
                raise PassError(self.name, f"results: @main has {len(ret.operands)} results, no result {r}")
            if mw.SDY_SHARDING not in res_attrs[r]:
                out.kept[r] = "the result has no planned sharding (run auto-sharding first)"
                continue
            result_ts = TensorSharding.from_attr(res_attrs[r][mw.SDY_SHARDING])
            try:
                value = ret.operands[r]
                chain = _trace(value, mesh)
                if _strip_constraints(value) != chain.steps[-1].value:
                    raise _NotPartial("internal: the chain does not end at the result")
                if result_ts.dims != chain.steps[-1].result.dims:
                    raise _NotPartial("the result is returned in another layout than it is made in")
                why = _users_outside(chain, ret, r)
                if why:
                    raise _NotPartial(why)
                if sum(1 for v in ret.operands if v == value) > 1:
                    raise _NotPartial("the same value is returned twice")
            except _NotPartial as e:
                out.kept[r] = str(e)
                continue
            chains[r] = (chain, result_ts)
        claimed: dict = {}
        for r, (chain, _) in chains.items():            # a value in two chains: neither is rewritten
            for s in chain.steps:
                claimed.setdefault(s.value.owner.operation, []).append(r)
        shared = {r for owners in claimed.values() if len(owners) > 1 for r in owners}
        for r in sorted(shared):
            out.kept[r] = "its chain shares ops with another result's"
            del chains[r]
        for r, (chain, result_ts) in chains.items():
            axes = tuple(a for a in mesh.axis_names if a in chain.axes)
            with module.context, ir.Location.unknown():
                ret.operands[r] = _rewrite_chain(chain, mesh)
            ts = TensorSharding(result_ts.dims, result_ts.mesh, axes)
            res_attrs[r][mw.SDY_SHARDING] = ts.to_attr(module.context)
            out.partial.append(PartialGradient(r, ts, chain.root_bytes, _bytes_per_device(ret.operands[r], ts, mesh),
                                               chain.root_sums))
        with module.context:
            mw.set_result_attr_dicts(main, res_attrs)
        state.results[self.name] = out


def _rewrite_chain(chain: _Chain, mesh: MeshSpec) -> ir.Value:
    """Wrap each chain op in a manual computation (producers first); returns the final value."""
    order = mesh.axis_names
    new: dict = {}                  # old chain value -> (its replacement, its axes)
    for step in chain.steps:
        op = step.value.owner
        for k, v in enumerate(list(op.operands)):
            if step.partial_operands[k]:
                op.operands[k] = _strip_constraints(v)
        reads = []
        for v, read, partial in zip(op.operands, step.reads, step.partial_operands):
            u = tuple(a for a in order if a in new[v][1]) if partial else ()
            reads.append(TensorSharding(read.dims, read.mesh, u))
        out = TensorSharding(step.result.dims, step.result.mesh, tuple(a for a in order if a in step.axes))
        users = [(u.owner, u.operand_number) for u in step.value.uses]
        wrap_local(op, reads, [out], mesh)
        replacement = users and users[0][0].operands[users[0][1]]
        new[replacement] = (replacement, step.axes)
        last = replacement
    return last

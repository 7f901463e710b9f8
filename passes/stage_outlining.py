"""stage-outlining: move each stage's forward, backward and apply-grad ops into a fragment function.

Needs `layer-clustering` (mw.layer / mw.phase on every op) and `stage-construction` (which
layers form each stage, and the stage's mesh). Fragment `s<k>_<phase>` becomes a private
`func.func` holding those ops in their original order; @main becomes a list of `func.call`s
tagged `mw.stage` / `mw.phase` / `mw.mesh`, in an order every dependency respects (forward
stages ascending, backward descending, then apply-grad). Constants and other operand-free ops
are rematerialized in every fragment that reads them instead of crossing fragments.
`insert-transfers` then turns @main into the `mpmd` form (fragment calls on named meshes and
transfers between them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import func as func_d

from meshweave.dialects import meshweave as mw
from meshweave.passes.layer_clustering import ACCUMULATE, LAYER, PHASE, value_bytes
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Pass, PassError, register

PHASE_ORDER = {"forward": 0, "backward": 1, "apply": 2}


@dataclass(frozen=True)
class Source:
    """Where a fragment input or a step result comes from: @main argument `arg`, or output
    `index` of fragment `fragment`."""

    arg: int | None = None
    fragment: str | None = None
    index: int | None = None
    accumulated: bool = False      # a "grad"-marked value: summed over micro-batches
    batch_dependent: bool = False


@dataclass
class Fragment:
    name: str
    stage: int
    phase: str
    mesh: str
    inputs: list[Source] = field(default_factory=list)
    num_outputs: int = 0
    num_ops: int = 0

    @property
    def per_micro_batch(self) -> bool:
        return self.phase != "apply"


@dataclass
class OutliningResult(PassResult):
    fragments: list[Fragment]
    results: list[Source]                 # per @main result

    def explain(self) -> str:
        return "fragments: " + ", ".join(f"{f.name}@{f.mesh} ({f.num_ops} ops, {len(f.inputs)} in, "
                                         f"{f.num_outputs} out)" for f in self.fragments)

    def fragment(self, name: str) -> Fragment:
        return next(f for f in self.fragments if f.name == name)


_SOURCES = ("stablehlo.constant", "stablehlo.iota", "arith.constant")
_CHEAP = ("stablehlo.broadcast_in_dim", "stablehlo.reshape", "stablehlo.convert", "stablehlo.transpose")
SMALL_BYTES = 64          # operands up to this size are moved rather than the ops' results
BROADCAST_GROWTH = 8      # a broadcast this many times larger than its operand is recomputed where read


def _small(value) -> bool:
    try:
        t = ir.RankedTensorType(value.type)
    except ValueError:
        return False
    n = 1
    for d in t.shape:
        n *= d
    return n * 8 <= SMALL_BYTES


def rematerializable(ops, producer, returned, params=frozenset()) -> set[int]:
    """Ops cheaper to recompute in every fragment that reads them than to transfer or keep: constants,
    iotas, ops computed from those alone, and broadcasts / reshapes / converts of small values (Adam's bias
    correction broadcast from a scalar). CSE shares such ops across layers; rematerializing them
    keeps each layer's copy on the layer's own mesh.

    Also views of parameters (`params`: @main arguments the batch does not flow into), e.g. a bf16
    weight converted to f32, and broadcasts at least BROADCAST_GROWTH x larger than their operand
    (a softmax's row max or sum spread over its row): a backward would otherwise receive, and
    its stage hold per micro-batch in flight, the large result instead of what it is made from."""
    out, views = set(), set()
    for i, op in enumerate(ops):
        name = op.operation.name
        if len(op.regions):
            continue
        if any(r in returned for r in op.results):
            continue
        if name in _SOURCES and len(op.operands) == 0:
            out.add(i)
        elif len(op.operands) and all(producer.get(v) in out for v in op.operands):
            out.add(i)                  # computed from constants only (a causal mask from iotas)
        elif name in _CHEAP and all(producer.get(v) in out or _small(v) for v in op.operands):
            out.add(i)
        elif name in _CHEAP and all(producer.get(v) in out or producer.get(v) in views or _small(v) or v in params
                                    for v in op.operands):
            views.add(i)                # a view of parameters: not a source for rule 2 (a dot of two is no view)
        elif name == "stablehlo.broadcast_in_dim" and \
                value_bytes(op.results[0]) >= BROADCAST_GROWTH * max(value_bytes(op.operands[0]), 1):
            views.add(i)
    return out | views


def _captured(op, inside: set) -> list:
    """Values used in op's nested regions that are defined outside op (implicit captures)."""
    out = []

    def walk(o, local):
        for region in o.regions:
            for block in region.blocks:
                for a in block.arguments:
                    local.add(a)
                for inner in block.operations:
                    for v in inner.operands:
                        if v not in local and v not in out:
                            out.append(v)
                    for r in inner.results:
                        local.add(r)
                    walk(inner.operation, local)

    walk(op.operation, set())
    return out


def _remap_nested(op, mapping) -> None:
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                for k, v in enumerate(inner.operands):
                    if v in mapping:
                        inner.operands[k] = mapping[v]
                _remap_nested(inner.operation, mapping)


def outline(module: ir.Module, stage_of_layer: list[int], mesh_of_stage: list[str]) -> OutliningResult:
    main = mw.main_func(module)
    block = mw.entry_block(main)
    ret = next(op for op in block.operations if op.operation.name == "func.return")
    ops = [op for op in block.operations if op.operation.name != "func.return"]
    args = list(block.arguments)
    arg_index = {a: i for i, a in enumerate(args)}
    batch_args = {i for i, d in enumerate(mw.arg_attr_dicts(main)) if mw.BATCH_DIM in d}
    producer, acc_results = {}, set()
    batch_dep = {a for i, a in enumerate(args) if i in batch_args}
    for i, op in enumerate(ops):
        if LAYER not in op.attributes or PHASE not in op.attributes:
            raise PassError("stage-outlining", f"op {op.operation.name} has no mw.layer/mw.phase: run "
                            "layer-clustering first")
        for r in op.results:
            producer[r] = i
        if ACCUMULATE in op.attributes:
            for k in ir.ArrayAttr(op.attributes[ACCUMULATE]):
                acc_results.add(op.results[ir.IntegerAttr(k).value])
        deps = list(op.operands) + _captured(op, set())
        if any(v in batch_dep for v in deps):
            batch_dep.update(op.results)
    returned = set(ret.operands)
    params = {a for i, a in enumerate(args) if i not in batch_args and a not in batch_dep}
    remat = rematerializable(ops, producer, returned, params)

    def _is_free(op_or_index) -> bool:
        return op_or_index in remat

    key_of = []
    for op in ops:
        layer = ir.IntegerAttr(op.attributes[LAYER]).value
        phase = ir.StringAttr(op.attributes[PHASE]).value
        if not 0 <= layer < len(stage_of_layer):
            raise PassError("stage-outlining", f"op {op.operation.name} is on layer {layer}, but the stages cover "
                            f"layers 0..{len(stage_of_layer) - 1}")
        key_of.append((stage_of_layer[layer], phase))
    num_stages = len(mesh_of_stage)
    order = ([(s, "forward") for s in range(num_stages)] + [(s, "backward") for s in reversed(range(num_stages))]
             + [(s, "apply") for s in range(num_stages)])
    members = {k: [i for i, key in enumerate(key_of) if key == k and not _is_free(i)] for k in order}
    order = [k for k in order if members[k]]
    frag_of_op = {}
    fragments: list[Fragment] = []
    outputs_of: dict[str, list] = {}
    for s, phase in order:
        name = f"s{s}_{phase}"
        fragments.append(Fragment(name, s, phase, mesh_of_stage[s]))
        for i in members[(s, phase)]:
            frag_of_op[i] = name
    # Which values each fragment reads (operands and captures, free ops excluded) and exports.
    reads: dict[str, list] = {f.name: [] for f in fragments}
    free_needed: dict[str, list[int]] = {f.name: [] for f in fragments}
    read_set = {f.name: set() for f in fragments}     # membership in O(1): a block has 10^4-10^5 values
    free_set = {f.name: set() for f in fragments}
    for i, op in enumerate(ops):
        if i not in frag_of_op:
            continue
        name = frag_of_op[i]
        stack = list(reversed(list(op.operands) + _captured(op, set())))   # popped in operand order
        while stack:
            v = stack.pop()
            j = producer.get(v)
            if j is not None and _is_free(j):
                if j not in free_set[name]:
                    free_set[name].add(j)
                    free_needed[name].append(j)
                    stack += list(ops[j].operands)
            elif (j is None or frag_of_op.get(j) != name) and v not in read_set[name]:
                read_set[name].add(v)
                reads[name].append(v)
    fragments = _topological(fragments, reads, producer, frag_of_op)
    ret_values = list(ret.operands)
    returned = set(ret_values)
    readers: dict = {}
    for g in fragments:
        for v in reads[g.name]:
            readers.setdefault(v, set()).add(g.name)
    for f in fragments:
        exported = []
        for i in members[(f.stage, f.phase)]:
            for r in ops[i].results:
                used_elsewhere = bool(readers.get(r, set()) - {f.name}) or r in returned
                if used_elsewhere:
                    exported.append(r)
        outputs_of[f.name] = exported
        f.num_outputs = len(exported)
        f.num_ops = len(members[(f.stage, f.phase)])

    def source(v, reader_phase: str | None) -> Source:
        if v in arg_index:
            return Source(arg=arg_index[v], batch_dependent=v in batch_dep)
        j = producer[v]
        name = frag_of_op[j]
        return Source(fragment=name, index=outputs_of[name].index(v), accumulated=v in acc_results,
                      batch_dependent=v in batch_dep)

    for f in fragments:
        f.inputs = [source(v, f.phase) for v in reads[f.name]]
    results = [source(v, None) for v in ret_values]
    # Build the fragment functions and the new @main.
    ctx = module.context
    with ctx, ir.Location.unknown():
        i64 = ir.IntegerType.get_signless(64)
        calls = {}
        for f in fragments:
            in_types = [v.type for v in reads[f.name]]
            out_types = [v.type for v in outputs_of[f.name]]
            with ir.InsertionPoint(module.body):
                fn = func_d.FuncOp(f.name, ir.FunctionType.get(in_types, out_types))
            fn.attributes["sym_visibility"] = ir.StringAttr.get("private")
            fn.attributes["mw.stage"] = ir.IntegerAttr.get(i64, f.stage)
            fn.attributes["mw.phase"] = ir.StringAttr.get(f.phase)
            fn.attributes["mw.mesh"] = ir.StringAttr.get(f.mesh)
            body = fn.add_entry_block()
            mapping = dict(zip(reads[f.name], body.arguments))
            with ir.InsertionPoint(body):
                for j in sorted(free_needed[f.name] + members[(f.stage, f.phase)]):
                    new = ops[j].operation.clone()
                    for k, v in enumerate(new.operands):
                        if v in mapping:
                            new.operands[k] = mapping[v]
                    _remap_nested(new, mapping)
                    for a in (LAYER, PHASE, ACCUMULATE):
                        if a in new.attributes:
                            del new.attributes[a]
                    for old, nv in zip(ops[j].results, new.results):
                        mapping[old] = nv
                func_d.ReturnOp([mapping[v] for v in outputs_of[f.name]])
            with ir.InsertionPoint(ret):
                operands = []
                for v, src in zip(reads[f.name], f.inputs):
                    operands.append(args[src.arg] if src.arg is not None else calls[src.fragment].results[src.index])
                call = func_d.CallOp(out_types, ir.FlatSymbolRefAttr.get(f.name), operands)
            call.attributes["mw.stage"] = ir.IntegerAttr.get(i64, f.stage)
            call.attributes["mw.phase"] = ir.StringAttr.get(f.phase)
            call.attributes["mw.mesh"] = ir.StringAttr.get(f.mesh)
            calls[f.name] = call
        for k, src in enumerate(results):
            ret.operands[k] = args[src.arg] if src.arg is not None else calls[src.fragment].results[src.index]
        for op in reversed(ops):
            op.operation.erase()
    return OutliningResult(fragments, results)


def _topological(fragments, reads, producer, frag_of_op) -> list[Fragment]:
    """Fragments in an order that respects their data dependencies (ties: the schedule order)."""
    deps = {f.name: {frag_of_op[producer[v]] for v in reads[f.name] if v in producer and producer[v] in frag_of_op}
            for f in fragments}
    done, out = set(), []
    while len(out) < len(fragments):
        ready = [f for f in fragments if f.name not in done and deps[f.name] - {f.name} <= done]
        if not ready:
            cycle = [f.name for f in fragments if f.name not in done]
            raise PassError("stage-outlining", f"fragments {cycle} depend on each other in a cycle; the layer "
                            "assignment puts ops of one stage on both sides of another (check the markers)")
        out.append(ready[0])
        done.add(ready[0].name)
    return out


@register
class StageOutlining(Pass):
    name = "stage-outlining"
    summary = "Outline each stage's forward/backward/apply-grad ops into fragment functions called from @main"

    def run(self, module, state):
        stages = state.results.get("stage-construction")
        if stages is None:
            raise PassError(self.name, "no stage assignment: run stage-construction first")
        state.results[self.name] = outline(module, stages.stage_of_layer(), [s.mesh.name for s in stages.stages])

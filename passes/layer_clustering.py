"""layer-clustering: give every op of @main a layer and a phase (forward / backward / apply).

Input: the traced step with its markers (`mark_pipeline_boundary`, or the boundaries that
AutoLayerOption placed at trace time with passes/layer_dp.py; the "loss" marker that
`meshweave.value_and_grad` puts at the end of the forward pass; the "grad" marker on the loss and
gradients). Rules, all by dataflow:
- compute ops are the ancestors of the "grad" marker (every op when there is none); the rest
  are apply-grad ops;
- a forward op's layer is the number of boundary markers it depends on; ops that depend on no
  marker (parameters cast, constants) join the first layer that uses them;
- an op that depends on a backward marker ("loss.bwd", "<boundary>.bwd") is a backward op; its
  layer counts the backward markers crossed from the last layer down, so layer i's backward
  pairs with layer i's forward;
- an apply op follows its largest operand that has a layer (a parameter's update lands on the
  parameter's layer), else the first layer that uses it.
The markers are then removed; producers of the "grad" marker's operands get `mw.accumulate`
(the runtime sums them over micro-batches before apply-grad reads them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register

LAYER = "mw.layer"
PHASE = "mw.phase"
ACCUMULATE = "mw.accumulate"
PHASES = ("forward", "backward", "apply")


@dataclass
class LayerClusteringResult(PassResult):
    num_layers: int
    has_grad_marker: bool
    ops_per_layer: dict[tuple[str, int], int] = field(default_factory=dict)   # (phase, layer) -> op count
    auto: object = None          # passes.layer_dp.LayerClustering when AutoLayerOption chose the cuts

    def explain(self) -> str:
        lines = [f"{self.num_layers} layer(s); {'with' if self.has_grad_marker else 'without'} a grad marker"]
        for layer in range(self.num_layers):
            counts = ", ".join(f"{p} {self.ops_per_layer.get((p, layer), 0)}" for p in PHASES)
            lines.append(f"  layer {layer}: ops {counts}")
        return "\n".join(lines)


def _marker_name(op) -> str:
    d = ir.DictAttr(op.attributes[mw.FRONTEND_ATTRS])
    return ir.StringAttr(d[mw.MARKER_NAME]).value


def _nested_markers(op) -> list:
    found = []
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if mw.marker_kind(inner) is not None:
                    found.append(inner)
                found += _nested_markers(inner.operation)
    return found


def value_bytes(value) -> int:
    """Bytes of a ranked tensor value (0 for anything else: tokens, tuples)."""
    try:
        t = ir.RankedTensorType(value.type)
    except ValueError:
        return 0
    n = 1
    for s in t.shape:
        n *= s
    return n * max(t.element_type.width // 8, 1) if hasattr(t.element_type, "width") else n * 4


def _max(values):
    vals = [v for v in values if v is not None]
    return max(vals) if vals else None


_SIDE_EFFECTS = ("stablehlo.custom_call", "stablehlo.send", "stablehlo.recv", "stablehlo.outfeed",
                 "stablehlo.infeed", "func.call")


def _drop_dead_ops(block) -> int:
    """Remove unused side-effect-free ops (autodiff leaves residuals nothing reads), so no dead op
    is mistaken for apply-grad work."""
    removed = 0
    for op in reversed(list(block.operations)):
        name = op.operation.name
        if name == "func.return" or name in _SIDE_EFFECTS or mw.marker_kind(op) is not None:
            continue
        if all(not list(r.uses) for r in op.results):
            op.operation.erase()
            removed += 1
    return removed


def assign_layers(func, micro_batches: int = 1) -> LayerClusteringResult:
    """Annotate @main's ops with mw.layer / mw.phase and remove the markers (see module docstring)."""
    block = mw.entry_block(func)
    _drop_dead_ops(block)
    ops = [op for op in block.operations if op.operation.name != "func.return"]
    for op in ops:
        nested = _nested_markers(op.operation)
        if nested:
            raise PassError("layer-clustering", f"a {mw.marker_kind(nested[0])} marker sits inside "
                            f"{op.operation.name} (control flow); place mark_pipeline_boundary outside "
                            "loops and conditionals (cut between loop iterations by unrolling the loop)")
    producer = {}
    grad = [i for i, op in enumerate(ops) if mw.marker_kind(op) == "grad"]
    for i, op in enumerate(ops):
        for r, src in zip(op.results, op.operands if i in grad else [None] * len(op.results)):
            # the grad marker is transparent: an apply op reading a gradient follows the gradient's layer
            producer[r] = producer.get(src, i) if src is not None else i
    operand_ops = [[producer[v] for v in op.operands if v in producer] for op in ops]
    if len(grad) > 1:
        raise PassError("layer-clustering", "the step has more than one grad marker (meshweave.grad called twice)")
    compute = [True] * len(ops)
    if grad:
        compute = [False] * len(ops)
        stack = list(operand_ops[grad[0]])
        while stack:
            i = stack.pop()
            if not compute[i]:
                compute[i] = True
                stack += operand_ops[i]
    fwd: list[int | None] = [None] * len(ops)
    bwd: list[int | None] = [None] * len(ops)
    for i, op in enumerate(ops):
        if not compute[i]:
            continue
        kind = mw.marker_kind(op)
        f = _max(fwd[j] for j in operand_ops[i])
        b = _max(bwd[j] for j in operand_ops[i])
        if kind in ("boundary", "loss"):
            backward = _marker_name(op).endswith(".bwd")
            if kind == "loss":
                b = 0 if backward else b
            elif backward:
                b = (b if b is not None else 0) + 1
            elif b is None:
                f = (f if f is not None else 0) + 1
        fwd[i], bwd[i] = f, b
    num_layers = 1 + max([f for f, b in zip(fwd, bwd) if f is not None and b is None] or [0])
    layer: list[int | None] = [None] * len(ops)
    phase = ["apply"] * len(ops)
    for i in range(len(ops)):
        if not compute[i]:
            continue
        if bwd[i] is not None:
            phase[i] = "backward"
            layer[i] = max(num_layers - 1 - bwd[i], 0)
        else:
            phase[i] = "forward"
            layer[i] = fwd[i]
    for i, op in enumerate(ops):        # apply ops follow their largest operand with a layer
        if compute[i] or i in grad:
            continue
        best = None
        for v in op.operands:
            j = producer.get(v)
            if j is not None and layer[j] is not None:
                key = (value_bytes(v), -layer[j])
                if best is None or key > best[0]:
                    best = (key, layer[j])
        out_bytes = max([value_bytes(r) for r in op.results] or [0])
        # Follow a large operand only: a broadcast of a scalar (Adam's bias correction) joins its
        # consumers instead, so only the scalar crosses meshes, not the broadcast tensor.
        layer[i] = best[1] if best and 8 * best[0][0] >= out_bytes else None
    users = [[] for _ in ops]
    for i, deps in enumerate(operand_ops):
        for j in deps:
            users[j].append(i)
    def seen_from_operand(u):
        # a forward boundary marker's operands belong to the layer before the one it starts
        if mw.marker_kind(ops[u]) == "boundary" and bwd[u] is None and layer[u] is not None:
            return layer[u] - 1
        return layer[u]

    for i in reversed(range(len(ops))):     # unplaced ops join the first layer that uses them
        if layer[i] is None:
            layer[i] = min([seen_from_operand(u) for u in users[i] if layer[u] is not None] or [0])
    result = LayerClusteringResult(num_layers, bool(grad))
    with func.context:
        i64 = ir.IntegerType.get_signless(64)
        for i, op in enumerate(ops):
            if mw.marker_kind(op) is not None:
                continue
            op.attributes[LAYER] = ir.IntegerAttr.get(i64, layer[i])
            op.attributes[PHASE] = ir.StringAttr.get(phase[i])
            key = (phase[i], layer[i])
            result.ops_per_layer[key] = result.ops_per_layer.get(key, 0) + 1
        if grad:
            marker = ops[grad[0]]
            acc: dict[int, set[int]] = {}
            for v in marker.operands:
                j = producer.get(v)
                if j is None:
                    continue
                owner = ops[j]
                while mw.marker_kind(owner) is not None:       # a marked value passed straight through
                    idx = list(owner.results).index(v) if v in list(owner.results) else None
                    v = owner.operands[idx]
                    j = producer.get(v)
                    if j is None:
                        break
                    owner = ops[j]
                if j is None:
                    continue
                acc.setdefault(j, set()).add(list(ops[j].results).index(v))
            for j, idxs in acc.items():
                ops[j].attributes[ACCUMULATE] = ir.ArrayAttr.get([ir.IntegerAttr.get(i64, k) for k in sorted(idxs)])
        if grad:
            _mean_over_micro_batches(ops[grad[0]], micro_batches, producer, ops, layer)
    for op in reversed(ops):
        if mw.marker_kind(op) is not None:
            for res, src in zip(op.results, op.operands):
                res.replace_all_uses_with(src)
            op.operation.erase()
    return result


def _mean_over_micro_batches(marker, micro_batches: int, producer, ops, layer) -> None:
    """Each "grad" marker result becomes an apply-phase `operand * (1 / micro_batches)`: the runtime
    sums the marked values over micro-batches, apply-grad reads their mean (losses are means)."""
    from jaxlib.mlir.dialects import stablehlo as hlo

    i64 = ir.IntegerType.get_signless(64)
    with ir.InsertionPoint(marker), marker.location:
        for res, src in zip(marker.results, marker.operands):
            if not list(res.uses):
                continue
            t = ir.RankedTensorType(src.type)
            scale = ir.DenseElementsAttr.get_splat(t, ir.FloatAttr.get(t.element_type, 1.0 / micro_batches))
            c = hlo.ConstantOp(scale)
            m = hlo.MulOp(src, c.result)
            j = producer.get(src)
            for op in (c, m):
                op.attributes[LAYER] = ir.IntegerAttr.get(i64, layer[j] if j is not None else 0)
                op.attributes[PHASE] = ir.StringAttr.get("apply")
            res.replace_all_uses_with(m.result)


@register
class LayerClustering(Pass):
    name = "layer-clustering"
    summary = "Assign every op a pipeline layer and phase (forward/backward/apply) from the markers; drop them"
    options = (
        Option("micro-batches", "int", 1, "micro-batches per step: apply-grad reads the marked values' mean"),
    )

    def run(self, module, state):
        result = assign_layers(mw.main_func(module), self.micro_batches)
        auto = state.options.get("auto_layer_clustering")
        result.auto = auto
        if result.num_layers == 1:
            state.warn("layer-clustering: no layer boundaries found (no mark_pipeline_boundary in the model and "
                       "no AutoLayerOption); the step runs as one pipeline stage")
        state.results[self.name] = result

"""rematerialize: a layer's backward recomputes the layer's forward instead of keeping its residuals.

Runs after `layer-clustering` (mw.layer / mw.phase on every op) and before `stage-outlining`.
For every chosen layer l, each value that a backward op of layer l reads from a forward op of
layer l is recomputed: the forward ops it depends on inside layer l are cloned, tagged
(`mw.layer` = l, `mw.phase` = "backward"), and placed right before the first backward op of the
layer that reads them; the backward ops then read the clones. After outlining, the backward
fragment of such a layer reads only the layer's inputs (parameters, batch values and the
activations crossing into the layer), and the forward fragment exports only what the next layer,
the loss or apply-grad reads. That is Alpa's `remat_layer`: between a micro-batch's forward and its
backward a stage holds the layer-boundary activations only, at the price of a second forward.

Recomputation is exact because StableHLO ops are pure given their operands (dropout through
threefry or rng_bit_generator included). The exceptions are kept as residuals instead of being
recomputed: `stablehlo.rng` (its bits are not a function of its operands) and side-effecting ops
(custom calls marked `has_side_effect`, infeed/outfeed/send/recv).

Which layers: the `layers` option ("all", or a comma list of layer ids), or by default the layers
of every stage `stage-construction` marked `remat` (PipeshardParallel(remat=...) /
AutoLayerOption(remat_layer=True), or the stage DP's choice).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.passes.layer_clustering import ACCUMULATE, LAYER, PHASE
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register
from meshweave.passes.stage_outlining import _captured, _remap_nested

_NOT_RECOMPUTABLE = ("stablehlo.rng", "stablehlo.infeed", "stablehlo.outfeed", "stablehlo.send", "stablehlo.recv")


@dataclass
class RematerializeResult(PassResult):
    layers: tuple[int, ...]                                      # the layers whose forward the backward recomputes
    cloned_ops: dict[int, int] = field(default_factory=dict)     # layer -> forward ops cloned into its backward
    kept: dict[int, list[str]] = field(default_factory=dict)     # layer -> ops kept as residuals (not recomputable)

    def explain(self) -> str:
        if not self.layers:
            return "no layer rematerialized"
        lines = [f"rematerialized layers {list(self.layers)}: the backward recomputes the forward"]
        for layer in self.layers:
            kept = self.kept.get(layer)
            lines.append(f"  layer {layer}: {self.cloned_ops.get(layer, 0)} forward op(s) recomputed"
                         + (f"; kept as residuals (not recomputable): {', '.join(kept)}" if kept else ""))
        return "\n".join(lines)


def recomputable(op) -> bool:
    """Whether running `op` again on the same operands gives the same results."""
    name = op.operation.name
    if name in _NOT_RECOMPUTABLE:
        return False
    if name == "stablehlo.custom_call" and "has_side_effect" in op.attributes \
            and ir.BoolAttr(op.attributes["has_side_effect"]).value:
        return False
    for region in op.regions:
        for block in region.blocks:
            if not all(recomputable(inner) for inner in block.operations):
                return False
    return True


def _reads(op) -> list:
    """The values an op reads: its operands and what its regions capture."""
    return list(op.operands) + _captured(op, set())


def _layer_phase(op) -> tuple[int, str]:
    if LAYER not in op.attributes or PHASE not in op.attributes:
        raise PassError("rematerialize", f"op {op.operation.name} has no mw.layer/mw.phase: run layer-clustering "
                        "first")
    return ir.IntegerAttr(op.attributes[LAYER]).value, ir.StringAttr(op.attributes[PHASE]).value


def rematerialize(module: ir.Module, layers) -> RematerializeResult:
    """Clone each chosen layer's forward into its backward (see the module docstring)."""
    block = mw.entry_block(mw.main_func(module))
    ops = [op for op in block.operations if op.operation.name != "func.return"]
    producer = {r: i for i, op in enumerate(ops) for r in op.results}
    where = [_layer_phase(op) for op in ops]
    chosen = sorted(set(layers))
    result = RematerializeResult(tuple(chosen))
    i64 = ir.IntegerType.get_signless(64, module.context)
    for layer in chosen:
        readers = [i for i, (lay, ph) in enumerate(where) if (lay, ph) == (layer, "backward")]
        needed: set[int] = set()
        kept: list[str] = []

        def visit(values):
            for v in values:
                j = producer.get(v)
                if j is None or where[j] != (layer, "forward") or j in needed:
                    continue
                if recomputable(ops[j]):
                    stack.append(j)
                elif ops[j].operation.name not in kept:
                    kept.append(ops[j].operation.name)

        stack: list[int] = []
        for i in readers:
            visit(_reads(ops[i]))
        while stack:
            j = stack.pop()
            if j not in needed:
                needed.add(j)
                visit(_reads(ops[j]))
        if not needed:
            continue
        originals = {r for j in needed for r in ops[j].results}
        first = next(i for i in readers
                     if any(v in originals for v in _reads(ops[i])))
        mapping = {}
        with ir.InsertionPoint(ops[first]):
            for j in sorted(needed):
                for v in _reads(ops[j]):
                    if v not in originals and v in producer and producer[v] > first:
                        raise PassError("rematerialize", f"layer {layer}: {ops[j].operation.name} reads a value "
                                        "defined after the layer's backward starts; the layer assignment is not in "
                                        "program order (run layer-clustering on the traced step)")
                clone = ops[j].operation.clone()
                for k, v in enumerate(clone.operands):
                    if v in mapping:
                        clone.operands[k] = mapping[v]
                _remap_nested(clone, mapping)
                if ACCUMULATE in clone.attributes:
                    del clone.attributes[ACCUMULATE]
                clone.attributes[PHASE] = ir.StringAttr.get("backward", module.context)
                clone.attributes[LAYER] = ir.IntegerAttr.get(i64, layer)
                for old, new in zip(ops[j].results, clone.results):
                    mapping[old] = new
        for i in readers:
            op = ops[i].operation
            for k, v in enumerate(op.operands):
                if v in mapping:
                    op.operands[k] = mapping[v]
            _remap_nested(op, mapping)
        result.cloned_ops[layer] = len(needed)
        if kept:
            result.kept[layer] = kept
    # Forward ops that only the backward read are dead now (e.g. the cosine of sin's derivative).
    for i in reversed(range(len(ops))):
        if where[i][1] == "forward" and where[i][0] in result.cloned_ops and recomputable(ops[i]) \
                and ops[i].results and not any(any(True for _ in r.uses) for r in ops[i].results):
            ops[i].operation.erase()
    return result


def _parse_layers(text: str, num_layers: int) -> list[int]:
    if text.strip() == "all":
        return list(range(num_layers))
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PassError("rematerialize", f"layers={text!r}: expected 'all' or a comma list of layer ids") from None
    bad = [x for x in out if not 0 <= x < num_layers]
    if bad:
        raise PassError("rematerialize", f"layers={text!r}: layer(s) {bad} do not exist (the step has layers "
                        f"0..{num_layers - 1})")
    return out


@register
class Rematerialize(Pass):
    name = "rematerialize"
    summary = "Recompute a layer's forward in its backward instead of keeping the forward's residuals"
    options = (
        Option("layers", "str", "", "'all', a comma list of layer ids, or empty: the layers of the stages "
               "stage-construction marked remat"),
    )

    def run(self, module, state):
        clustering = state.results.get("layer-clustering")
        if clustering is None:
            raise PassError(self.name, "no layers: run layer-clustering first")
        if self.layers.strip():
            layers = _parse_layers(self.layers, clustering.num_layers)
        else:
            stages = state.results.get("stage-construction")
            layers = [layer for s in (stages.stages if stages is not None else ())
                      if getattr(s, "remat", False) for layer in range(*s.layers)]
        state.results[self.name] = rematerialize(module, layers)

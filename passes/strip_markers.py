"""strip-markers: remove meshweave's marker ops (grad / pipeline boundary) before XLA compiles."""
from __future__ import annotations

from dataclasses import dataclass

from meshweave.dialects import meshweave as mw
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Pass, register


@dataclass
class StripMarkersResult(PassResult):
    removed: int      # marker ops replaced by their operands

    def explain(self) -> str:
        return f"removed {self.removed} marker op(s)"


def _strip(op) -> int:
    n = 0
    for region in op.regions:
        for block in region.blocks:
            for inner in list(block.operations):
                n += _strip(inner.operation)
                if mw.marker_kind(inner) is not None:
                    for res, src in zip(inner.results, inner.operands):
                        res.replace_all_uses_with(src)
                    inner.operation.erase()
                    n += 1
    return n


@register
class StripMarkers(Pass):
    name = "strip-markers"
    summary = "Replace meshweave marker ops (mw.grad, pipeline boundaries) by their operands"

    def run(self, module, state):
        state.results[self.name] = StripMarkersResult(_strip(module.operation))

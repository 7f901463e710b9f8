"""inline-calls: inline every func.call so later passes see one flat @main."""
from __future__ import annotations

from jaxlib.mlir import ir
from jaxlib.mlir.passmanager import PassManager

from meshweave.dialects import meshweave as mw
from meshweave.passes.registry import Pass, PassError, register
from meshweave.plugin.jax_adapter import inline_func_call


def _calls(op, out):
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if inner.operation.name == "func.call":
                    out.append(inner)
                _calls(inner.operation, out)
    return out


@register
class InlineCalls(Pass):
    name = "inline-calls"
    summary = "Inline all func.call ops (jax emits private funcs for relu, softmax, ...) and drop dead funcs"

    def run(self, module, state):
        funcs = mw.funcs(module)
        # Inline bottom-up until no call remains; bounded by the call-graph depth.
        for _ in range(64):
            calls = _calls(mw.main_func(module).operation, [])
            if not calls:
                break
            with module.context, ir.Location.unknown():
                for call in calls:
                    callee = funcs.get(ir.FlatSymbolRefAttr(call.attributes["callee"]).value)
                    if callee is None or not callee.regions[0].blocks:
                        raise PassError(self.name, f"call to an undefined or external function: {call}")
                    with ir.InsertionPoint(call):
                        results = inline_func_call(callee, call.operands)
                    for old, new in zip(call.results, results):
                        old.replace_all_uses_with(new)
                    call.operation.erase()
        else:
            raise PassError(self.name, "call graph deeper than 64 levels (recursive functions?)")
        PassManager.parse("builtin.module(symbol-dce)", context=module.context).run(module.operation)

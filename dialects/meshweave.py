"""meshweave's own IR vocabulary: discardable attributes and marker ops the upstream dialects lack.

Everything here is an attribute in the `mw.` namespace (no C++ dialect is needed: discardable
attributes verify in any context) or a marked `stablehlo.optimization_barrier`.

Attributes
  on func arguments
    mw.arg_path   : string   pytree path of the flat argument, e.g. "args[0]['params']['w1']"
    mw.batch_dim  : i64      the argument carries the batch along this dimension
    mw.donated    : unit     the argument's buffer is donated (its result keeps the input sharding)
    mw.pinned_sharding : #sdy.sharding   a hand-written layout (ManualShardingOption) auto-sharding keeps
  on func results
    mw.result_path: string   pytree path of the flat result
    mw.keeps_arg  : i64      the result is the new value of this argument (state in, state out):
                             the planner gives it the argument's sharding
    mw.pinned_sharding : #sdy.sharding   a hand-written layout for the result (the planner reshards to it)
  on operations
    mw.strategy   : string   the sharding strategy the planner chose (for dumps and explain)
Markers
  stablehlo.optimization_barrier {mhlo.frontend_attributes = {mw.marker = KIND, mw.name = NAME}}
    KIND "grad": the gradient boundary (`mw.grad`); "boundary": a pipeline layer boundary;
    "loss": the end of the forward pass (its backward twin, NAME "loss.bwd", starts the backward).
    They are identities; the `strip-markers` pass removes them before XLA compiles the module.
"""
from __future__ import annotations

from jaxlib.mlir import ir

ARG_PATH = "mw.arg_path"
BATCH_DIM = "mw.batch_dim"
DONATED = "mw.donated"
PINNED_SHARDING = "mw.pinned_sharding"
RESULT_PATH = "mw.result_path"
KEEPS_ARG = "mw.keeps_arg"
STRATEGY = "mw.strategy"
GRADIENT_SUM = "mw.gradient_sum"     # a dot/reduce whose sum over the batch a pipeline reduces once per step
MARKER = "mw.marker"
MARKER_NAME = "mw.name"
MARKER_KINDS = ("grad", "boundary", "loss")
SDY_SHARDING = "sdy.sharding"
FRONTEND_ATTRS = "mhlo.frontend_attributes"


# ----------------------------------------------------------------------------- functions
def funcs(module: ir.Module) -> dict[str, ir.OpView]:
    return {op.sym_name.value: op for op in module.body.operations if op.operation.name == "func.func"}


def main_func(module: ir.Module) -> ir.OpView:
    """The entry function: @main, or the only public func."""
    fs = funcs(module)
    if "main" in fs:
        return fs["main"]
    public = [f for f in fs.values()
              if "sym_visibility" not in f.attributes or ir.StringAttr(f.attributes["sym_visibility"]).value == "public"]
    if len(public) == 1:
        return public[0]
    raise ValueError(f"module has no @main function (functions: {sorted(fs)})")


def entry_block(func: ir.OpView) -> ir.Block:
    return func.regions[0].blocks[0]


def _dicts(array_attr) -> list[dict[str, ir.Attribute]]:
    out = []
    for a in array_attr:
        d = ir.DictAttr(a)
        out.append({d[i].name: d[i].attr for i in range(len(d))})
    return out


def arg_attr_dicts(func: ir.OpView) -> list[dict[str, ir.Attribute]]:
    n = len(entry_block(func).arguments)
    if "arg_attrs" not in func.attributes:
        return [{} for _ in range(n)]
    return _dicts(func.arg_attrs)


def result_attr_dicts(func: ir.OpView) -> list[dict[str, ir.Attribute]]:
    n = len(ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).results)
    if "res_attrs" not in func.attributes:
        return [{} for _ in range(n)]
    return _dicts(func.res_attrs)


def set_arg_attr_dicts(func: ir.OpView, dicts) -> None:
    with func.context:
        func.attributes["arg_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in dicts])


def set_result_attr_dicts(func: ir.OpView, dicts) -> None:
    with func.context:
        func.attributes["res_attrs"] = ir.ArrayAttr.get([ir.DictAttr.get(d) for d in dicts])


def string_attr(value: str, context=None) -> ir.Attribute:
    return ir.StringAttr.get(value, context=context)


def i64_attr(value: int, context=None) -> ir.Attribute:
    return ir.IntegerAttr.get(ir.IntegerType.get_signless(64, context=context), value)


def attr_value(attr: ir.Attribute):
    """Python value of a string / integer / bool / unit attribute."""
    if isinstance(attr, ir.StringAttr):
        return attr.value
    if isinstance(attr, ir.BoolAttr):
        return attr.value
    if isinstance(attr, ir.IntegerAttr):
        return attr.value
    if isinstance(attr, ir.UnitAttr):
        return True
    return str(attr)


# ----------------------------------------------------------------------------- markers
def marker_kind(op) -> str | None:
    """KIND of a meshweave marker op, or None for any other op."""
    if op.operation.name != "stablehlo.optimization_barrier" or FRONTEND_ATTRS not in op.attributes:
        return None
    d = ir.DictAttr(op.attributes[FRONTEND_ATTRS])
    if MARKER not in d:
        return None
    return ir.StringAttr(d[MARKER]).value


def frontend_marker_attrs(kind: str, name: str) -> dict[str, str]:
    if kind not in MARKER_KINDS:
        raise ValueError(f"unknown marker kind {kind!r}; expected one of {MARKER_KINDS}")
    return {MARKER: kind, MARKER_NAME: name}

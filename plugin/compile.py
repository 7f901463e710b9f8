"""Compiling a pass-transformed module for its mesh through jax/XLA (Shardy partitioner)."""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import TensorSharding
from meshweave.plugin.jax_adapter import replace_lowered_module


def arg_shardings(module) -> list[TensorSharding | None]:
    main = mw.main_func(module)
    return [TensorSharding.from_attr(d[mw.SDY_SHARDING]) if mw.SDY_SHARDING in d else None
            for d in mw.arg_attr_dicts(main)]


def result_shardings(module) -> list[TensorSharding | None]:
    main = mw.main_func(module)
    return [TensorSharding.from_attr(d[mw.SDY_SHARDING]) if mw.SDY_SHARDING in d else None
            for d in mw.result_attr_dicts(main)]


def named_sharding(ts: TensorSharding | None, mesh: Mesh) -> NamedSharding:
    if ts is not None and ts.unreduced:
        mesh = explicit_mesh(mesh)
    return NamedSharding(mesh, ts.partition_spec() if ts is not None else PartitionSpec())


def explicit_mesh(mesh: Mesh) -> Mesh:
    """`mesh` with Explicit axes: jax only accepts unreduced (partial-sum) shardings on those."""
    from jax.sharding import AxisType

    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names))


def compile_single_mesh(step, module, mesh: Mesh) -> jax.stages.Compiled:
    """Compile `module` (same signature as the traced step) for `mesh`; keeps jit's calling convention.

    Argument shardings are read from the module (@main's sdy.sharding); results the passes left
    unsharded are chosen by XLA and read back from the executable.
    """
    in_sh = [named_sharding(ts, mesh) for ts in arg_shardings(module)]
    res = result_shardings(module)
    out_sh = None
    if all(r is not None for r in res):
        out_sh = [named_sharding(ts, mesh) for ts in res]
    return replace_lowered_module(step.lowered, module, in_sh, out_sh).compile()

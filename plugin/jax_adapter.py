"""The one place where meshweave touches private jax APIs.

Everything else uses public jax / jaxlib.mlir. Each function names the private objects it
uses; when a jax upgrade breaks one, this file is the whole blast radius. Verified on jax
0.10.2 (Python 3.11) and written to the 0.11.x signatures (see shared notes §10).
"""
from __future__ import annotations

import copy

import jax
from jaxlib.mlir import ir


def inline_func_call(callee: ir.OpView, operands) -> list[ir.Value]:
    """Clone callee's body at the current insertion point; returns the values it returns.

    Private: `jax._src.lib.jax_mlir_ext.inlined_func_call` (jax's own C++ inliner; the upstream
    `inline` pass is a no-op in jaxlib because the func inliner interface is not registered).
    """
    from jax._src.lib import jax_mlir_ext

    return list(jax_mlir_ext.inlined_func_call(callee.operation, list(operands)))


def replace_lowered_module(lowered: jax.stages.Lowered, module: ir.Module, in_shardings,
                           out_shardings=None) -> jax.stages.Lowered:
    """A `Lowered` that compiles `module` instead of the traced one, keeping jit's calling
    convention (pytrees, donation, argument checks, NamedSharding outputs).

    `module` must have the same signature as the traced module; `in_shardings` are the flat
    jax shardings of its arguments (XLA's choice is checked against them). `out_shardings`
    None lets jax read the output shardings from the compiled executable.

    Private: `Lowered._lowering` (pxla.MeshComputation) and its `_hlo`, `_executable`,
    `compile_args`; the `stages.Lowered` constructor.
    """
    from jax._src import stages

    comp = copy.copy(lowered._lowering)
    comp._hlo = module
    comp._executable = None
    comp.compile_args = dict(comp.compile_args)
    comp.compile_args["in_shardings"] = tuple(in_shardings)
    if out_shardings is not None:
        comp.compile_args["out_shardings"] = tuple(out_shardings)
    return stages.Lowered(comp, lowered.args_info, lowered.out_tree, lowered._no_kwargs,
                          lowered._in_types, lowered._out_types)


def lowered_module_text(lowered: jax.stages.Lowered) -> str:
    """StableHLO text of a lowering without touching jit's cached module object."""
    return lowered.as_text(debug_info=True)   # keep locations: XLA metadata then names the source op


def compile_text_for_devices(mlir_text: str, devices) -> object:
    """Compile a StableHLO module (text, sdy shardings, `num_partitions == len(devices)`) for
    `devices`, in the order of the module's mesh; returns a PJRT `LoadedExecutable`.

    Used where a program arrives as text in another process (Ray workers): the executable is
    built for that process's device ids. Private: `xla_client.DeviceList`.
    """
    import numpy as np
    import jax.extend.backend as jeb
    from jax._src.lib import xla_client as xc

    devices = tuple(devices)
    opts = jeb.get_compile_options(num_replicas=1, num_partitions=len(devices),
                                   device_assignment=np.array([d.id for d in devices]).reshape(1, -1))
    opts.executable_build_options.use_spmd_partitioning = True
    opts.executable_build_options.use_shardy_partitioner = True
    return devices[0].client.compile_and_load(mlir_text, xc.DeviceList(devices), opts)


def executable_shardings(executable, devices, named: list, ndims: list[int], *, outputs: bool) -> list:
    """The jax shardings of a raw executable's parameters (or outputs): `named[i]` (a
    NamedSharding the caller expects) where XLA agrees, else the sharding XLA chose.

    Private: `xla_client.HloSharding`, `NamedSharding._to_xla_hlo_sharding`, `GSPMDSharding`.
    """
    from jax._src import sharding_impls
    from jax._src.lib import xla_client as xc

    protos = executable.get_output_shardings() if outputs else executable.get_parameter_shardings()
    result = []
    for proto, ns, nd in zip(protos, named, ndims):
        hlo = xc.HloSharding.from_proto(proto)
        if ns is not None and ns._to_xla_hlo_sharding(nd) == hlo:
            result.append(ns)
        elif ns is not None and getattr(ns.spec, "unreduced", None):
            # A partial sum the module declares (sdy unreduced); XLA reports it without that
            # mark, and a GSPMDSharding would read the summands as replicas of one value.
            result.append(ns)
        else:
            result.append(sharding_impls.GSPMDSharding(tuple(devices), hlo))
    return result

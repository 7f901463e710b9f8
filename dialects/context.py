"""MLIR context set-up: every dialect a meshweave module may contain, loaded once per context.

jax's own `make_ir_context()` reuses a thread-local context on newer jax versions; passes
mutate modules, so meshweave always parses into a context of its own.
"""
from __future__ import annotations

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import chlo, mhlo, mpmd, sdy, stablehlo
from jax.extend.lowering import upstream_dialects

_PASSES_REGISTERED = False


def make_context() -> ir.Context:
    """A fresh context with func/arith/... plus stablehlo, chlo, mhlo, sdy and mpmd loaded."""
    global _PASSES_REGISTERED
    ctx = ir.Context()
    ctx.append_dialect_registry(upstream_dialects)
    ctx.load_all_available_dialects()
    stablehlo.register_dialect(ctx)
    sdy.register_dialect(ctx)
    chlo.register_dialect(ctx)
    mhlo.register_mhlo_dialect(ctx)
    mpmd.register_dialect(ctx)
    if not _PASSES_REGISTERED:
        stablehlo.register_stablehlo_passes()
        _PASSES_REGISTERED = True
    return ctx


def parse_module(text: str | bytes, context: ir.Context | None = None) -> ir.Module:
    """Parse MLIR text or bytecode into a private module (a new context unless one is given)."""
    return ir.Module.parse(text, context=context or make_context())

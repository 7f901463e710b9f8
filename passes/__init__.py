"""meshweave's passes. Nothing is imported up front: `meshweave.passes.solver` needs neither jax
nor MLIR, and a pass module loads when a pipeline names it (registry.PASS_MODULES)."""
from __future__ import annotations

import importlib

_EXPORTS = {
    "Pipeline": "meshweave.passes.pipeline", "PipelineState": "meshweave.passes.pipeline",
    "parse_pipeline": "meshweave.passes.pipeline",
    "REGISTRY": "meshweave.passes.registry", "PASS_MODULES": "meshweave.passes.registry",
    "Pass": "meshweave.passes.registry", "PassError": "meshweave.passes.registry",
    "PassOptionError": "meshweave.passes.registry", "create_pass": "meshweave.passes.registry",
    "get_pass": "meshweave.passes.registry", "list_passes": "meshweave.passes.registry",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshweave.passes' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

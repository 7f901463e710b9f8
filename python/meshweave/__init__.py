"""meshweave: automatic parallelization of JAX steps over device meshes (intra-op ILP, StableHLO passes).

Public API (DESIGN.md, "Public API contract"):
    parallelize, ParallelizedFunc, Executable, Plan
    ShardParallel, DataParallel, Zero2Parallel, Zero3Parallel, AutoShardingOption, ManualShardingOption
    plan, ClusterSpec (plan for a cluster that is not here)
    grad, value_and_grad, mark_pipeline_boundary
    init, shutdown (select the runtime backend: "local"; "ray" where meshweave.runtime.ray provides one)

Names load on first use (PEP 562), so tools that need no jax — `meshweave-solve`, the solver
library — start without importing it.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "parallelize": "meshweave.api", "ParallelizedFunc": "meshweave.api", "ParallelizeError": "meshweave.driver",
    "Executable": "meshweave.executable", "Plan": "meshweave.parallel_plan",
    "grad": "meshweave.markers", "value_and_grad": "meshweave.markers",
    "mark_pipeline_boundary": "meshweave.markers",
    "AutoShardingOption": "meshweave.methods", "MemoryPrice": "meshweave.methods", "ManualShardingOption": "meshweave.methods", "DataParallel": "meshweave.methods",
    "MethodError": "meshweave.methods", "ParallelMethod": "meshweave.methods",
    "ShardParallel": "meshweave.methods", "Zero2Parallel": "meshweave.methods", "Zero3Parallel": "meshweave.methods",
    "PipeshardParallel": "meshweave.methods", "AutoLayerOption": "meshweave.methods",
    "ManualLayerOption": "meshweave.methods", "UniformStageOption": "meshweave.methods",
    "ManualStageOption": "meshweave.methods",
    "ClusterSpec": "meshweave.planning", "PlanResult": "meshweave.planning", "plan": "meshweave.planning",
    "ArgumentError": "meshweave.plugin.arguments",
    "init": "meshweave.cluster", "shutdown": "meshweave.cluster", "ClusterError": "meshweave.cluster",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'meshweave' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))

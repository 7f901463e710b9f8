"""meshweave: automatic parallelization of JAX steps over device meshes (intra-op ILP, StableHLO passes).

Public API (DESIGN.md, "Public API contract"):
    parallelize, ParallelizedFunc, Executable, Plan
    DataParallel, AutoShardingOption
    grad, value_and_grad, mark_pipeline_boundary
"""
from meshweave.api import ParallelizedFunc, ParallelizeError, parallelize
from meshweave.executable import Executable
from meshweave.markers import grad, mark_pipeline_boundary, value_and_grad
from meshweave.methods import AutoShardingOption, DataParallel, MethodError, ParallelMethod
from meshweave.plan import Plan
from meshweave.plugin.lowering import ArgumentError

__version__ = "0.1.0"

__all__ = [
    "parallelize", "ParallelizedFunc", "ParallelizeError", "Executable", "Plan",
    "DataParallel", "AutoShardingOption", "ParallelMethod", "MethodError", "ArgumentError",
    "grad", "value_and_grad", "mark_pipeline_boundary",
]

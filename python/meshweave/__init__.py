"""meshweave: automatic parallelization of JAX steps over device meshes (intra-op ILP, StableHLO passes).

Public API (DESIGN.md, "Public API contract"):
    parallelize, ParallelizedFunc, Executable, Plan
    ShardParallel, DataParallel, Zero2Parallel, Zero3Parallel, AutoShardingOption
    plan, ClusterSpec (plan for a cluster that is not here)
    grad, value_and_grad, mark_pipeline_boundary
"""
from meshweave.api import ParallelizedFunc, ParallelizeError, parallelize
from meshweave.executable import Executable
from meshweave.markers import grad, mark_pipeline_boundary, value_and_grad
from meshweave.methods import (AutoShardingOption, DataParallel, MethodError, ParallelMethod, ShardParallel,
                               Zero2Parallel, Zero3Parallel)
from meshweave.planning import ClusterSpec, PlanResult, plan
from meshweave.plan import Plan
from meshweave.plugin.lowering import ArgumentError

__version__ = "0.1.0"

__all__ = [
    "parallelize", "ParallelizedFunc", "ParallelizeError", "Executable", "Plan",
    "ShardParallel", "DataParallel", "Zero2Parallel", "Zero3Parallel", "AutoShardingOption", "ParallelMethod",
    "MethodError", "ArgumentError", "plan", "ClusterSpec", "PlanResult",
    "grad", "value_and_grad", "mark_pipeline_boundary",
]

"""`plan`: plan a step for a cluster that is not here (no devices, no execution).

The step is traced with abstract arguments (`jax.ShapeDtypeStruct`s or arrays) and run through
the method's pass pipeline on a logical mesh of the cluster's shape; the cost model's α-β terms
come from the cluster's link latency and bandwidth and its compute term from `device_flops`; the
result splits the ILP's objective into communication and compute time.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from meshweave.dialects.sharding import MeshSpec


@dataclass(frozen=True)
class ClusterSpec:
    """A cluster of `num_hosts` x `devices_per_host` devices.

    Bandwidths in bytes/s per device link; latency in seconds (`inter_host_latency`, when set, for
    axes that cross hosts); `device_flops` (FLOP/s) turns the step's FLOPs into a compute-time
    estimate (an achievable rate, not the datasheet peak: `peak_flops` is kept for reporting % of
    peak); `device_memory` (bytes), when set, is the capacity the stage DP enforces. The logical
    mesh defaults to (hosts, devices/host): axis 0 crosses hosts, axis 1 stays inside one.
    `ClusterSpec.preset("h100" | "p3", num_gpus)` gives the benchmark clusters (meshweave.clusters).
    """

    num_hosts: int = 1
    devices_per_host: int = 8
    inter_host_bandwidth: float = 25e9 / 8
    intra_host_bandwidth: float = 150e9
    latency: float = 5e-6
    device_flops: float = 300e12
    mesh_shape: tuple[int, ...] | None = None
    device_memory: float | None = None
    inter_host_latency: float | None = None
    peak_flops: float | None = None
    name: str = ""

    @classmethod
    def preset(cls, name: str, num_gpus: int) -> "ClusterSpec":
        from meshweave.clusters import preset

        return preset(name, num_gpus)

    def __post_init__(self):
        if self.num_hosts < 1 or self.devices_per_host < 1:
            raise ValueError("ClusterSpec needs at least one host and one device per host")
        if self.mesh_shape is not None and math.prod(self.mesh_shape) != self.num_devices:
            raise ValueError(f"ClusterSpec.mesh_shape {self.mesh_shape} does not have {self.num_devices} devices")

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.devices_per_host

    def logical_mesh(self) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float, ...]]:
        """(shape, alpha, beta): an axis that spans hosts uses the inter-host link."""
        shape = tuple(self.mesh_shape) if self.mesh_shape else (self.num_hosts, self.devices_per_host)
        alpha, beta, inner = [], [], 1
        for size in reversed(shape):
            inner *= size
            crosses = inner > self.devices_per_host and size > 1
            alpha.append(self.inter_host_latency if crosses and self.inter_host_latency is not None
                         else self.latency)
            beta.append(1.0 / (self.inter_host_bandwidth if crosses else self.intra_host_bandwidth))
        return shape, tuple(reversed(alpha)), tuple(reversed(beta))


@dataclass
class PlanResult:
    mesh: MeshSpec
    pipeline: str
    objective: float                 # the solver's objective less its compute part (communication time, s)
    predicted_step_time: float       # communication + compute estimate (s)
    compute_time: float
    auto_sharding: object = None     # passes.auto_sharding.AutoShardingResult (problem, graph, solver, explain)
    arg_shardings: list = field(default_factory=list)
    ir_text: str = ""
    warnings: list = field(default_factory=list)
    stages: object = None            # PipeshardParallel: passes.stage_construction.StageConstructionResult
    layers: object = None            # PipeshardParallel: passes.layer_clustering.LayerClusteringResult
    timings: dict = field(default_factory=dict)   # PipeshardParallel: seconds per planning phase
    micro_batch_search: list = field(default_factory=list)   # PipeshardParallel search: MicroBatchTry per count tried

    @property
    def memory_per_device(self) -> float | None:
        """PipeshardParallel: the most bytes a device of any stage holds (parameters, optimizer state,
        gradient accumulators, activations of its micro-batches in flight; the stage DP's account),
        for automatic and hand-given stages alike; None when not priced."""
        stages = getattr(self.stages, "stages", None)
        if not stages or any(s.memory is None for s in stages):
            return None
        return max(s.memory for s in stages)

    @property
    def problem(self):
        """The auto-sharding ShardingProblem (re-solve it, or write it as IOPDDL)."""
        return self.auto_sharding.problem if self.auto_sharding is not None else None

    def explain(self) -> str:
        return (f"mesh {self.mesh}\npipeline {self.pipeline}\npredicted step time {self.predicted_step_time:.6g} s "
                f"(communication {self.objective:.6g} s, compute {self.compute_time:.6g} s)\n"
                + (self.auto_sharding.explain() if self.auto_sharding is not None else "")
                + (self.layers.explain() + "\n" if self.layers is not None else "")
                + (self.stages.explain() if self.stages is not None else "")
                + "".join(f"\nwarning: {w}" for w in self.warnings))


def plan(fun, *args, method=None, cluster: ClusterSpec | None = None, static_argnums=(), donate_argnums=(),
         batch_argnums=(1,), batch_argnames=(), **kwargs) -> PlanResult:
    """Plan `fun(*args, **kwargs)` for `cluster` with `method` (ShardParallel by default); runs nothing."""
    from meshweave.driver import plan_step
    from meshweave.methods import ShardParallel
    from meshweave.plugin.arguments import ArgumentSpec
    from meshweave.plugin.compile import arg_shardings
    from meshweave.passes.pipeline import module_text

    cluster = cluster or ClusterSpec()
    method = method or ShardParallel()
    from meshweave.methods import PipeshardParallel

    if isinstance(method, PipeshardParallel):
        from meshweave.pipeshard import plan_pipeline

        call = ArgumentSpec.create(fun, static_argnums=static_argnums, donate_argnums=donate_argnums,
                                   batch_argnums=batch_argnums, batch_argnames=batch_argnames).bind(args, kwargs)
        return plan_pipeline(fun, call, method, cluster)
    shape, alpha, beta = cluster.logical_mesh()
    if method.mesh_shape is not None:
        shape = tuple(method.mesh_shape)
        if math.prod(shape) != cluster.num_devices:
            raise ValueError(f"method mesh_shape {shape} does not have the cluster's {cluster.num_devices} devices")
        _, alpha, beta = dataclasses.replace(cluster, mesh_shape=shape).logical_mesh()
    opt = getattr(method, "auto_sharding", None)
    if opt is not None and opt.alpha is None and opt.beta is None:
        method = dataclasses.replace(method, auto_sharding=dataclasses.replace(
            opt, alpha=alpha, beta=beta, device_flops=opt.device_flops or cluster.device_flops))
    spec = MeshSpec.from_shape(shape, method.axis_names)
    call = ArgumentSpec.create(fun, static_argnums=static_argnums, donate_argnums=donate_argnums,
                               batch_argnums=batch_argnums, batch_argnames=batch_argnames).bind(args, kwargs)
    planned = plan_step(fun, call, method, spec, mesh=None, record_ir=False)
    auto = planned.state.results.get("auto-sharding")
    if auto is not None and auto.compute_priced:     # the ILP chose (and priced) how the FLOPs split
        compute, objective = auto.compute_cost, float(auto.communication_cost)
    else:
        flops = sum(r.flops for r in auto.graph.ops) if auto is not None else 0.0
        compute = flops / cluster.num_devices / cluster.device_flops
        objective = float(auto.objective) if auto is not None else 0.0
    return PlanResult(spec, planned.pipeline.spec(), objective, objective + compute, compute, auto,
                      [s.short() if s else None for s in arg_shardings(planned.module)], module_text(planned.module),
                      list(planned.state.warnings))

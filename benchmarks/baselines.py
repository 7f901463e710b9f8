"""Hand-parallelized baselines priced with the planner's own cluster model.

Data parallel, ZeRO-2, ZeRO-3 and Megatron-style dp x tp x pp (searched exhaustively over the
three degrees, the micro-batch count and full activation recomputation on or off) are priced analytically from quantities measured on the
traced program (`ModelStats`: dot FLOPs of the step, parameter bytes, per-layer activation bytes)
with the same α-β collectives (`passes/cost_model.LogicalMesh` on the cluster's links), the same
compute rate (matmul FLOPs at `ClusterSpec.device_flops`), the same pipeline objective
(`stage_dp.pipeline_objective`) and the same memory accounting (4x parameter bytes: weights,
gradients, two Adam moments, plus activations in flight) as the automatic plan. No overlap of
communication with compute is assumed anywhere. A configuration that does not fit
`ClusterSpec.device_memory` is reported as out of memory, not priced.

These are not Megatron's or DeepSpeed's programs run through the compiler (that needs manual
shardings in `mw.plan`); they are the textbook cost of those layouts in the same model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.cost_model import LogicalMesh
from meshweave.passes.stage_dp import in_flight, pipeline_objective
from meshweave.planning import ClusterSpec


@dataclass(frozen=True)
class ModelStats:
    """What the baselines need to know about one training step (global batch)."""

    step_flops: float                  # matmul FLOPs of forward + backward at the global batch
    param_bytes: float                 # all parameters
    layer_param_bytes: tuple           # per pipeline layer
    activation_bytes_per_sample: float  # forward->backward bytes of all layers, one sample
    boundary_bytes_per_sample: float   # activation crossing a layer boundary, one sample
    tp_allreduce_bytes_per_sample: float  # per layer: Megatron's 2 forward + 2 backward all-reduces, summed
    num_layers: int
    global_batch: int
    tensor_parallel: bool = True       # Megatron-style tensor parallelism applies to the model
    expert_param_bytes: float = 0.0    # MoE: experts' weights
    all_to_all_bytes_per_sample: float = 0.0   # MoE: dispatched tokens of one layer, one sample
    moe_layers: int = 0
    experts: int = 0


@dataclass
class BaselinePlan:
    method: str
    config: str                        # e.g. "dp=2 tp=4 pp=2 mb=64"
    step_time: float | None            # None: does not fit memory
    memory_per_device: float
    fits: bool
    compute_time: float = 0.0
    communication_time: float = 0.0


def group_collective(cluster: ClusterSpec, kind: str, nbytes: float, n: int, spans_hosts: bool) -> float:
    """One collective over a group of n devices (inside one host, or across hosts), in seconds."""
    if n <= 1:
        return 0.0
    hosts = max(2, math.ceil(n / cluster.devices_per_host)) if spans_hosts else 1
    c = dataclasses.replace(cluster, num_hosts=hosts, devices_per_host=max(1, n // hosts), mesh_shape=(n,))
    shape, alpha, beta = c.logical_mesh()
    mesh = LogicalMesh.create(MeshSpec.from_shape(shape), alpha, beta)
    axes = mesh.mesh.axis_names
    cost = {"all-reduce": mesh.all_reduce, "reduce-scatter": mesh.reduce_scatter,
            "all-gather": mesh.all_gather, "all-to-all": mesh.all_to_all}[kind](nbytes, axes)
    return mesh.to_user_units(cost)


def _micro_batch_counts(per_replica: int):
    return [k for k in range(1, per_replica + 1) if per_replica % k == 0]


def _fit_data_parallel(name, stats, cluster, state_bytes, comm_per_step, comm_per_micro_batch, extra_memory=0.0):
    """The fastest micro-batch count that fits memory for a data-parallel family method."""
    n = cluster.num_devices
    if stats.global_batch % n:
        return BaselinePlan(name, f"dp={n}", None, float("inf"), False)
    compute = stats.step_flops / n / cluster.device_flops
    best = None
    for k in _micro_batch_counts(stats.global_batch // n):
        samples = stats.global_batch // n // k
        memory = state_bytes + extra_memory + samples * stats.activation_bytes_per_sample
        comm = comm_per_step + k * comm_per_micro_batch
        plan = BaselinePlan(name, f"dp={n} mb={k}", compute + comm, memory, memory <= _capacity(cluster),
                            compute, comm)
        if plan.fits:
            return plan              # fewest micro-batches that fit: the least communication
        best = best or plan
    best.step_time = None
    return best


def _capacity(cluster: ClusterSpec) -> float:
    return cluster.device_memory if cluster.device_memory is not None else float("inf")


def data_parallel(stats: ModelStats, cluster: ClusterSpec) -> BaselinePlan:
    n, p = cluster.num_devices, stats.param_bytes
    sync = group_collective(cluster, "all-reduce", p, n, n > cluster.devices_per_host)
    return _fit_data_parallel("data parallel", stats, cluster, 4 * p, sync, 0.0)


def zero2(stats: ModelStats, cluster: ClusterSpec) -> BaselinePlan:
    """Gradients reduce-scattered every micro-batch, optimizer state sharded, parameters replicated
    and all-gathered once after the update."""
    n, p = cluster.num_devices, stats.param_bytes
    cross = n > cluster.devices_per_host
    rs = group_collective(cluster, "reduce-scatter", p, n, cross)
    ag = group_collective(cluster, "all-gather", p, n, cross)
    return _fit_data_parallel("ZeRO-2", stats, cluster, p + 3 * p / n, ag, rs, extra_memory=p)


def zero3(stats: ModelStats, cluster: ClusterSpec) -> BaselinePlan:
    """Parameters sharded too: all-gathered for the forward and again for the backward of every
    micro-batch, gradients reduce-scattered."""
    n, p = cluster.num_devices, stats.param_bytes
    cross = n > cluster.devices_per_host
    rs = group_collective(cluster, "reduce-scatter", p, n, cross)
    ag = group_collective(cluster, "all-gather", p, n, cross)
    return _fit_data_parallel("ZeRO-3", stats, cluster, 4 * p / n, 0.0, rs + 2 * ag,
                              extra_memory=max(stats.layer_param_bytes, default=0.0))


def expert_parallel_zero2(stats: ModelStats, cluster: ClusterSpec) -> BaselinePlan:
    """DeepSpeed-MoE style: experts split over min(experts, devices) devices, everything else ZeRO-2
    data parallel; per MoE layer and micro-batch two all-to-alls forward and two backward."""
    n = cluster.num_devices
    ep = math.gcd(stats.experts, n)
    cross = n > cluster.devices_per_host
    dense = stats.param_bytes - stats.expert_param_bytes
    rs = group_collective(cluster, "reduce-scatter", dense, n, cross)
    ag = group_collective(cluster, "all-gather", dense, n, cross)
    expert_sync = group_collective(cluster, "all-reduce", stats.expert_param_bytes / ep, n // ep, cross and ep < n
                                   and ep < cluster.devices_per_host)
    samples_per_device = stats.global_batch // n if stats.global_batch % n == 0 else 0
    best = None
    for k in _micro_batch_counts(max(samples_per_device, 1)):
        samples = samples_per_device // k
        a2a = 4 * stats.moe_layers * group_collective(cluster, "all-to-all", samples
                                                      * stats.all_to_all_bytes_per_sample, ep, ep > cluster.devices_per_host)
        memory = dense + 3 * dense / n + 4 * stats.expert_param_bytes / ep + samples * stats.activation_bytes_per_sample
        compute = stats.step_flops / n / cluster.device_flops
        comm = ag + expert_sync + k * (rs + a2a)
        plan = BaselinePlan("expert parallel + ZeRO-2", f"ep={ep} dp={n} mb={k}", compute + comm, memory,
                            memory <= _capacity(cluster) and samples_per_device > 0, compute, comm)
        if plan.fits:
            return plan
        best = best or plan
    best.step_time = None
    return best


def megatron_configs(stats: ModelStats, cluster: ClusterSpec):
    """Every (dp, tp, pp, micro-batches) worth pricing: tp inside a host, pp at most the layers."""
    n, B = cluster.num_devices, stats.global_batch
    for tp in [t for t in (1, 2, 4, 8, 16) if t <= cluster.devices_per_host and n % t == 0
               and (t == 1 or stats.tensor_parallel)]:
        for pp in [p for p in range(1, n // tp + 1) if (n // tp) % p == 0 and p <= stats.num_layers]:
            dp = n // tp // pp
            if B % dp == 0:
                for k in _micro_batches(B // dp, pp):
                    yield dp, tp, pp, k


def megatron_config(stats: ModelStats, cluster: ClusterSpec, dp: int, tp: int, pp: int, k: int,
                    schedule: str = "1f1b", remat: bool = False) -> BaselinePlan:
    """One Megatron-LM layout: tensor parallel inside a host, data parallel next, pipeline stages
    outermost; 4 activation all-reduces per layer and micro-batch over tp, one gradient all-reduce
    per step over dp, activations sent between stages.

    remat: Megatron's full activation recomputation (`--recompute-granularity full`), the same
    choice the automatic plan has (PipeshardParallel(remat=...)): every layer's forward runs again
    in its backward (+1 forward of compute, i.e. 4/3 of forward + backward, and the forward's 2
    tensor-parallel all-reduces again); between forward and backward a stage keeps only each
    layer's input (replicated over tp: Megatron of Alpa's time had no sequence parallelism) per
    micro-batch in flight, plus one layer's activations while that layer's backward runs."""
    n, dph, B, L = cluster.num_devices, cluster.devices_per_host, stats.global_batch, stats.num_layers
    layers = math.ceil(L / pp)
    stage_params = max(sum(stats.layer_param_bytes[i:i + layers]) for i in range(0, L, layers))
    grad_sync = group_collective(cluster, "all-reduce", stage_params / tp, dp, tp * dp > dph)
    samples = B // dp // k
    compute = stats.step_flops / k / dp / pp / tp / cluster.device_flops
    tp_comm = 4 * layers * group_collective(cluster, "all-reduce",
                                            samples * stats.tp_allreduce_bytes_per_sample / 4, tp, False)
    if remat:
        compute, tp_comm = compute * 4 / 3, tp_comm * 6 / 4
    bw = cluster.inter_host_bandwidth if n > dph else cluster.intra_host_bandwidth
    transfer = 2.0 * samples * stats.boundary_bytes_per_sample / bw
    step = pipeline_objective([compute + tp_comm] * pp, [transfer] * (pp - 1), k) + grad_sync
    act = samples * stats.activation_bytes_per_sample / L * layers / tp
    if remat:
        held = layers * samples * stats.boundary_bytes_per_sample
        memory = 4 * stage_params / tp + in_flight(schedule, 0, pp, k) * held + act / layers
    else:
        memory = 4 * stage_params / tp + in_flight(schedule, 0, pp, k) * act
    busy = compute * (k + pp - 1)
    fits = memory <= _capacity(cluster)
    return BaselinePlan("Megatron dp x tp x pp", f"dp={dp} tp={tp} pp={pp} mb={k}" + (" remat" if remat else ""),
                        step if fits else None, memory, fits, busy, step - busy)


def megatron(stats: ModelStats, cluster: ClusterSpec, schedule: str = "1f1b",
             remat: tuple[bool, ...] = (False, True)) -> tuple[BaselinePlan, int]:
    """The fastest configuration of `megatron_configs` x `remat` that fits memory (else the one
    needing the least memory, marked as not fitting), and how many were priced."""
    plans = [megatron_config(stats, cluster, *cfg, schedule=schedule, remat=r)
             for cfg in megatron_configs(stats, cluster) for r in remat]
    fitting = [p for p in plans if p.fits]
    if fitting:
        return min(fitting, key=lambda p: p.step_time), len(plans)
    return min(plans, key=lambda p: p.memory_per_device), len(plans)


def _micro_batches(per_replica: int, pp: int):
    """Micro-batch counts worth pricing: 1 without pipelining, else powers of two up to the samples."""
    if pp == 1:
        return _micro_batch_counts(per_replica)
    out, k = [], 1
    while k <= per_replica:
        if per_replica % k == 0:
            out.append(k)
        k *= 2
    return out

"""Parallelization methods: which devices, which logical mesh, which pass pipeline.

A method is a plain frozen dataclass. `resolve_mesh()` turns it into a jax Mesh plus the
meshweave MeshSpec; `pipeline()` is the pass pipeline the spine runs on the traced module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshweave.dialects.sharding import MeshSpec, default_axis_names


class MethodError(ValueError):
    """A method's settings do not fit the devices or the program; the message names the fix."""


@dataclass(frozen=True)
class MemoryPrice:
    """Held memory priced in the auto-sharding objective, so the ILP trades time for memory.

    A pipeline stage keeps its parameters (with their gradients and optimizer state) for the whole
    step and each micro-batch's activations until its backward runs; the fastest layouts often
    keep them replicated. With a price, each planned fragment pays `per_byte` (objective units:
    seconds under a cluster's α-β) for every byte per device of its parameter arguments, scaled by
    `parameter_scale` (bytes held per parameter byte), and of the values it hands to a later
    fragment of its stage (activations for the backward, scaled by `activation_scale`, the
    micro-batches assumed in flight; gradient accumulators for apply-grad, scaled by 1). The
    reported objective stays the time alone. The stage DP offers such plans as memory-lean
    candidates (passes/stage_profiling.py) and compiles the chosen stage with the same price.
    """

    per_byte: float
    parameter_scale: float = 1.0
    activation_scale: float = 1.0

    def __post_init__(self):
        for name in ("per_byte", "parameter_scale", "activation_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise MethodError(f"MemoryPrice.{name}={v!r}: expected a finite number >= 0")


@dataclass(frozen=True)
class AutoShardingOption:
    """Knobs of the intra-op auto-sharding ILP (see passes/auto_sharding.py).

    alpha/beta: latency (s) and inverse bandwidth (s/byte) per logical mesh axis; None → alpha 1,
    beta 1 on axis 0 and 0.1 on the others (the last axes model faster, intra-host links).
    memory_budget_per_device: bytes, None for no limit.
    force_batch_dim_to_mesh_dim: split the batch of batch arguments over this mesh axis (None: free).
    allow_mixed_mesh_shape: let one op use a multi-axis mesh as 1-D (several axes on one tensor
    dimension other than the batch, e.g. Megatron over all devices) while others use it as 2-D,
    paying the resharding between the two; off (Alpa's default): only the batch is split that way.
    solver: "highs" or "cbc"; time_limit in seconds (the solver stops earlier once its plan is proven optimal).
    memory_price: a MemoryPrice on the bytes a pipeline stage holds (PipeshardParallel only; the
    stage DP sets it on the stages it picks memory-lean candidates for).
    combine_all_reduces: price independent all-reduces of one dtype over the same axes (gradients) as
    XLA's all-reduce combiner emits them, one op paying α once; all_reduce_combine_threshold_bytes:
    the combiner's byte limit per op (None: no limit, as XLA's CPU pipeline; XLA's GPU default is
    30 MiB, `--xla_gpu_all_reduce_combine_threshold_bytes`).
    device_flops: achievable dot/conv FLOP/s per device, in alpha/beta's time unit; when set, each
    dot/convolution strategy also pays its per-device FLOPs at that rate, so the ILP weighs compute
    against communication (a split that needs no collective still wins on compute, replicated
    compute is no longer free). None (the default with no cluster): compute is not priced.
    `mw.plan` (pipelines included) and the benchmarks fill it, with alpha/beta, from `ClusterSpec.device_flops`;
    `mw.parallelize` of a pipeline on plain devices plans and compiles its stages without it.
    """

    alpha: tuple[float, ...] | None = None
    beta: tuple[float, ...] | None = None
    memory_budget_per_device: int | None = None
    force_batch_dim_to_mesh_dim: int | None = None
    allow_all_gather: bool = True
    allow_all_to_all: bool = True
    prefer_reduce_scatter: bool = False
    allow_mixed_mesh_shape: bool = False
    solver: str = "highs"
    time_limit: float = 10.0
    memory_price: MemoryPrice | None = None
    combine_all_reduces: bool = True
    all_reduce_combine_threshold_bytes: int | None = None
    device_flops: float | None = None

    def __post_init__(self):
        rate = self.device_flops
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0):
            raise MethodError(f"AutoShardingOption.device_flops={rate!r}: expected a positive FLOP/s rate per device "
                              "(e.g. ClusterSpec.preset('h100', 8).device_flops), or None to leave compute unpriced")
        if not isinstance(self.combine_all_reduces, bool):
            raise MethodError(f"AutoShardingOption.combine_all_reduces={self.combine_all_reduces!r}: expected True "
                              "(price XLA's all-reduce combiner) or False")
        limit = self.all_reduce_combine_threshold_bytes
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0
                                  or limit != int(limit)):
            raise MethodError(f"AutoShardingOption.all_reduce_combine_threshold_bytes={limit!r}: expected a positive "
                              "whole number of bytes per combined all-reduce (XLA's GPU default is 30 MiB, "
                              "31457280), or None for no limit (XLA's CPU pipeline)")
        if self.solver not in ("highs", "cbc"):
            raise MethodError(f"AutoShardingOption.solver={self.solver!r}: expected 'highs' or 'cbc'")
        if self.time_limit <= 0:
            raise MethodError(f"AutoShardingOption.time_limit must be positive, got {self.time_limit}")
        budget = self.memory_budget_per_device
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float))
                                   or budget <= 0 or budget != int(budget)):
            raise MethodError(f"AutoShardingOption.memory_budget_per_device={budget!r}: expected a positive whole "
                              f"number of bytes (e.g. {max(int(budget), 1) if isinstance(budget, (int, float)) else 2**30}),"
                              f" or None for no limit")
        if self.memory_price is not None and not isinstance(self.memory_price, MemoryPrice):
            raise MethodError(f"AutoShardingOption.memory_price={self.memory_price!r}: expected a MemoryPrice or None")


@dataclass(frozen=True, eq=False)
class ManualShardingOption:
    """Hand-written shardings pinned in the auto-sharding ILP (Alpa's ManualShardingOption): the
    solver keeps these layouts and chooses everything else around them.

    in_axis_resources: one PartitionSpec pytree per positional argument of the step (a tuple), or a
    dict by parameter name; each is a prefix of its argument's structure (a PartitionSpec applies
    to every array below it; None leaves a leaf to the planner). out_axis_resources: the same for
    the step's result pytree. Axis names are the method's mesh axes. Specs are checked against the
    arrays they land on when the step is traced (meshweave/manual_sharding.py).
    """

    in_axis_resources: object = None
    out_axis_resources: object = None


@dataclass(frozen=True)
class ParallelMethod:
    """Common base: a logical mesh over some devices."""

    mesh_shape: tuple[int, ...] | None = None
    devices: tuple | None = None
    axis_names: tuple[str, ...] | None = None

    def resolve_mesh(self) -> tuple[Mesh, MeshSpec]:
        name = type(self).__name__
        if self.devices is not None:
            devices = list(np.asarray(self.devices, dtype=object).flat)
            if not devices:
                raise MethodError(f"{name}: devices is empty")
        else:
            devices = jax.devices()
        shape = tuple(int(s) for s in self.mesh_shape) if self.mesh_shape is not None else (len(devices),)
        if any(s < 1 for s in shape):
            raise MethodError(f"{name}: mesh_shape {shape} must hold positive integers")
        need = math.prod(shape)
        if self.devices is not None and need != len(devices):
            raise MethodError(f"{name}: mesh_shape {shape} needs {need} devices but devices= holds "
                              f"{len(devices)}; make the product of mesh_shape equal to len(devices)")
        if need > len(devices):
            raise MethodError(f"{name}: mesh_shape {shape} needs {need} devices but only {len(devices)} are "
                              f"available ({devices[0].platform}); use a smaller mesh, or on CPU set "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={need} before importing jax")
        devices = devices[:need]   # a smaller mesh uses the first devices (their ids are in the plan)
        axes = tuple(self.axis_names) if self.axis_names else default_axis_names(len(shape))
        spec = MeshSpec.from_shape(shape, axes)
        mesh = Mesh(np.array(devices, dtype=object).reshape(shape), axes,
                    axis_types=(AxisType.Auto,) * len(shape))
        return mesh, spec

    def pipeline_for(self, spec: MeshSpec) -> str:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


_FRONT = "inline-calls,strip-markers,canonicalize,cse,install-mesh"


@dataclass(frozen=True)
class DataParallel(ParallelMethod):
    """Batch arguments split over the whole mesh, everything else replicated; XLA all-reduces gradients."""

    def pipeline_for(self, spec: MeshSpec) -> str:
        return f"{_FRONT},data-parallel"


def _auto_sharding_pipeline(opt: "AutoShardingOption", mesh_rank: int, *, batch_axes=(), zero_stage=0,
                            gradient_results=(), micro_batches=1, priced=None) -> str:
    """The pass pipeline string; `priced` = (parameter args, activation results, accumulator results)
    of a pipeline fragment, priced when `opt.memory_price` is set."""
    o = []
    price = opt.memory_price
    if price is not None and price.per_byte > 0 and priced is not None and any(priced):
        params, acts, accs = priced
        o.append(f"memory-price={price.per_byte!r}")
        if params:
            o.append("priced-args=" + ",".join(map(str, params)))
            o.append(f"priced-arg-scale={price.parameter_scale!r}")
        results = [(r, price.activation_scale) for r in acts] + [(r, 1.0) for r in accs]
        if results:
            o.append("priced-results=" + ",".join(str(r) for r, _ in results))
            o.append("priced-result-scales=" + ",".join(repr(float(x)) for _, x in results))
    if gradient_results and micro_batches > 1:
        o.append("gradient-results=" + ",".join(map(str, gradient_results)))
        o.append(f"micro-batches={micro_batches}")
    if opt.alpha is not None:
        o.append("alpha=" + ",".join(map(str, opt.alpha)))
    if opt.beta is not None:
        o.append("beta=" + ",".join(map(str, opt.beta)))
    if opt.device_flops is not None:
        o.append(f"device-flops={float(opt.device_flops)!r}")
    if opt.memory_budget_per_device is not None:
        o.append(f"memory-budget={int(opt.memory_budget_per_device)}")
    if batch_axes:
        o.append("batch-axes=" + ",".join(batch_axes))
    if zero_stage:
        o.append(f"zero-stage={zero_stage}")
    if not opt.allow_all_gather:
        o.append("allow-all-gather=false")
    if not opt.allow_all_to_all:
        o.append("allow-all-to-all=false")
    if opt.prefer_reduce_scatter or zero_stage:
        o.append("prefer-reduce-scatter=true")
    if opt.allow_mixed_mesh_shape:
        o.append("allow-mixed-mesh-shape=true")
    if not opt.combine_all_reduces:
        o.append("combine-all-reduces=false")
    if opt.all_reduce_combine_threshold_bytes:
        o.append(f"all-reduce-combine-bytes={int(opt.all_reduce_combine_threshold_bytes)}")
    if opt.solver != "highs":
        o.append(f"solver={opt.solver}")
    if opt.time_limit != 10.0:
        o.append(f"time-limit={opt.time_limit}")
    return f"{_FRONT},auto-sharding" + ("{" + " ".join(o) + "}" if o else "")


@dataclass(frozen=True)
class ShardParallel(ParallelMethod):
    """Intra-op parallelism chosen by the auto-sharding ILP over a logical mesh (Alpa's ShardParallel).

    manual_sharding: layouts written by hand for some arguments/results; the ILP keeps them.

    num_micro_batches: gradient accumulation over that many micro-batches (the step must use
    meshweave.grad / value_and_grad); gradients are reduced across devices once per step.
    """

    num_micro_batches: int | None = None
    auto_sharding: AutoShardingOption = field(default_factory=AutoShardingOption)
    manual_sharding: ManualShardingOption | None = None

    def __post_init__(self):
        if self.num_micro_batches is not None and (not isinstance(self.num_micro_batches, int)
                                                   or self.num_micro_batches < 1):
            raise MethodError(f"num_micro_batches must be a positive int, got {self.num_micro_batches!r}")
        if not isinstance(self.auto_sharding, AutoShardingOption):
            raise MethodError("auto_sharding must be an AutoShardingOption")
        if self.manual_sharding is not None and not isinstance(self.manual_sharding, ManualShardingOption):
            raise MethodError("manual_sharding must be a ManualShardingOption (or None)")
        if self.auto_sharding.memory_price is not None:
            raise MethodError(f"{type(self).__name__}: AutoShardingOption.memory_price prices what a pipeline stage "
                              "holds between its fragments (PipeshardParallel); here use memory_budget_per_device")

    def forced_batch_axes(self, spec: MeshSpec) -> tuple[str, ...]:
        """Mesh axes the batch must split over (the driver checks the batch divides them)."""
        return self.batch_axes(spec)

    def batch_axes(self, spec: MeshSpec) -> tuple[str, ...]:
        k = self.auto_sharding.force_batch_dim_to_mesh_dim
        if k is None:
            return ()
        if not 0 <= k < len(spec.axis_names):
            raise MethodError(f"force_batch_dim_to_mesh_dim={k} but the mesh has {len(spec.axis_names)} axes")
        return (spec.axis_names[k],)

    def pipeline_for(self, spec: MeshSpec) -> str:
        return _auto_sharding_pipeline(self.auto_sharding, len(spec.shape), batch_axes=self.batch_axes(spec))

    def data_parallel_axes(self, spec: MeshSpec) -> tuple[str, ...]:
        """Mesh axes a micro-batch is split over when accumulating gradients."""
        return self.batch_axes(spec) or tuple(spec.axis_names)


@dataclass(frozen=True)
class Zero2Parallel(ShardParallel):
    """Data parallel with ZeRO-2 weight-update sharding: gradients reduce-scattered, optimizer state
    sharded over all devices, parameters replicated (all-gathered after the update)."""

    zero_stage: int = 2

    def pipeline_for(self, spec: MeshSpec) -> str:
        return _auto_sharding_pipeline(self.auto_sharding, len(spec.shape), batch_axes=tuple(spec.axis_names),
                                       zero_stage=self.zero_stage)

    def data_parallel_axes(self, spec: MeshSpec) -> tuple[str, ...]:
        return tuple(spec.axis_names)

    def forced_batch_axes(self, spec: MeshSpec) -> tuple[str, ...]:
        return tuple(spec.axis_names)


@dataclass(frozen=True)
class Zero3Parallel(Zero2Parallel):
    """ZeRO-3: as Zero2Parallel, and parameters sharded too (all-gathered where they are used)."""

    zero_stage: int = 3


# ----------------------------------------------------------------------------- pipelining
@dataclass(frozen=True)
class ManualLayerOption:
    """Layers are cut where the model calls `meshweave.mark_pipeline_boundary`.

    remat_layer: recompute each layer's forward in its backward (Alpa's option; see
    PipeshardParallel.remat)."""

    remat_layer: bool = False

    def __post_init__(self):
        _check_remat_layer(self)


@dataclass(frozen=True)
class AutoLayerOption:
    """Cut the forward pass into `layer_num` contiguous layers that balance FLOPs and minimize the
    bytes crossing layer boundaries (passes/layer_dp.py); `eps` bounds each layer's FLOPs at
    (1 + eps) x the average where that is feasible."""

    layer_num: int
    remat_layer: bool = False
    eps: float = 0.5

    def __post_init__(self):
        if not isinstance(self.layer_num, int) or self.layer_num < 1:
            raise MethodError(f"AutoLayerOption.layer_num must be a positive int, got {self.layer_num!r}")
        if self.eps < 0:
            raise MethodError(f"AutoLayerOption.eps must be >= 0, got {self.eps}")
        _check_remat_layer(self)


def _check_remat_layer(option) -> None:
    if not isinstance(option.remat_layer, bool):
        raise MethodError(f"{type(option).__name__}.remat_layer must be True or False, got {option.remat_layer!r} "
                          "(for the stage DP's choice use PipeshardParallel(remat='auto'))")


@dataclass(frozen=True)
class UniformStageOption:
    """`num_stages` stages of equal layer counts on equal sub-meshes (None: as many stages as layers
    fit the devices; the sub-mesh shape then follows)."""

    num_stages: int | None = None
    submesh_physical_shape: tuple[int, int] | None = None
    submesh_logical_shape: tuple[int, ...] | None = None
    submesh_autosharding_option: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ManualStageOption:
    """Stages given by hand: the forward layer ids of each stage, and each stage's sub-mesh
    (physical shape (hosts, devices per host), logical shape, auto-sharding option overrides)."""

    forward_stage_layer_ids: tuple[tuple[int, ...], ...]
    submesh_physical_shapes: tuple[tuple[int, int], ...]
    submesh_logical_shapes: tuple[tuple[int, ...], ...] | None = None
    submesh_autosharding_option_dicts: tuple[dict, ...] | None = None


@dataclass(frozen=True)
class PipeshardParallel(ParallelMethod):
    """Inter-operator (pipeline stages on sub-meshes) + intra-operator parallelism (Alpa's PipeshardParallel).

    The step's forward pass is cut into layers (`layer_option`), layers are grouped into stages
    placed on disjoint sub-meshes (`stage_option`: "auto" runs the stage DP), each stage is
    auto-sharded on its sub-mesh, and micro-batches flow through the stages per
    `pipeline_schedule` ("1f1b" or "gpipe"). The step must compute gradients with
    `meshweave.grad` / `meshweave.value_and_grad` when `num_micro_batches > 1`.

    manual_sharding: hand-written layouts of the step's arguments (in_axis_resources only), in the
    stages' logical mesh axes; every fragment that reads an argument keeps its layout (Megatron's
    layouts on a ManualStageOption pipeline, for instance).

    num_micro_batches: an int, or a search: a tuple of counts, or "auto" (the divisors of the
    global batch: a ladder of counts a factor 2 apart over the range that fits, then a walk from the
    best to less predicted step time). The whole
    plan is made at each count tried and the least predicted step time that fits the cluster's
    memory wins (meshweave.pipeshard.search_micro_batches); counts must divide the batch.

    remat: rematerialization (passes/rematerialize.py): a rematerialized stage's backward recomputes
    each of its layers' forward from the layer's inputs, so between a micro-batch's forward and its
    backward the stage holds only the layer-boundary activations, at the price of a second forward.
    True / False for every stage; a tuple of bools, one per stage, with hand-given stages; "auto"
    lets the stage DP choose per stage (it prices both variants and takes remat only where memory
    needs it). None (the default) follows `layer_option.remat_layer`.
    """

    num_micro_batches: int = 1
    layer_option: ManualLayerOption | AutoLayerOption = field(default_factory=ManualLayerOption)
    stage_option: object = "auto"
    pipeline_schedule: str = "1f1b"
    default_auto_sharding_option: AutoShardingOption = field(default_factory=AutoShardingOption)
    num_hosts: int = 1
    manual_sharding: ManualShardingOption | None = None
    remat: bool | str | tuple[bool, ...] | None = None

    def __post_init__(self):
        k = self.num_micro_batches
        ok = (k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 1)
              or (isinstance(k, tuple) and k and all(isinstance(x, int) and not isinstance(x, bool) and x >= 1
                                                      for x in k)))
        if not ok:
            raise MethodError(f"PipeshardParallel.num_micro_batches must be a positive int, a non-empty tuple of "
                              f"positive ints to choose from, or 'auto'; got {k!r}")
        if not isinstance(self.layer_option, (ManualLayerOption, AutoLayerOption)):
            raise MethodError("PipeshardParallel.layer_option must be ManualLayerOption() or AutoLayerOption(n)")
        if not (self.stage_option == "auto" or isinstance(self.stage_option, (UniformStageOption, ManualStageOption))):
            raise MethodError(f"PipeshardParallel.stage_option must be 'auto', UniformStageOption(...) or "
                              f"ManualStageOption(...), got {self.stage_option!r}")
        if self.pipeline_schedule not in ("1f1b", "gpipe"):
            raise MethodError(f"PipeshardParallel.pipeline_schedule={self.pipeline_schedule!r}: expected '1f1b' "
                              "or 'gpipe'")
        if not isinstance(self.default_auto_sharding_option, AutoShardingOption):
            raise MethodError("PipeshardParallel.default_auto_sharding_option must be an AutoShardingOption")
        if self.mesh_shape is not None or self.axis_names is not None:
            raise MethodError("PipeshardParallel chooses each stage's sub-mesh itself: drop mesh_shape/axis_names and "
                              "give the shapes through stage_option (UniformStageOption(submesh_logical_shape=...) or "
                              "ManualStageOption(..., submesh_logical_shapes=...))")
        if not isinstance(self.num_hosts, int) or self.num_hosts < 1:
            raise MethodError(f"PipeshardParallel.num_hosts must be a positive int, got {self.num_hosts!r}")
        if self.manual_sharding is not None:
            if not isinstance(self.manual_sharding, ManualShardingOption):
                raise MethodError("PipeshardParallel.manual_sharding must be a ManualShardingOption (or None)")
            if self.manual_sharding.out_axis_resources is not None:
                raise MethodError("PipeshardParallel.manual_sharding takes in_axis_resources only: a pipeline's "
                                  "results come from several stages; pin the arguments they are computed from")
        self._check_remat()

    @property
    def searches_micro_batches(self) -> bool:
        return not isinstance(self.num_micro_batches, int)

    def pipeline_for(self, spec: MeshSpec) -> str:
        if self.searches_micro_batches:
            raise MethodError("PipeshardParallel.pipeline_for needs a fixed num_micro_batches; the search runs in "
                              "meshweave.pipeshard (plan / parallelize)")
        return f"inline-calls,cse,layer-clustering{{micro-batches={self.num_micro_batches}}}"

    def _check_remat(self) -> None:
        r = self.remat
        if isinstance(r, list):
            r = tuple(r)
            object.__setattr__(self, "remat", r)
        ok = r is None or isinstance(r, bool) or r == "auto" or (
            isinstance(r, tuple) and r and all(isinstance(x, bool) for x in r))
        if not ok:
            raise MethodError(f"PipeshardParallel.remat={r!r}: expected True, False, 'auto' (the stage DP decides per "
                              "stage), a tuple of bools (one per stage, with hand-given stages), or None (follow "
                              "layer_option.remat_layer)")
        if r == "auto" and self.stage_option != "auto":
            raise MethodError("PipeshardParallel.remat='auto' lets the stage DP choose per stage, but stage_option is "
                              "given by hand; use remat=True/False or one bool per stage")
        if isinstance(r, tuple) and self.stage_option == "auto":
            raise MethodError("PipeshardParallel.remat as one bool per stage needs hand-given stages; with "
                              "stage_option='auto' use True, False or 'auto'")
        layer_remat = getattr(self.layer_option, "remat_layer", False)
        if layer_remat and r is not None and r is not True:
            raise MethodError(f"layer_option.remat_layer=True but PipeshardParallel.remat={r!r}; give one of them "
                              "(remat_layer=True means remat=True)")

    @property
    def effective_remat(self) -> bool | str | tuple[bool, ...]:
        """What `remat` means once `layer_option.remat_layer` is folded in."""
        if self.remat is None:
            return bool(getattr(self.layer_option, "remat_layer", False))
        return self.remat

    def describe(self) -> str:
        return f"PipeshardParallel({self.pipeline_schedule}, {self.num_micro_batches} micro-batches)"

"""stage-construction: group the layers into pipeline stages and give each stage a sub-mesh.

Modes (PipeshardParallel's `stage_option`):
- manual:  ManualStageOption — the user's layer ids, physical and logical sub-mesh shapes;
- uniform: UniformStageOption — equal layer counts on equal sub-meshes;
- auto:    Alpa's inter-op DP (passes/stage_dp.py) over layer ranges x sub-mesh shapes x logical
           shapes, each candidate priced by the intra-op planner on that sub-mesh
           (passes/stage_profiling.py), plus the cross-mesh transfer time between stages.
Sub-meshes are carved from the cluster (hosts x devices per host) in stage order, so stage k's
devices follow stage k-1's; a sub-mesh inside one host never straddles two.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from meshweave.dialects.sharding import default_axis_names
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register
from meshweave.runtime.program import MeshDesc


@dataclass
class StageSpec:
    index: int
    layers: tuple[int, int]                 # [start, end) forward layer ids
    physical_shape: tuple[int, int]         # (hosts, devices per host)
    mesh: MeshDesc                          # logical shape, axis names, global device ids
    auto_sharding: dict = field(default_factory=dict)
    latency: float | None = None            # predicted seconds per micro-batch (auto mode)
    memory: float | None = None             # predicted bytes per device, micro-batches in flight included (auto; mw.plan)
    remat: bool = False                     # the backward recomputes the forward (passes/rematerialize.py)


@dataclass
class StageConstructionResult(PassResult):
    mode: str
    num_layers: int
    stages: list[StageSpec]
    objective: float | None = None
    seconds: float = 0.0
    candidates: int = 0
    solve_seconds: float = 0.0              # of `seconds`: the intra-op solves that price candidates (auto)
    layer_param_bytes: list = field(default_factory=list)   # parameter bytes read by each layer (auto)
    layer_activation_bytes: list = field(default_factory=list)   # forward->backward bytes per micro-batch (auto)
    micro_batches: int = 1

    def stage_of_layer(self) -> list[int]:
        out = [0] * self.num_layers
        for s in self.stages:
            for layer in range(*s.layers):
                out[layer] = s.index
        return out

    def explain(self) -> str:
        lines = [f"{len(self.stages)} stage(s) ({self.mode})"
                 + (f"; DP objective {self.objective:.6g} s over {self.candidates} candidates in {self.seconds:.2f} s"
                    if self.objective is not None else "")]
        for s in self.stages:
            lat = f", predicted {s.latency * 1e3:.3f} ms/micro-batch" if s.latency is not None else ""
            if getattr(s, "memory", None) is not None:
                lat += f", {s.memory / 2**20:.1f} MiB/device"
            lines.append(f"  stage {s.index}: layers {s.layers[0]}..{s.layers[1] - 1} on {s.mesh.name} physical "
                         f"{s.physical_shape[0]}x{s.physical_shape[1]}, logical "
                         f"{'x'.join(map(str, s.mesh.shape))}, devices {list(s.mesh.device_ids)}{lat}"
                         + (", rematerialized" if getattr(s, "remat", False) else ""))
        return "\n".join(lines)


def _check_shape(shape, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in shape)
    except TypeError:
        raise PassError("stage-construction", f"{what} {shape!r} is not a tuple of ints") from None
    if not out or any(x < 1 for x in out):
        raise PassError("stage-construction", f"{what} {shape!r} must hold positive ints")
    return out


def place_submeshes(physical_shapes, logical_shapes, num_hosts: int, devices_per_host: int,
                    device_ids=None, options=None) -> list[tuple[tuple[int, int], MeshDesc, dict]]:
    """Carve the cluster into the given sub-meshes, in order; they must tile it exactly."""
    total = num_hosts * devices_per_host
    ids = list(device_ids) if device_ids is not None else list(range(total))
    need = sum(math.prod(p) for p in physical_shapes)
    if need != total:
        raise PassError("stage-construction", f"the stages' sub-meshes {[tuple(p) for p in physical_shapes]} hold "
                        f"{need} devices but the cluster has {total} ({num_hosts} host(s) x {devices_per_host}); "
                        "choose sub-mesh shapes whose device counts add up to the cluster")
    out, cursor = [], 0
    for k, (phys, logical) in enumerate(zip(physical_shapes, logical_shapes)):
        h, d = _check_shape(phys, f"submesh_physical_shapes[{k}]")
        if h > 1 and d != devices_per_host:
            raise PassError("stage-construction", f"sub-mesh {h}x{d} spans hosts but does not take whole hosts "
                            f"({devices_per_host} devices each); use {h}x{devices_per_host}")
        if h == 1 and d > devices_per_host:
            raise PassError("stage-construction", f"sub-mesh 1x{d} is larger than a host ({devices_per_host} devices)")
        if h == 1 and cursor // devices_per_host != (cursor + d - 1) // devices_per_host:
            raise PassError("stage-construction", f"sub-mesh {k} (1x{d}) would straddle two hosts; reorder the stages "
                            "or use sub-meshes that fill hosts")
        n = h * d
        logical = _check_shape(logical if logical is not None else (h, d) if h > 1 else (d,),
                               f"submesh_logical_shapes[{k}]")
        if math.prod(logical) != n:
            raise PassError("stage-construction", f"logical shape {logical} of stage {k} does not have the "
                            f"{n} devices of its physical shape {h}x{d}")
        mesh = MeshDesc(f"mesh{k}", logical, default_axis_names(len(logical)), tuple(ids[cursor:cursor + n]))
        out.append(((h, d), mesh, dict((options or [{}] * len(physical_shapes))[k] or {})))
        cursor += n
    return out


def manual_stages(option, num_layers: int, num_hosts: int, devices_per_host: int, device_ids=None):
    layer_ids = [tuple(int(x) for x in ids) for ids in option.forward_stage_layer_ids]
    flat = [x for ids in layer_ids for x in ids]
    if flat != list(range(num_layers)):
        raise PassError("stage-construction", f"ManualStageOption.forward_stage_layer_ids {layer_ids} must list the "
                        f"layers 0..{num_layers - 1} once each, in order, as contiguous groups (the model has "
                        f"{num_layers} layers)")
    if any(not ids for ids in layer_ids):
        raise PassError("stage-construction", "ManualStageOption: a stage has no layers")
    n = len(layer_ids)
    for what, value in (("submesh_physical_shapes", option.submesh_physical_shapes),
                        ("submesh_logical_shapes", option.submesh_logical_shapes),
                        ("submesh_autosharding_option_dicts", option.submesh_autosharding_option_dicts)):
        if value is not None and len(value) != n:
            raise PassError("stage-construction", f"ManualStageOption.{what} has {len(value)} entries for {n} stages")
    placed = place_submeshes(option.submesh_physical_shapes, option.submesh_logical_shapes or [None] * n,
                             num_hosts, devices_per_host, device_ids, option.submesh_autosharding_option_dicts)
    return [StageSpec(k, (ids[0], ids[-1] + 1), phys, mesh, opts)
            for k, (ids, (phys, mesh, opts)) in enumerate(zip(layer_ids, placed))]


def uniform_stages(option, num_layers: int, num_hosts: int, devices_per_host: int, device_ids=None):
    total = num_hosts * devices_per_host
    n = option.num_stages
    if n is None:
        n = max(k for k in range(1, min(num_layers, total) + 1) if num_layers % k == 0 and total % k == 0)
    if n < 1 or n > num_layers:
        raise PassError("stage-construction", f"UniformStageOption.num_stages={n}, but the model has {num_layers} "
                        "layer(s); use at most as many stages as layers (add boundaries or AutoLayerOption)")
    if n > total:
        raise PassError("stage-construction", f"UniformStageOption.num_stages={n} exceeds the {total} devices")
    if num_layers % n:
        raise PassError("stage-construction", f"UniformStageOption: {num_layers} layers do not split evenly into "
                        f"{n} stages; pick a divisor of {num_layers} or use ManualStageOption")
    if total % n:
        raise PassError("stage-construction", f"UniformStageOption: {total} devices do not split evenly into {n} "
                        "stages")
    per = total // n
    phys = option.submesh_physical_shape or ((per // devices_per_host, devices_per_host)
                                             if per >= devices_per_host else (1, per))
    if math.prod(phys) != per:
        raise PassError("stage-construction", f"UniformStageOption.submesh_physical_shape {phys} does not hold "
                        f"{per} devices ({total} devices / {n} stages)")
    k = num_layers // n
    placed = place_submeshes([phys] * n, [option.submesh_logical_shape] * n, num_hosts, devices_per_host,
                             device_ids, [option.submesh_autosharding_option] * n)
    return [StageSpec(i, (i * k, (i + 1) * k), p, mesh, opts) for i, (p, mesh, opts) in enumerate(placed)]


def _given_remat(stages, remat) -> None:
    """PipeshardParallel.remat on hand-given stages: one bool for all, or one per stage."""
    flags = remat if isinstance(remat, tuple) else (bool(remat),) * len(stages)
    if len(flags) != len(stages):
        raise PassError("stage-construction", f"PipeshardParallel.remat gives {len(flags)} flag(s) for "
                        f"{len(stages)} stage(s); give one bool per stage, or True/False for all")
    for s, r in zip(stages, flags):
        s.remat = r


@register
class StageConstruction(Pass):
    name = "stage-construction"
    summary = "Group layers into pipeline stages on sub-meshes (manual, uniform, or Alpa's DP with transfer costs)"
    options = (
        Option("num-hosts", "int", 1, "hosts in the cluster"),
        Option("devices-per-host", "int", 0, "devices per host (0: the pipeline's mesh size)"),
        Option("num-stages", "int", 0, "uniform stages (0: the method's stage option, or as many as divide evenly)"),
    )

    def run(self, module, state):
        layers = state.results.get("layer-clustering")
        if layers is None:
            raise PassError(self.name, "run layer-clustering first")
        num_layers = layers.num_layers
        dph = self.devices_per_host or (state.mesh.num_devices // self.num_hosts if state.mesh else 0)
        if dph < 1:
            raise PassError(self.name, "no cluster size: give devices-per-host=N (or --mesh to meshweave-opt)")
        option = state.options.get("stage_option")
        device_ids = state.options.get("device_ids")
        if option is None or self.num_stages:
            from meshweave.methods import UniformStageOption

            option = UniformStageOption(num_stages=self.num_stages or None)
        if option == "auto":
            from meshweave.passes.stage_profiling import auto_stages

            result = auto_stages(module, state, num_layers, self.num_hosts, dph, device_ids)
        elif type(option).__name__ == "ManualStageOption":
            result = StageConstructionResult("manual", num_layers,
                                             manual_stages(option, num_layers, self.num_hosts, dph, device_ids))
        else:
            result = StageConstructionResult("uniform", num_layers,
                                             uniform_stages(option, num_layers, self.num_hosts, dph, device_ids))
        if result.mode != "auto":
            _given_remat(result.stages, getattr(state.options.get("method"), "effective_remat", False))
        state.results[self.name] = result

"""Compile an automatic plan's pipeline stages on simulated CPU devices and keep their HLO.

The suite plans with no devices; this turns a planned row back into programs: the step is traced
at micro-batch size, cut at the planned layer ranges (`ManualStageOption` with each stage's logical
mesh and its sub-cluster's α-β, exactly as the stage DP priced it), every fragment (forward,
backward, apply-grad) is auto-sharded and compiled by XLA for its stage's mesh, and the
SPMD-partitioned HLO of stage k is written to `<dir>/stage_<k>.hlo.gz` (its fragments one after
another, each introduced by a `// fragment <name> (<phase>)` line). Each stage's real collectives
are counted, and an α-β evaluator of compiled programs (`meshweave.step_time.estimate_compiled_step`,
when present) judges each fragment, next to the stage DP's predicted latency.

Simulated devices are numbered 0..N-1 in stage order; the plan's own device ids (the DP packs
sub-meshes into hosts) are in `plan.json`. The HLO of a stage depends on its logical mesh only.

    python -m benchmarks.stage_programs benchmarks/results/gpt_h100.json [--gpus 8,16] [--width-divisor 4]
        -> benchmarks/results/plans/<suite>_<cluster>_<gpus>/{stage_<k>.hlo.gz, plan.json}
           and each row's "compiled" entry in the suite JSON
"""
from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PLANS = os.path.join(RESULTS, "plans")
MAX_DEVICES = 64


@dataclass(frozen=True)
class StageLayout:
    """One planned stage: forward layers [start, end) on a logical mesh, and what the DP predicted."""

    layers: tuple[int, int]
    logical_shape: tuple[int, ...]
    predicted_latency: float | None = None     # s per micro-batch, forward + backward (stage DP)
    device_ids: tuple[int, ...] = ()           # the plan's ids on the cluster


@dataclass
class FragmentProgram:
    name: str
    phase: str                                 # forward | backward | apply
    collectives: dict                          # {kind: {"count", "bytes"}} in the compiled HLO
    ilp_predicted: float                       # its auto-sharding ILP's objective + FLOPs at the device rate, s
    judged: dict | None = None                 # estimate_compiled_step(...) as a dict, when available
    hlo_chars: int = 0


@dataclass
class StageProgram:
    index: int
    layers: tuple[int, int]
    logical_shape: tuple[int, ...]
    devices: int
    predicted_latency: float | None            # stage DP, s per micro-batch (forward + backward)
    ilp_latency: float                         # the compiled fragments' own ILPs, forward + backward
    judged_latency: float | None               # evaluator on the compiled forward + backward, s per micro-batch
    judged_apply: float | None                 # evaluator on the compiled apply-grad, s per step
    fragments: list[FragmentProgram]
    hlo_file: str = ""
    hlo_gz_bytes: int = 0


@dataclass
class CompiledPlan:
    """A planned row compiled stage by stage (`width_divisor` > 1: the same layers at reduced width)."""

    suite: str
    model: str
    cluster: str
    gpus: int
    micro_batches: int
    width_divisor: int
    stages: list[StageProgram]
    compile_seconds: float
    timings: dict
    evaluator: str                             # what judged the stages ("" when none was available)
    directory: str = ""
    notes: list[str] = field(default_factory=list)


def stage_options(stages: list[StageLayout], cluster) -> tuple:
    """Per stage: the auto-sharding α-β of its sub-cluster, as the stage DP priced its layers."""
    out = []
    for s in stages:
        n = math.prod(s.logical_shape)
        c = dataclasses.replace(cluster, num_hosts=max(1, n // cluster.devices_per_host),
                                devices_per_host=min(n, cluster.devices_per_host), mesh_shape=tuple(s.logical_shape))
        _, alpha, beta = c.logical_mesh()
        out.append({"alpha": alpha, "beta": beta, "time_limit": 5.0})
    return tuple(out)


def _evaluator():
    try:
        from meshweave.step_time import estimate_compiled_step
    except ImportError:
        return None
    return estimate_compiled_step


def _judge(evaluate, text: str, shape, axes, cluster) -> dict | None:
    if evaluate is None:
        return None
    est = evaluate(text, tuple(shape), tuple(axes), cluster)
    return dataclasses.asdict(est) if dataclasses.is_dataclass(est) else dict(est)


def compile_stages(step, state, batch, stages: list[StageLayout], micro_batches: int, cluster, layer_option=None,
                   out_dir: str | None = None, devices=None) -> CompiledPlan:
    """Compile `step` cut into `stages` for `cluster` on this process's devices (it needs
    sum of the stages' devices); write `stage_<k>.hlo.gz` into `out_dir` when given."""
    import jax

    import meshweave as mw
    from meshweave.passes.stage_profiling import _flops
    from meshweave.pipeshard import compile_pipeshard
    from meshweave.plugin import hlo_stats
    from meshweave.plugin.arguments import ArgumentSpec

    need = sum(math.prod(s.logical_shape) for s in stages)
    devices = list(devices if devices is not None else jax.devices())
    if len(devices) < need:
        raise ValueError(f"the plan's stages need {need} devices but {len(devices)} are here; run in a process with "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count={need} (compile_plan_in_subprocess does)")
    option = mw.ManualStageOption(
        forward_stage_layer_ids=tuple(tuple(range(*s.layers)) for s in stages),
        submesh_physical_shapes=tuple((1, math.prod(s.logical_shape)) for s in stages),
        submesh_logical_shapes=tuple(tuple(s.logical_shape) for s in stages),
        submesh_autosharding_option_dicts=stage_options(stages, cluster))
    method = mw.PipeshardParallel(num_micro_batches=micro_batches, layer_option=layer_option or mw.ManualLayerOption(),
                                  stage_option=option, devices=tuple(devices[:need]))
    call = ArgumentSpec.create(step, batch_argnums=(1,)).bind((state, batch), {})
    t0 = time.perf_counter()
    program, compiled, *_ = compile_pipeshard(step, call, method)
    seconds = time.perf_counter() - t0
    evaluate = _evaluator()
    meshes = {m.name: m for m in program.meshes}
    result = []
    for k, s in enumerate(stages):
        frags, texts = [], []
        mesh = None
        for c in compiled.values():
            if c.desc.stage != k:
                continue
            mesh = meshes[c.desc.mesh]
            text = c.compiled.as_text()
            texts.append(f"// fragment {c.desc.name} ({c.desc.kind})\n{text}")
            auto = c.state.results.get("auto-sharding")
            ilp = (float(auto.objective) if auto is not None else 0.0) + \
                _flops(c.desc.module_text) / mesh.num_devices / cluster.device_flops
            frags.append(FragmentProgram(c.desc.name, c.desc.kind, hlo_stats.summarize(hlo_stats.collectives(text)),
                                         ilp, _judge(evaluate, text, mesh.shape, mesh.axis_names, cluster), len(text)))
        judged = {p: sum(f.judged["total_s"] for f in frags if f.phase == p) if evaluate else None
                  for p in ("forward", "backward", "apply")}
        sp = StageProgram(k, tuple(s.layers), tuple(s.logical_shape), math.prod(s.logical_shape), s.predicted_latency,
                          sum(f.ilp_predicted for f in frags if f.phase != "apply"),
                          judged["forward"] + judged["backward"] if evaluate else None, judged["apply"], frags)
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            sp.hlo_file = f"stage_{k}.hlo.gz"
            path = os.path.join(out_dir, sp.hlo_file)
            with gzip.open(path, "wt", compresslevel=9) as f:
                f.write("\n".join(texts))
            sp.hlo_gz_bytes = os.path.getsize(path)
        result.append(sp)
    timings = {k: round(v, 3) for k, v in program.notes.get("timings", {}).items()}
    return CompiledPlan("", "", getattr(cluster, "name", ""), cluster.num_devices, micro_batches, 1, result,
                        seconds, timings, "meshweave.step_time.estimate_compiled_step" if evaluate else "",
                        out_dir or "")

"""Compile an automatic plan's pipeline stages on simulated CPU devices and keep their HLO.

The suite plans with no devices; this turns a planned row back into programs: the step is traced
at micro-batch size, cut at the planned layer ranges (`ManualStageOption` with each stage's logical
mesh and its sub-cluster's α-β and compute rate, exactly as the stage DP priced it), every fragment (forward,
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
# LLVM at -O0: the HLO XLA prints after its HLO passes (what is kept and judged) is the same text
# (checked on a 4-layer GPT stage: identical), the CPU code generation behind it ~40% faster.
FAST_BACKEND = "--xla_backend_optimization_level=0"


@dataclass(frozen=True)
class StageLayout:
    """One planned stage: forward layers [start, end) on a logical mesh, and what the DP predicted."""

    layers: tuple[int, int]
    logical_shape: tuple[int, ...]
    predicted_latency: float | None = None     # s per micro-batch, forward + backward (stage DP)
    device_ids: tuple[int, ...] = ()           # the plan's ids on the cluster
    remat: bool = False                        # the stage's backward recomputes its forward
    memory_price: dict | None = None           # the DP's memory-lean candidate: MemoryPrice fields (None: fastest)


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
    planned_step_time: float | None = None     # the plan's own prediction (stage DP objective / mw.plan)
    notes: list[str] = field(default_factory=list)


def stage_cluster(cluster, logical_shape):
    """The part of `cluster` a stage's logical mesh occupies (whole hosts, or part of one), as the
    stage DP priced it: an axis that spans hosts uses the inter-host link."""
    n = math.prod(logical_shape)
    return dataclasses.replace(cluster, num_hosts=max(1, n // cluster.devices_per_host),
                               devices_per_host=min(n, cluster.devices_per_host), mesh_shape=tuple(logical_shape))


def stage_options(stages: list[StageLayout], cluster) -> tuple:
    """Per stage: the auto-sharding α-β of its sub-cluster, its compute rate (the planned DP's ILPs
    price FLOPs, so a fragment ILP that did not would choose other layouts than the ones priced),
    the stage DP's solver time limit and the memory price of the candidate the DP chose."""
    from meshweave.methods import MemoryPrice

    out = []
    for s in stages:
        sub = stage_cluster(cluster, s.logical_shape)
        _, alpha, beta = sub.logical_mesh()
        price = MemoryPrice(**s.memory_price) if s.memory_price else None
        out.append({"alpha": alpha, "beta": beta, "device_flops": sub.device_flops, "time_limit": 5.0,
                    "memory_price": price})
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
    est = evaluate(text, tuple(shape), tuple(axes), stage_cluster(cluster, shape))
    return est.to_json()


def compile_stages(step, state, batch, stages: list[StageLayout], micro_batches: int, cluster, layer_option=None,
                   out_dir: str | None = None, devices=None, manual_sharding=None) -> CompiledPlan:
    """Compile `step` cut into `stages` for `cluster` on this process's devices (it needs
    sum of the stages' devices); write `stage_<k>.hlo.gz` into `out_dir` when given.
    `manual_sharding`: hand-written argument layouts every stage keeps (a ManualShardingOption)."""
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
                                  stage_option=option, devices=tuple(devices[:need]), manual_sharding=manual_sharding,
                                  remat=tuple(s.remat for s in stages))
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
            ilp = (float(auto.objective) if auto is not None else 0.0) + (
                0.0 if auto is not None and auto.compute_priced
                else _flops(c.desc.mlir) / len(mesh.device_ids) / cluster.device_flops)
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


# ----------------------------------------------------------------------------- planned rows
def layouts_of_row(row: dict) -> list[StageLayout]:
    """The stages of a suite JSON row's automatic plan."""
    return [StageLayout(tuple(s["layers"]), tuple(s["logical"]), s.get("latency"), tuple(s.get("device_ids", ())),
                        bool(s.get("remat", False)), (s.get("auto_sharding") or {}).get("memory_price"))
            for s in row["auto_detail"]["stages"]]


def plan_dir(suite: str, cluster: str, gpus: int, root: str | None = None) -> str:
    return os.path.join(root or PLANS, f"{suite}_{cluster}_{gpus}")


def compile_row(suite_name: str, cluster_name: str, row: dict, out_dir: str) -> CompiledPlan:
    """In this process (it must have the row's devices): rebuild the row's step, compile its stages."""
    import meshweave as mw
    from benchmarks import suite

    micro_batches = row["auto_detail"]["micro_batches"]
    case = suite.make_case(suite_name, row["model"], row["global_batch"], micro_batches)
    cluster = mw.ClusterSpec.preset(cluster_name, row["gpus"])
    plan = compile_stages(case.step, case.state, case.batch, layouts_of_row(row), micro_batches, cluster,
                          case.layer_option, out_dir)
    plan.suite, plan.model = suite_name, case.model
    plan.directory = os.path.relpath(out_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    plan.planned_step_time = row["auto_detail"]["pipeline_time"]
    return plan


def run_worker(module: str, suite_name: str, cluster_name: str, row: dict, out_dir: str,
               timeout: float = 3600) -> dict:
    """Run `python -m <module> --worker` for one row in a fresh process with as many simulated CPU
    devices as the row's GPUs (at most 64); returns the plan.json it writes into out_dir."""
    if row["gpus"] > MAX_DEVICES:
        raise ValueError(f"{row['gpus']} GPUs: the compiled check simulates at most {MAX_DEVICES} devices")
    os.makedirs(out_dir, exist_ok=True)
    request = os.path.join(out_dir, "request.json")
    with open(request, "w") as f:
        json.dump({"suite": suite_name, "cluster": cluster_name, "row": row, "out_dir": out_dir}, f)
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
               f"--xla_force_host_platform_device_count={row['gpus']} {FAST_BACKEND}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        subprocess.run([sys.executable, "-m", module, "--worker", request], cwd=root, env=env, check=True,
                       timeout=timeout)
    finally:
        os.remove(request)
    with open(os.path.join(out_dir, "plan.json")) as f:
        return json.load(f)


def compile_row_in_subprocess(suite_name: str, cluster_name: str, row: dict, out_dir: str,
                              timeout: float = 3600) -> dict:
    """The row's automatic plan compiled stage by stage in a fresh process (plan.json as a dict)."""
    return run_worker("benchmarks.stage_programs", suite_name, cluster_name, row, out_dir, timeout)


def judged_step_time(compiled: dict) -> float | None:
    """The pipeline time of the judged stages (sum + (B - 1) x slowest, the stage DP's objective
    without the transfers between stages) plus the slowest apply-grad; None without an evaluator."""
    from meshweave.passes.stage_dp import pipeline_objective

    stages = compiled["stages"]
    if any(s["judged_latency"] is None for s in stages):
        return None
    return (pipeline_objective([s["judged_latency"] for s in stages], [], compiled["micro_batches"])
            + max(s["judged_apply"] or 0.0 for s in stages))


def _worker(request_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    plan = compile_row(req["suite"], req["cluster"], req["row"], req["out_dir"])
    doc = dataclasses.asdict(plan)
    doc["planned_stages"] = req["row"]["auto_detail"]["stages"]      # the plan's own device ids, memory
    doc["judged_step_time"] = judged_step_time(doc)
    doc["note"] = ("compiled on simulated CPU devices 0..N-1 in stage order (a stage's HLO depends on its logical "
                   "mesh only); predicted_latency: the stage DP (sum of per-layer ILPs), ilp_latency: the compiled "
                   "fragments' own ILPs, judged_latency: " + (plan.evaluator or "no evaluator available"))
    with open(os.path.join(req["out_dir"], "plan.json"), "w") as f:
        json.dump(doc, f, indent=1)


def summary(compiled: dict) -> dict:
    """What a suite JSON row keeps of a compiled plan (plan.json has the rest)."""
    return {"directory": compiled["directory"], "compile_seconds": round(compiled["compile_seconds"], 1),
            "evaluator": compiled["evaluator"], "judged_step_time": compiled.get("judged_step_time"),
            "planned_step_time": compiled.get("planned_step_time"),
            "stages": [{"index": s["index"], "layers": s["layers"], "logical": s["logical_shape"],
                        "predicted_latency": s["predicted_latency"], "ilp_latency": s["ilp_latency"],
                        "judged_latency": s["judged_latency"], "judged_apply": s["judged_apply"],
                        "collectives": {f["phase"]: f["collectives"] for f in s["fragments"]},
                        "hlo_file": s["hlo_file"], "hlo_gz_bytes": s["hlo_gz_bytes"]} for s in compiled["stages"]]}


def table(doc: dict) -> str:
    """Markdown rows: each compiled row's predicted and judged step times, automatic and Megatron."""
    def ms(x):
        return f"{x:.3g}" if x is not None else "—"

    lines = ["| suite | cluster | GPUs | model | auto plan | auto predicted s | auto judged s | auto compile s "
             "| Megatron | Megatron analytic s | Megatron mw.plan s | Megatron judged s | Megatron compile s |",
             "|" + "---|" * 13]
    for r in doc["rows"]:
        c, m, mp = r.get("compiled"), r.get("megatron_compiled"), r.get("megatron_planned")
        if not c and not m and not mp:
            continue
        formula = next((b for b in r["baselines"] if b["method"].startswith("Megatron")), {})
        if mp and mp.get("tries") is not None:   # ranked by mw.plan: its choice (the formula's time for it)
            mega = {"plan": mp["config"] or "none fits", "step_time": mp["analytic_step_time"]}
        else:
            mega = formula
        planned = (mp or {}).get("planned_step_time") or (m or {}).get("planned_step_time")
        if m and m.get("config") not in (None, mega.get("plan")):
            m = None                             # compiled for another configuration than the one shown
        shape = ",".join("x".join(map(str, s["logical"])) for s in r["auto_detail"]["stages"])
        lines.append(f"| {r['suite']} | {r['cluster'].split('x')[0]} | {r['gpus']} | {r['model']} | "
                     f"{len(r['auto_detail']['stages'])}x {shape} mb={r['auto_detail']['micro_batches']} | "
                     f"{ms(r['auto']['step_time'])} | {ms(c and c['judged_step_time'])} | "
                     f"{ms(c and c['compile_seconds'])} | {mega.get('plan', '—')} | {ms(mega.get('step_time'))} | "
                     f"{ms(planned)} | "
                     f"{ms(m and m['judged_step_time'])} | {ms(m and m['compile_seconds'])} |")
    return "\n".join(lines)


def load_suite_json(parser, args) -> tuple[dict, set | None]:
    """The suite JSON named on the command line, and the GPU counts `--gpus` keeps (None: all rows)."""
    if not args.results:
        parser.error("give a suite JSON")
    with open(args.results) as f:
        doc = json.load(f)
    return doc, ({int(g) for g in args.gpus.split(",")} if args.gpus else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a suite JSON (benchmarks/results/<suite>_<cluster>.json)")
    p.add_argument("--gpus", default=None, help="only these rows (e.g. 8,16)")
    p.add_argument("--table", action="store_true", help="only print the compiled rows of the JSON as a table")
    p.add_argument("--plans-dir", default=None, help=f"where the plan folders go (default {os.path.relpath(PLANS)})")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    doc, want = load_suite_json(p, args)
    if args.table:
        print(table(doc))
        return
    for row in doc["rows"]:
        if want and row["gpus"] not in want:
            continue
        cluster = row["cluster"].split("x")[0]
        out = plan_dir(row["suite"], cluster, row["gpus"], args.plans_dir)
        t0 = time.perf_counter()
        compiled = compile_row_in_subprocess(row["suite"], cluster, row, out)
        row["compiled"] = summary(compiled)
        for s in row["compiled"]["stages"]:
            judged = f"{s['judged_latency'] * 1e3:.2f}" if s["judged_latency"] is not None else "n/a"
            print(f"{row['suite']} {row['cluster']} {row['model']} stage {s['index']} {s['logical']}: predicted "
                  f"{(s['predicted_latency'] or 0) * 1e3:.2f} ms, fragment ILPs {s['ilp_latency'] * 1e3:.2f} ms, "
                  f"judged {judged} ms per micro-batch")
        print(f"  compiled in {time.perf_counter() - t0:.0f} s -> {out}")
        cmd = "python -m benchmarks.stage_programs " + " ".join(sys.argv[1:] if argv is None else argv)
        record(args.results, row["gpus"], {"compiled": row["compiled"]}, cmd)


def record(results: str, gpus: int, entries: dict, command: str) -> None:
    """Set `entries` (key -> value) in the row for `gpus` of the suite JSON, re-read just before
    writing (the auto plans and the Megatron programs of one suite may be compiled by two processes
    at once)."""
    with open(results) as f:
        doc = json.load(f)
    next(r for r in doc["rows"] if r["gpus"] == gpus).update(entries)
    doc.setdefault("compiled_commands", [])
    if command not in doc["compiled_commands"]:
        doc["compiled_commands"].append(command)
    with open(results, "w") as f:
        json.dump(doc, f, indent=1)

if __name__ == "__main__":
    main()

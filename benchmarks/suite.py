"""Benchmark suite: meshweave's automatic plan against data parallel, ZeRO-2/3 and the best
Megatron-style dp x tp x pp plan, on virtual GPU clusters, for Alpa's weak-scaling models.

Plan-only: every step is traced with abstract arguments and planned for a cluster preset
(`ClusterSpec.preset`) with no devices. The automatic plan is `mw.plan(..., PipeshardParallel(
stage_option="auto"))`: layers, the stage DP priced by per-layer intra-op ILPs, its predicted
pipeline time (which, as the per-layer ILPs price it, already reduces the weight gradients in
every micro-batch's backward). Baselines: benchmarks/baselines.py, same cluster model.

    python -m benchmarks.suite --suite gpt --cluster h100 --gpus 8,16,32,64
        -> benchmarks/results/<suite>_<cluster>.json, a table, benchmarks/results/<suite>_<cluster>.png
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, field

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import meshweave as mw  # noqa: E402
from benchmarks import baselines  # noqa: E402
from meshweave.passes.registry import PassError  # noqa: E402
from meshweave.passes.stage_dp import StageOptionError  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Case:
    """One training step to plan, with abstract arguments and the per-sample sizes baselines need."""

    suite: str
    model: str
    step: object
    state: object                       # abstract (jax.ShapeDtypeStruct leaves)
    batch: object
    global_batch: int
    micro_batches: int
    layer_option: object
    boundary_bytes_per_sample: float    # activation crossing a layer boundary
    tp_allreduce_bytes_per_sample: float
    tensor_parallel: bool
    expert_param_bytes: float = 0.0     # MoE: the experts' weights (what expert parallelism splits)
    all_to_all_bytes_per_sample: float = 0.0   # MoE: tokens dispatched to experts, one layer
    moe_layers: int = 0
    experts: int = 0


def gpt_case(model: str, global_batch: int, micro_batches: int, dtype=jnp.bfloat16) -> Case:
    from meshweave.models import gpt
    from meshweave.models.alpa_configs import gpt_config

    cfg = gpt_config(model)
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda k: gpt.init_state(k, cfg, opt, dtype), jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((global_batch, cfg.seq_len), jnp.int32)
    width = jnp.dtype(dtype).itemsize
    act = cfg.seq_len * cfg.d_model * width
    return Case("gpt", model, gpt.make_train_step(opt, grad_fn=mw.value_and_grad), state,
                {"tokens": tokens, "targets": tokens}, global_batch, micro_batches, mw.ManualLayerOption(),
                boundary_bytes_per_sample=act, tp_allreduce_bytes_per_sample=4 * act, tensor_parallel=True)


def bert_case(model: str, global_batch: int, micro_batches: int, dtype=jnp.bfloat16) -> Case:
    from meshweave.models import bert
    from meshweave.models.alpa_configs import bert_config

    cfg = bert_config(model)
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda k: bert.init_state(k, cfg, opt, dtype), jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((global_batch, cfg.seq_len), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens, "mask": jax.ShapeDtypeStruct(tokens.shape, jnp.bool_),
             "weights": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    act = cfg.seq_len * cfg.d_model * jnp.dtype(dtype).itemsize
    return Case("bert", model, bert.make_train_step(opt, grad_fn=mw.value_and_grad), state, batch, global_batch,
                micro_batches, mw.ManualLayerOption(), boundary_bytes_per_sample=act,
                tp_allreduce_bytes_per_sample=4 * act, tensor_parallel=True)


def moe_case(model: str, global_batch: int, micro_batches: int, dtype=jnp.bfloat16) -> Case:
    from meshweave.models import moe_lm
    from meshweave.models.alpa_configs import moe_config

    cfg = moe_config(model)
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda k: moe_lm.init_state(k, cfg, opt, dtype), jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((global_batch, cfg.seq_len), jnp.int32)
    width = jnp.dtype(dtype).itemsize
    act = cfg.seq_len * cfg.d_model * width
    experts = sum(tree_bytes({k: b[k] for k in ("wi", "wo_e")}) for b in state["params"]["blocks"])
    dispatched = cfg.experts * cfg.capacity * cfg.d_model * width * cfg.seq_len / cfg.group_size
    return Case("moe", model, moe_lm.make_train_step(cfg, opt, grad_fn=mw.value_and_grad), state,
                {"tokens": tokens, "targets": tokens}, global_batch, micro_batches, mw.ManualLayerOption(),
                boundary_bytes_per_sample=act, tp_allreduce_bytes_per_sample=4 * act, tensor_parallel=True,
                expert_param_bytes=experts, all_to_all_bytes_per_sample=dispatched, moe_layers=cfg.layers,
                experts=cfg.experts)


def wresnet_case(model: str, global_batch: int, micro_batches: int) -> Case:
    from meshweave.models import wresnet
    from meshweave.models.alpa_configs import wresnet_config

    cfg = wresnet_config(model)
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda k: wresnet.init_state(k, cfg, opt), jax.random.PRNGKey(0))
    batch = {"images": jax.ShapeDtypeStruct((global_batch, cfg.image_size, cfg.image_size, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((global_batch,), jnp.int32)}
    outputs = []                       # bytes of each block's output, one image (fp32)
    side = cfg.image_size // 4
    for stage, n in enumerate(cfg.blocks):
        side = side // 2 if stage else side
        outputs += [side * side * 4 * cfg.channels * 2 ** stage * 4] * n
    return Case("wresnet", model, wresnet.make_train_step(cfg, opt, grad_fn=mw.value_and_grad), state, batch,
                global_batch, micro_batches, mw.ManualLayerOption(),
                boundary_bytes_per_sample=sum(outputs) / len(outputs), tp_allreduce_bytes_per_sample=0.0,
                tensor_parallel=False)


CASES = {"gpt": gpt_case, "bert": bert_case, "moe": moe_case, "wresnet": wresnet_case}


def make_case(suite: str, model: str, global_batch: int, micro_batches: int) -> Case:
    """A suite's case by model name (Alpa's sizes, or "tiny")."""
    if suite not in CASES:
        raise ValueError(f"unknown suite {suite!r}; known: {', '.join(CASES)}")
    return CASES[suite](model, global_batch, micro_batches)


def weak_scaling_case(suite: str, gpus: int) -> Case:
    from meshweave.models import alpa_configs as ac

    table = {"gpt": ac.GPT_WEAK_SCALING, "bert": ac.BERT_WEAK_SCALING, "moe": ac.MOE_WEAK_SCALING,
             "wresnet": ac.WRESNET_WEAK_SCALING}[suite]
    if gpus not in table:
        raise SystemExit(f"no {suite} weak-scaling row for {gpus} GPUs; choose from {sorted(table)}")
    row = table[gpus]
    return make_case(suite, row.model, row.global_batch, row.micro_batches)


# ----------------------------------------------------------------------------- measuring
def step_matmul_flops(case: Case) -> float:
    """Matmul FLOPs of the whole step at the global batch, counted on the lowered program the same
    way the stage DP counts them per layer."""
    from meshweave.passes.stage_profiling import _flops

    return _flops(jax.jit(case.step).lower(case.state, case.batch).as_text())


def tree_bytes(tree) -> float:
    return float(sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


@dataclass
class AutoPlan:
    step_time: float | None             # None: no plan fits memory
    pipeline_time: float                # the stage DP's objective
    memory_per_device: float
    stages: list                        # [{"layers", "physical", "logical", "devices", "latency", "memory"}]
    micro_batches: int
    timings: dict
    planning_seconds: float
    ilp_solves: int = 0                 # distinct (layer program, logical shape) intra-op solves
    error: str = ""
    tries: list = field(default_factory=list)   # the micro-batch search: {micro_batches, step_time, seconds, error}


def plan_auto(case: Case, cluster: mw.ClusterSpec, capacity=True, micro_batches=None, remat="auto"):
    """The automatic plan at `micro_batches` (default: the case's count; "auto" or a tuple: the
    planner's own micro-batch search, PipeshardParallel(num_micro_batches=...)). remat:
    PipeshardParallel(remat=...); "auto" lets the stage DP rematerialize the stages whose
    activations would not fit (the Megatron baseline gets the same choice)."""
    method = mw.PipeshardParallel(num_micro_batches=micro_batches or case.micro_batches, layer_option=case.layer_option,
                                  remat=remat)
    c = cluster if capacity else dataclasses.replace(cluster, device_memory=None)
    t0 = time.perf_counter()
    result = mw.plan(case.step, case.state, case.batch, method=method, cluster=c)
    seconds = time.perf_counter() - t0
    st = result.stages
    stages = [{"layers": list(s.layers), "physical": list(s.physical_shape), "logical": list(s.mesh.shape),
               "devices": len(s.mesh.device_ids), "device_ids": list(s.mesh.device_ids), "latency": s.latency,
               "memory": s.memory, "remat": s.remat, "auto_sharding": _json_options(s.auto_sharding)} for s in st.stages]
    plan = AutoPlan(result.predicted_step_time, result.predicted_step_time,
                    max((s.memory or 0.0) for s in st.stages), stages, st.micro_batches,
                    {k: round(v, 3) for k, v in result.timings.items()}, seconds, st.candidates)
    plan.tries = [dataclasses.asdict(t) for t in result.micro_batch_search]
    return plan, st


def _json_options(options: dict) -> dict:
    """A stage's auto-sharding settings (α-β, memory price) as JSON values."""
    return {k: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v) for k, v in (options or {}).items()}


def model_stats(case: Case, st, step_flops: float) -> baselines.ModelStats:
    samples = case.global_batch // st.micro_batches
    return baselines.ModelStats(
        step_flops=step_flops, param_bytes=tree_bytes(case.state["params"]),
        layer_param_bytes=tuple(float(b) for b in st.layer_param_bytes),
        activation_bytes_per_sample=sum(st.layer_activation_bytes) / samples,
        boundary_bytes_per_sample=case.boundary_bytes_per_sample,
        tp_allreduce_bytes_per_sample=case.tp_allreduce_bytes_per_sample,
        num_layers=st.num_layers, global_batch=case.global_batch, tensor_parallel=case.tensor_parallel,
        expert_param_bytes=case.expert_param_bytes, all_to_all_bytes_per_sample=case.all_to_all_bytes_per_sample,
        moe_layers=case.moe_layers, experts=case.experts)


# ----------------------------------------------------------------------------- one row
@dataclass
class MethodResult:
    method: str
    plan: str
    step_time: float | None
    tflops_per_gpu: float | None
    percent_of_peak: float | None
    memory_per_device_gb: float
    fits: bool


@dataclass
class Row:
    suite: str
    model: str
    cluster: str
    gpus: int
    global_batch: int
    step_matmul_tflop: float
    auto: MethodResult
    auto_detail: AutoPlan
    baselines: list[MethodResult]
    megatron_configs_priced: int
    model_stats: baselines.ModelStats
    best_baseline: str
    auto_vs_best_baseline: float | None    # throughput ratio (>= 1: auto is at least as fast)
    notes: list[str] = field(default_factory=list)
    compiled: dict | None = None           # --emit-plans: the stages compiled (benchmarks/stage_programs.py)


def _result(method, plan, step_time, memory, fits, flops, cluster) -> MethodResult:
    tf = flops / step_time / cluster.num_devices / 1e12 if step_time else None
    pct = 100.0 * tf * 1e12 / cluster.peak_flops if tf is not None and cluster.peak_flops else None
    return MethodResult(method, plan, step_time, tf, pct, memory / 1e9, fits)


def _plan_or_oom(case: Case, cluster: mw.ClusterSpec, micro_batches=None, remat="auto"):
    """(plan, stage result), or (None, error text) when no stage plan fits memory."""
    from meshweave.pipeshard import NoPlanFits

    try:
        return plan_auto(case, cluster, micro_batches=micro_batches, remat=remat)
    except NoPlanFits as e:
        return None, str(e)
    except PassError as e:
        if not isinstance(e.__cause__, StageOptionError):
            raise
        return None, str(e)


def run_row(case: Case, cluster: mw.ClusterSpec, nb_factors=None, remat="auto") -> Row:
    """Plan `case` automatically, with the planner's micro-batch search (PipeshardParallel(
    num_micro_batches="auto"), or over the counts case.micro_batches x factor that divide the batch
    when `nb_factors` is given; the fastest plan that fits wins) and price the baselines."""
    notes = []
    if nb_factors is None:
        option = "auto"
    else:
        option = tuple(sorted({int(case.micro_batches * f) for f in nb_factors
                               if int(case.micro_batches * f) >= 1 and case.global_batch % int(case.micro_batches * f) == 0}))
    auto, st = _plan_or_oom(case, cluster, option, remat)
    if auto is None:                    # nothing fits: the stats come from a plan without the limit
        error = st
        notes.append(f"automatic plan: {error}")
        auto, st = plan_auto(case, cluster, capacity=False, remat=remat)
        auto.step_time, auto.error = None, error
    else:
        notes += [f"micro-batches {t['micro_batches']}: " + (f"{t['step_time']:.4g} s, planned in "
                  f"{t['seconds']:.0f} s" if t["step_time"] else "no plan fits memory") for t in auto.tries]
    flops = step_matmul_flops(case)
    stats = model_stats(case, st, flops)
    shape = " ".join(f"{'x'.join(map(str, s['logical']))}[{s['layers'][0]}:{s['layers'][1]}]"
                     + ("r" if s.get("remat") else "") for s in auto.stages)
    auto_res = _result("meshweave auto", f"{len(auto.stages)} stages {shape} mb={auto.micro_batches}",
                       auto.step_time, auto.memory_per_device, auto.step_time is not None, flops, cluster)
    mega, tried = baselines.megatron(stats, cluster, remat=(False, True) if remat else (False,))
    rows = []
    plans = [baselines.data_parallel(stats, cluster), baselines.zero2(stats, cluster),
             baselines.zero3(stats, cluster), mega]
    if stats.moe_layers:
        plans.append(baselines.expert_parallel_zero2(stats, cluster))
    for b in plans:
        rows.append(_result(b.method, b.config, b.step_time, b.memory_per_device, b.fits, flops, cluster))
    feasible = [r for r in rows if r.step_time is not None]
    best = min(feasible, key=lambda r: r.step_time) if feasible else None
    ratio = (best.step_time / auto.step_time) if best is not None and auto.step_time else None
    return Row(case.suite, case.model, cluster.name, cluster.num_devices, case.global_batch, flops / 1e12,
               auto_res, auto, rows, tried, stats, best.method if best else "none fits", ratio, notes)


# ----------------------------------------------------------------------------- output
def table(rows: list[Row]) -> str:
    head = f"{'model':>6} {'GPUs':>4} {'method':<22} {'plan':<44} {'TFLOP/s/GPU':>11} {'%peak':>6} {'mem GB':>7}"
    lines = [head, "-" * len(head)]
    for r in rows:
        for m in [r.auto] + r.baselines:
            tf = f"{m.tflops_per_gpu:11.1f}" if m.tflops_per_gpu is not None else f"{'OOM':>11}"
            pct = f"{m.percent_of_peak:6.1f}" if m.percent_of_peak is not None else f"{'':>6}"
            lines.append(f"{r.model:>6} {r.gpus:>4} {m.method:<22} {m.plan[:44]:<44} {tf} {pct} "
                         f"{m.memory_per_device_gb:7.1f}")
        t = r.auto_detail.timings
        lines.append(f"{'':>11} planning {r.auto_detail.planning_seconds:.1f} s (" +
                     ", ".join(f"{k} {v:.1f}" for k, v in t.items()) + f"); auto / best baseline "
                     + (f"{r.auto_vs_best_baseline:.2f}" if r.auto_vs_best_baseline else "n/a"))
    return "\n".join(lines)


def figure(rows: list[dict], path: str) -> None:
    """Aggregate predicted PFLOP/s per method and GPU count, as Alpa's weak-scaling bars (rows as
    in the JSON, so rows of several runs can be drawn together)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["gpus"])
    methods = list(dict.fromkeys(m["method"] for r in rows for m in [r["auto"]] + r["baselines"]))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(rows), 3.4))
    width = 0.8 / len(methods)
    for j, name in enumerate(methods):
        for i, r in enumerate(rows):
            m = next((x for x in [r["auto"]] + r["baselines"] if x["method"] == name), None)
            if m is None:
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            if m["tflops_per_gpu"] is None:
                ax.text(x, 0, "x", ha="center", va="bottom", color=f"C{j}", fontsize=9, fontweight="bold")
            else:
                ax.bar(x, m["tflops_per_gpu"] * r["gpus"] / 1e3, width, color=f"C{j}",
                       label=name if name not in ax.get_legend_handles_labels()[1] else None)
    ax.set_xticks(range(len(rows)), [f"{r['gpus']} GPUs\n{r['model']}" for r in rows])
    ax.set_ylabel("predicted PFLOP/s")
    ax.set_title(f"{rows[0]['suite'].upper()} weak scaling, {rows[0]['cluster'].split('x')[0]} preset "
                 "(plan-only; x: out of memory)", fontsize=9)
    ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


ROW_KEYS = {f.name for f in dataclasses.fields(Row)}


def merge_rows(path: str, rows: list[dict], command: str) -> dict:
    """The suite JSON at `path` with `rows` in place of its rows for the same GPU counts (others
    kept, in GPU order), re-read just before writing. A replaced row keeps the keys other tools
    added (`megatron_planned`: benchmarks/megatron_programs.py; the automatic plan's ratio to the best
    baseline they price is recomputed), but not `compiled`, which described the old plan's stages
    (recompile: benchmarks/stage_programs.py), unless the new row has it. The
    file's `command` stays; the merging run's command is appended to `merged_commands`."""
    with open(path) as f:
        doc = json.load(f)
    old = {r["gpus"]: r for r in doc["rows"]}
    for r in rows:
        kept = {k: v for k, v in old.get(r["gpus"], {}).items() if k not in ROW_KEYS}
        merged = old[r["gpus"]] = {**r, **kept}
        if "auto_vs_best_planned" in merged:         # the comparison with the new automatic plan
            from benchmarks.megatron_programs import planned_comparison

            merged["best_baseline_planned"], merged["auto_vs_best_planned"] = planned_comparison(
                merged, merged["megatron_planned"], mw.ClusterSpec.preset(merged["cluster"].split("x")[0],
                                                                          merged["gpus"]).peak_flops)
    doc["rows"] = [old[g] for g in sorted(old)]
    log = doc.setdefault("merged_commands", [])
    if not log or log[-1]["command"] != command:     # one entry per run (it merges after every row)
        log.append({"command": command, "gpus": [], "load_average_1_5_15min": list(os.getloadavg())})
    log[-1]["gpus"] = sorted(set(log[-1]["gpus"]) | {r["gpus"] for r in rows})
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
    return doc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("gpt", "bert", "moe", "wresnet"), default="gpt")
    p.add_argument("--cluster", choices=("h100", "p3"), default="h100")
    p.add_argument("--gpus", default="8,16,32,64")
    p.add_argument("--nb-factors", default=None, help="micro-batch counts to plan, as multiples of Alpa's count for "
                   "the row (e.g. 0.5,1,4); the fastest automatic plan that fits is reported (default: the "
                   "planner's own search, num_micro_batches='auto')")
    p.add_argument("--remat", choices=("auto", "true", "false"), default="auto", help="rematerialization: 'auto' "
                   "lets the stage DP choose per stage and Megatron choose full recomputation; 'false' offers neither")
    p.add_argument("--emit-plans", action="store_true", help="also compile every automatic plan's stages on "
                   "simulated CPU devices (one process per row) into benchmarks/results/plans/<suite>_<cluster>_<gpus>/")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<suite>_<cluster>.json)")
    p.add_argument("--merge", action="store_true", help="replace only these GPU counts' rows of the existing --out "
                   "JSON (other rows and keys kept; the command appended to its merged_commands)")
    p.add_argument("--plot", nargs="+", metavar="JSON", help="only draw the rows of these result files together "
                   "(to --out's .png)")
    args = p.parse_args(argv)
    if args.plot:
        rows = [r for path in args.plot for r in json.load(open(path))["rows"]]
        png = (args.out or os.path.join(RESULTS, f"{args.suite}_{args.cluster}.json"))[:-5] + ".png"
        figure(rows, png)
        print("wrote", png)
        return
    from tqdm import tqdm

    gpus = [int(g) for g in args.gpus.split(",")]
    out = args.out or os.path.join(RESULTS, f"{args.suite}_{args.cluster}.json")
    if args.merge and not os.path.exists(out):
        raise SystemExit(f"--merge replaces rows of {out}, which does not exist; run without --merge to write it")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    rows = []
    bar = tqdm(gpus, desc=f"{args.suite} on {args.cluster}", unit="row")
    for g in bar:
        case = weak_scaling_case(args.suite, g)
        bar.set_postfix_str(f"{case.model} on {g} GPUs")
        rows.append(run_row(case, mw.ClusterSpec.preset(args.cluster, g),
                            tuple(float(x) for x in args.nb_factors.split(",")) if args.nb_factors else None,
                            {"auto": "auto", "true": True, "false": False}[args.remat]))
        if args.emit_plans:
            from benchmarks import stage_programs

            bar.set_postfix_str(f"{case.model} on {g} GPUs: compiling its stages")
            row = rows[-1]
            row.compiled = stage_programs.summary(stage_programs.compile_row_in_subprocess(
                args.suite, args.cluster, dataclasses.asdict(row), stage_programs.plan_dir(args.suite, args.cluster, g)))
        command = "python -m benchmarks.suite " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.merge:                   # after every row: a long run that is stopped keeps what it planned
            doc = merge_rows(out, [dataclasses.asdict(rows[-1])], command)
            continue
        doc = {"command": command,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
               "load_average_1_5_15min": os.getloadavg(),        # the machine is shared: planning times vary
               "cluster_preset": dataclasses.asdict(mw.ClusterSpec.preset(args.cluster, gpus[-1])),
               "rows": [dataclasses.asdict(r) for r in rows]}
        with open(out, "w") as f:
            json.dump(doc, f, indent=1)
    print(table(rows))
    figure(doc["rows"], out[:-5] + ".png")
    print("wrote", out, "and", out[:-5] + ".png")


if __name__ == "__main__":
    main()

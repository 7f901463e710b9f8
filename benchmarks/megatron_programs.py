"""Megatron-LM's dp x tp x pp layout as a meshweave program, not a formula.

The analytic baseline (`baselines.megatron`) prices every dp x tp x pp x micro-batch configuration
of a suite row with a formula; here a configuration is written down the way a user would hand it
to meshweave: `ManualStageOption` with pp stages of equal layer counts, each on a (dp, tp) logical
mesh (tp inside a host, as the analytic model places it), and a `ManualShardingOption` pinning
Megatron's layouts in every stage (`LAYOUTS`: GPT, BERT, the MoE LM, Wide-ResNet): column-parallel
QKV and first MLP matmul, row-parallel attention output and second MLP matmul, vocabulary-parallel
embedding and LM head (all on the "y" = tp axis), optimizer state laid out like its parameter, the
batch split over "x" = dp. The auto-sharding ILP keeps these pins and chooses only the rest.

--plan-only ranks configurations by mw.plan's price instead of the formula's: the `--top` fastest
by formula (memory up to `--memory-slack` x capacity by the formula's count) are planned with
`mw.plan` (no devices) and the fastest that fits by mw.plan's own memory count is the row's
Megatron baseline ("megatron_planned": every try and the chosen one; "best_baseline_planned" and
"auto_vs_best_planned": the best baseline with Megatron priced so). Without --plan-only the row's
configuration (mw.plan's choice if ranked, else the formula's) is compiled by XLA on simulated CPU
devices and judged by the α-β evaluator like the automatic plan's stages.

    python -m benchmarks.megatron_programs benchmarks/results/gpt_h100.json --plan-only [--top 6] [--gpus 8,16]
    python -m benchmarks.megatron_programs benchmarks/results/gpt_h100.json [--gpus 8,16]
        -> benchmarks/results/plans/<suite>_<cluster>_<gpus>_megatron/{stage_<k>.hlo.gz, plan.json}
           and each row's "megatron_compiled" entry in the suite JSON
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field

from benchmarks import stage_programs as sp

# Parameter name -> PartitionSpec entries (None: whole), by the leaf's key and its parent's key.
# "y" is the tensor-parallel axis of each stage's (dp, tp) mesh; leaves not listed are replicated.
_ATTENTION = {"wq": (None, "y", None), "wk": (None, "y", None), "wv": (None, "y", None), "wo": ("y", None, None),
              "embed": ("y", None), "head": (None, "y")}
_GPT = {**_ATTENTION, ("fc1", "kernel"): (None, "y"), ("fc1", "bias"): ("y",), ("fc2", "kernel"): ("y", None)}
_BERT = {("qkv", "kernel"): (None, None, "y", None), ("qkv", "bias"): (None, "y", None),
         ("out", "kernel"): ("y", None, None), ("fc1", "kernel"): (None, "y"), ("fc1", "bias"): ("y",),
         ("fc2", "kernel"): ("y", None), "embed": ("y", None), ("head", "kernel"): (None, "y"),
         ("head", "bias"): ("y",)}
# MoE: attention as GPT's; every expert's MLP as Megatron's MLP, column-parallel wi (E, d, f) and
# row-parallel wo_e (E, f, d) on f; the gate (d, E) replicated, so each tp rank routes all tokens.
_MOE = {**_ATTENTION, "wi": (None, None, "y"), "wo_e": (None, "y", None)}
# Wide-ResNet: nothing. Megatron's tensor parallelism splits transformer matmuls; the analytic
# baseline prices convolutions with tensor_parallel=False (tp=1 only), so a stage is plain data
# parallelism: every weight and its optimizer state replicated over dp, the batch split over it.
_WRESNET: dict = {}
LAYOUTS = {"gpt": _GPT, "bert": _BERT, "moe": _MOE, "wresnet": _WRESNET}

def parse_config(config: str) -> tuple[int, int, int, int]:
    """'dp=2 tp=4 pp=8 mb=512' -> (2, 4, 8, 512) (a trailing ' remat', full recomputation: see
    `recomputes`)."""
    m = re.fullmatch(r"dp=(\d+) tp=(\d+) pp=(\d+) mb=(\d+)( remat)?", config.strip())
    if not m:
        raise ValueError(f"not a Megatron configuration: {config!r} (expected 'dp=.. tp=.. pp=.. mb=..[ remat]')")
    return tuple(int(x) for x in m.groups()[:4])


def recomputes(config: str) -> bool:
    """Whether a Megatron configuration uses full activation recomputation (baselines.megatron_config)."""
    return config.strip().endswith(" remat")


def megatron_sharding(suite: str, state, batch):
    """ManualShardingOption with Megatron's layouts for a zoo model's state and its batch (suites of
    `LAYOUTS`): the listed leaves split over "y", every other state leaf replicated, the batch over "x"."""
    import jax
    from jax.sharding import PartitionSpec as P
    from jax.tree_util import DictKey

    import meshweave as mw

    if suite not in LAYOUTS:
        raise ValueError(f"Megatron layouts are written for {', '.join(LAYOUTS)}, not {suite!r}")
    table = LAYOUTS[suite]

    def spec(path, leaf):
        keys = [k.key for k in path if isinstance(k, DictKey)]
        entry = table.get(tuple(keys[-2:])) or table.get(keys[-1] if keys else None)
        if entry is None:
            return P()
        if len(entry) != len(leaf.shape):       # a renamed or reshaped model: say so, do not replicate it
            raise ValueError(f"Megatron's {suite} layout {entry} for {jax.tree_util.keystr(path)} expects "
                             f"{len(entry)} dimensions, the leaf has shape {tuple(leaf.shape)}; update "
                             f"megatron_programs.LAYOUTS[{suite!r}] for this model")
        return P(*entry)

    state_specs = jax.tree_util.tree_map_with_path(spec, state)
    batch_specs = jax.tree.map(lambda x: P("x") if len(x.shape) else P(), batch)
    return mw.ManualShardingOption(in_axis_resources=(state_specs, batch_specs))


def megatron_stages(num_layers: int, dp: int, tp: int, pp: int) -> list[sp.StageLayout]:
    """pp stages of (as nearly as possible) equal layer counts, each on a (dp, tp) mesh."""
    if pp > num_layers:
        raise ValueError(f"pp={pp} exceeds the model's {num_layers} layers")
    bounds = [round(i * num_layers / pp) for i in range(pp + 1)]
    return [sp.StageLayout((bounds[i], bounds[i + 1]), (dp, tp)) for i in range(pp)]


def stage_option(stages: list[sp.StageLayout], cluster):
    """ManualStageOption for `stages` on `cluster`: (dp, tp) sub-meshes of whole hosts (tp inside one)."""
    import math

    import meshweave as mw

    def physical(n):
        return (n // cluster.devices_per_host, cluster.devices_per_host) if n > cluster.devices_per_host else (1, n)

    return mw.ManualStageOption(tuple(tuple(range(*s.layers)) for s in stages),
                                tuple(physical(math.prod(s.logical_shape)) for s in stages),
                                tuple(tuple(s.logical_shape) for s in stages))


def plan_config(suite_name: str, cluster_name: str, row: dict, config: str, cluster=None):
    """One Megatron configuration ('dp=.. tp=.. pp=.. mb=..[ remat]') of a suite row through `mw.plan`
    (no devices): the ILPs keep Megatron's pins on each (dp, tp) stage mesh, the stage DP's pipeline
    objective prices it. Returns (case, stages with mw.plan's latencies, sharding, PlanResult)."""
    import meshweave as mw
    from benchmarks import suite

    dp, tp, pp, k = parse_config(config)
    case = suite.make_case(suite_name, row["model"], row["global_batch"], k)
    cluster = cluster or mw.ClusterSpec.preset(cluster_name, row["gpus"])
    remat = recomputes(config)
    stages = [dataclasses.replace(s, remat=remat) for s in megatron_stages(row["model_stats"]["num_layers"], dp, tp, pp)]
    sharding = megatron_sharding(suite_name, case.state, case.batch)
    planned = mw.plan(case.step, case.state, case.batch, cluster=cluster, method=mw.PipeshardParallel(
        num_micro_batches=k, layer_option=case.layer_option, stage_option=stage_option(stages, cluster),
        manual_sharding=sharding, remat=remat))
    stages = [dataclasses.replace(s, predicted_latency=p.latency) for s, p in zip(stages, planned.stages.stages)]
    return case, stages, sharding, planned


def row_config(row: dict) -> str:
    """The row's Megatron configuration: the one mw.plan's ranking chose, else the formula's."""
    chosen = (row.get("megatron_planned") or {}).get("config")
    return chosen or next(b for b in row["baselines"] if b["method"].startswith("Megatron"))["plan"]


# ----------------------------------------------------------------------------- ranking by mw.plan
EXTEND = 3                      # rank_row: at most this many times `top` plans when none of the first fits


@dataclass
class MegatronTry:
    """One configuration priced by the formula and then planned by mw.plan."""

    config: str
    analytic_step_time: float           # the formula's (also where its memory model says it does not fit)
    analytic_memory: float              # bytes per device, the formula's count
    analytic_fits: bool
    planned_step_time: float | None = None   # mw.plan's pipeline objective; None: not planned
    memory_per_device: float | None = None   # mw.plan's count (bytes, max over stages); None: unknown
    fits: bool | None = None                 # by mw.plan's memory count; None: unknown
    stage_latencies: list = field(default_factory=list)
    planning_seconds: float = 0.0
    error: str = ""                          # why mw.plan gave no price (e.g. the step does not trace)


@dataclass
class MegatronRanking:
    formula_config: str                 # baselines.megatron's choice (its fastest that fits its memory model)
    top: int                            # configurations planned (failed traces not counted)
    memory_slack: float                 # formula memory up to slack x capacity was tried
    capacity: float | None
    tries: list[MegatronTry]
    chosen: MegatronTry | None          # the fastest that fits by mw.plan's memory count


def model_stats_of(row: dict):
    """The row's `baselines.ModelStats` as the suite measured them (JSON -> dataclass)."""
    from benchmarks import baselines

    stats = dict(row["model_stats"])
    stats["layer_param_bytes"] = tuple(stats["layer_param_bytes"])
    return baselines.ModelStats(**stats)


def remat_choices(command: str) -> tuple[bool, ...]:
    """Megatron's recomputation choices the suite offered (`--remat false`: none)."""
    return (False,) if re.search(r"--remat[ =]false", command) else (False, True)


def formula_ranking(stats, cluster, remat=(False, True), memory_slack: float = 1.25) -> list:
    """Every configuration the analytic baseline prices (`baselines.megatron_configs` x remat) whose
    formula memory is within `memory_slack` x capacity (the two models count memory differently),
    fastest by formula first."""
    from benchmarks import baselines

    cap = cluster.device_memory if cluster.device_memory is not None else float("inf")
    plans = [baselines.megatron_config(stats, cluster, *cfg, remat=r)
             for cfg in baselines.megatron_configs(stats, cluster) for r in remat]
    # step_time is None where the formula's memory model says "does not fit"; its time is compute + comm.
    return sorted((p for p in plans if p.memory_per_device <= memory_slack * cap),
                  key=lambda p: p.compute_time + p.communication_time)


def plan_or_reason(plan, samples: int):
    """`plan()` (an mw.plan of a hand-written layout) as (PlanResult, "", False), or (None, why,
    untraceable) when the step does not trace at `samples` per micro-batch (untraceable: True) or
    mw.plan refuses the layout (a PassError or PipeshardError, e.g. a stage mesh the ILP cannot use).
    Anything else propagates."""
    from meshweave.passes.registry import PassError
    from meshweave.pipeshard import PipeshardError
    from meshweave.plugin.arguments import ArgumentError

    try:
        return plan(), "", False
    except ArgumentError as e:
        if "could not trace" not in str(e):
            raise
        return None, f"the step does not trace at {samples} sample(s) per micro-batch: {e}", True
    except (PassError, PipeshardError) as e:
        return None, f"{type(e).__name__}: {e}", False


def memory_fit(planned, capacity: float | None) -> tuple[float | None, bool | None]:
    """mw.plan's memory per device of a plan and whether it fits `capacity` (None: unknown)."""
    memory = planned.memory_per_device
    return memory, (None if memory is None else capacity is None or memory <= capacity)


def try_summary(t) -> str:
    """One log line's mw.plan part of a try (MegatronTry or expert_programs.EPTry)."""
    if not t.planned_step_time:
        return t.error[:120] + f" ({t.planning_seconds} s)"
    memory = f"{t.memory_per_device / 1e9:.1f} GB/device" if t.memory_per_device is not None else "memory unknown"
    return f"{t.planned_step_time:.4g} s, {memory} ({t.planning_seconds} s)"


def rank_row(suite_name: str, cluster_name: str, row: dict, top: int = 6, remat=(False, True),
             memory_slack: float = 1.25, log=print, cluster=None) -> MegatronRanking:
    """Plan the `top` fastest configurations by formula with mw.plan and choose the fastest that fits
    by mw.plan's memory count. A configuration whose step does not trace at its micro-batch size is a
    failed try (recorded, not counted in `top`); so is every other one at the same micro-batch size.
    If none of the `top` fits (mw.plan counts more memory than the formula: e.g. GPT-15B on 32 p3
    GPUs), the walk goes on in the formula's order, up to EXTEND x `top` plans, over the
    configurations whose formula memory times the least mw.plan / formula ratio seen is within
    capacity, until one fits.
    `cluster`: the row's preset unless given (tests: another memory capacity)."""
    import meshweave as mw
    from benchmarks import baselines

    stats, cluster = model_stats_of(row), cluster or mw.ClusterSpec.preset(cluster_name, row["gpus"])
    formula_best, _ = baselines.megatron(stats, cluster, remat=remat)
    tries, no_trace, planned_count = [], {}, 0
    cap = cluster.device_memory
    ratio = None                # the least mw.plan / formula memory seen: what may still fit by mw.plan
    for plan in formula_ranking(stats, cluster, remat, memory_slack):
        if planned_count >= top:
            if any(t.fits for t in tries) or planned_count >= EXTEND * top:
                break
            if ratio is not None and cap is not None and plan.memory_per_device * ratio > cap:
                continue        # the walk goes on only for one that may fit
        dp, tp, pp, k = parse_config(plan.config)
        samples = stats.global_batch // dp // k
        t = MegatronTry(plan.config, plan.compute_time + plan.communication_time, plan.memory_per_device, plan.fits)
        tries.append(t)
        if samples in no_trace:
            t.error = no_trace[samples]
            continue
        t0 = time.perf_counter()
        planned, t.error, untraceable = plan_or_reason(
            lambda: plan_config(suite_name, cluster_name, row, plan.config, cluster)[3], samples)
        if untraceable:
            no_trace[samples] = t.error
        else:
            planned_count += 1
        if planned is not None:
            t.planned_step_time = planned.predicted_step_time
            t.stage_latencies = [s.latency for s in planned.stages.stages]
            t.memory_per_device, t.fits = memory_fit(planned, cap)
            if t.memory_per_device is not None:
                r = t.memory_per_device / t.analytic_memory
                ratio = r if ratio is None else min(ratio, r)
        t.planning_seconds = round(time.perf_counter() - t0, 1)
        log(f"  {t.config}: formula {t.analytic_step_time:.4g} s, mw.plan " + try_summary(t))
    priced = [t for t in tries if t.planned_step_time is not None]
    chosen = min((t for t in priced if t.fits), key=lambda t: t.planned_step_time, default=None)
    return MegatronRanking(formula_best.config, top, memory_slack, cluster.device_memory, tries, chosen)


def planned_entry(ranking: MegatronRanking, seconds: float) -> dict:
    """A suite row's "megatron_planned": the chosen configuration's fields at the top level (the keys
    earlier tooling reads), the formula's choice and every try."""
    c = ranking.chosen
    head = {"config": c.config if c else None, "analytic_step_time": c.analytic_step_time if c else None,
            "planned_step_time": c.planned_step_time if c else None,
            "memory_per_device": c.memory_per_device if c else None,
            "stage_latencies": c.stage_latencies if c else [], "planning_seconds": round(seconds, 1)}
    return {**head, "formula_config": ranking.formula_config, "top": ranking.top,
            "memory_slack": ranking.memory_slack, "capacity": ranking.capacity,
            "tries": [dataclasses.asdict(t) for t in ranking.tries]}


def planned_comparison(row: dict, entry: dict, peak_flops: float | None) -> tuple[dict | None, float | None]:
    """The row's best baseline with Megatron as the program mw.plan chose (and expert parallel +
    ZeRO-2 too where `benchmarks.expert_programs` planned it; the other baselines stay analytic), and
    the automatic plan's throughput over it (>= 1: auto is at least as fast)."""
    ep = row.get("ep_zero2_planned")
    candidates = [{"method": b["method"], "plan": b["plan"], "step_time": b["step_time"], "priced_by": "formula"}
                  for b in row["baselines"] if not b["method"].startswith("Megatron") and b["step_time"] is not None
                  and not (ep is not None and b["method"] == "expert parallel + ZeRO-2")]
    if ep is not None and ep.get("planned_step_time") is not None:
        candidates.append({"method": "expert parallel + ZeRO-2", "plan": ep["config"],
                           "step_time": ep["planned_step_time"], "priced_by": "mw.plan"})
    if entry.get("planned_step_time") is not None:
        candidates.append({"method": "Megatron dp x tp x pp", "plan": entry["config"],
                           "step_time": entry["planned_step_time"], "priced_by": "mw.plan"})
    if not candidates:
        return None, None
    best = min(candidates, key=lambda b: b["step_time"])
    tf = row["step_matmul_tflop"] / best["step_time"] / row["gpus"]
    best["tflops_per_gpu"] = tf
    best["percent_of_peak"] = 100.0 * tf * 1e12 / peak_flops if peak_flops else None
    auto = row["auto"]["step_time"]
    return best, (best["step_time"] / auto if auto else None)


def compile_megatron(suite_name: str, cluster_name: str, row: dict, out_dir: str) -> sp.CompiledPlan:
    """In this process (with the row's devices): the row's best Megatron configuration, compiled."""
    import meshweave as mw

    config = row_config(row)
    case, stages, sharding, planned = plan_config(suite_name, cluster_name, row, config)
    dp, tp, pp, k = parse_config(config)
    cluster = mw.ClusterSpec.preset(cluster_name, row["gpus"])
    plan = sp.compile_stages(case.step, case.state, case.batch, stages, k, cluster, case.layer_option, out_dir,
                             manual_sharding=sharding)
    plan.suite, plan.model = suite_name, case.model
    plan.directory = os.path.relpath(out_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    plan.timings["plan_seconds"] = round(sum(planned.timings.values()), 3)
    plan.planned_step_time = planned.predicted_step_time     # the ILPs around Megatron's pins, the DP's objective
    plan.notes.append(f"Megatron dp={dp} tp={tp} pp={pp} mb={k} (the row's Megatron configuration)")
    return plan


def _worker(request_path: str) -> None:
    with open(request_path) as f:
        req = json.load(f)
    plan = compile_megatron(req["suite"], req["cluster"], req["row"], req["out_dir"])
    doc = dataclasses.asdict(plan)
    doc["judged_step_time"] = sp.judged_step_time(doc)
    with open(os.path.join(req["out_dir"], "plan.json"), "w") as f:
        json.dump(doc, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a suite JSON (benchmarks/results/<suite>_<cluster>.json)")
    p.add_argument("--gpus", default=None, help="only these rows (e.g. 8,16)")
    p.add_argument("--plans-dir", default=None)
    p.add_argument("--plan-only", action="store_true", help="rank the Megatron configurations by mw.plan's price "
                   "(no devices, no XLA compile) into each row's \"megatron_planned\" entry")
    p.add_argument("--top", type=int, default=6, help="--plan-only: plan this many configurations, the fastest by "
                   "formula (those whose step does not trace at their micro-batch size are tried but not counted)")
    p.add_argument("--memory-slack", type=float, default=1.25, help="--plan-only: also plan configurations the "
                   "formula says need up to this multiple of the device memory")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    import meshweave as mw

    doc, want = sp.load_suite_json(p, args)
    remat = remat_choices(doc["command"])
    cmd = "python -m benchmarks.megatron_programs " + " ".join(sys.argv[1:] if argv is None else argv)
    for row in doc["rows"]:
        if (want and row["gpus"] not in want) or not any(b["method"].startswith("Megatron") for b in row["baselines"]):
            continue
        cluster = row["cluster"].split("x")[0]
        if args.plan_only:
            print(f"{row['suite']} {row['cluster']} {row['model']}: the {args.top} fastest Megatron configurations "
                  f"by formula through mw.plan")
            t0 = time.perf_counter()
            ranking = rank_row(row["suite"], cluster, row, args.top, remat, args.memory_slack)
            entry = planned_entry(ranking, time.perf_counter() - t0)
            best, ratio = planned_comparison(row, entry, mw.ClusterSpec.preset(cluster, row["gpus"]).peak_flops)
            print(f"  chosen {entry['config']} (formula's choice {entry['formula_config']}); best baseline "
                  + (f"{best['method']} {best['plan']} {best['step_time']:.4g} s ({best['priced_by']}); auto / it "
                     + (f"{ratio:.2f}" if ratio else "n/a") if best else "none"))
            sp.record(args.results, row["gpus"], {"megatron_planned": entry, "best_baseline_planned": best,
                                                  "auto_vs_best_planned": ratio}, cmd)
            continue
        out = sp.plan_dir(row["suite"], cluster, row["gpus"], args.plans_dir) + "_megatron"
        t0 = time.perf_counter()
        compiled = sp.run_worker("benchmarks.megatron_programs", row["suite"], cluster, row, out)
        entry = sp.summary(compiled)
        entry["config"] = row_config(row)
        row["megatron_compiled"] = entry
        print(f"{row['suite']} {row['cluster']} {row['model']} Megatron {entry['config']}: judged step "
              f"{compiled['judged_step_time']} s; compiled in {time.perf_counter() - t0:.0f} s -> {out}")
        sp.record(args.results, row["gpus"], {"megatron_compiled": entry}, cmd)


if __name__ == "__main__":
    main()

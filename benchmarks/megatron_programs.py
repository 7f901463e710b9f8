"""Megatron-LM's dp x tp x pp layout as a meshweave program, not a formula.

The analytic baseline (`baselines.megatron`) picks the best dp x tp x pp x micro-batch
configuration of a suite row; here that configuration is written down the way a user would hand
it to meshweave: `ManualStageOption` with pp stages of equal layer counts, each on a (dp, tp)
logical mesh (tp inside a host, as the analytic model places it), and a `ManualShardingOption`
pinning Megatron's layouts in every stage: column-parallel QKV and first MLP matmul, row-parallel
attention output and second MLP matmul, vocabulary-parallel embedding and LM head (all on the
"y" = tp axis), optimizer state laid out like its parameter, the batch split over "x" = dp. The
auto-sharding ILP keeps these pins and chooses only the rest; XLA compiles each fragment on
simulated CPU devices, and the α-β evaluator judges it like the automatic plan's stages.

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

from benchmarks import stage_programs as sp

# Parameter name -> PartitionSpec entries (None: whole), by the leaf's key and its parent's key.
# "y" is the tensor-parallel axis of each stage's (dp, tp) mesh.
_GPT = {"wq": (None, "y", None), "wk": (None, "y", None), "wv": (None, "y", None), "wo": ("y", None, None),
        ("fc1", "kernel"): (None, "y"), ("fc1", "bias"): ("y",), ("fc2", "kernel"): ("y", None),
        "embed": ("y", None), "head": (None, "y")}
_BERT = {("qkv", "kernel"): (None, None, "y", None), ("qkv", "bias"): (None, "y", None),
         ("out", "kernel"): ("y", None, None), ("fc1", "kernel"): (None, "y"), ("fc1", "bias"): ("y",),
         ("fc2", "kernel"): ("y", None), "embed": ("y", None), ("head", "kernel"): (None, "y"),
         ("head", "bias"): ("y",)}
LAYOUTS = {"gpt": _GPT, "bert": _BERT}


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
    """ManualShardingOption with Megatron's layouts for a zoo GPT or BERT state and its batch."""
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
        return P(*entry) if entry is not None and len(entry) == len(leaf.shape) else P()

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


def plan_megatron(suite_name: str, cluster_name: str, row: dict):
    """The row's best analytic Megatron configuration through `mw.plan` (no devices): the ILPs keep
    Megatron's pins on each (dp, tp) stage mesh, the stage DP's pipeline objective prices it.
    Returns (case, stages with mw.plan's latencies, sharding, PlanResult, (dp, tp, pp, k))."""
    import meshweave as mw
    from benchmarks import suite

    mega = next(b for b in row["baselines"] if b["method"].startswith("Megatron"))
    dp, tp, pp, k = parse_config(mega["plan"])
    case = suite.make_case(suite_name, row["model"], row["global_batch"], k)
    cluster = mw.ClusterSpec.preset(cluster_name, row["gpus"])
    remat = recomputes(mega["plan"])
    stages = [dataclasses.replace(s, remat=remat) for s in megatron_stages(row["model_stats"]["num_layers"], dp, tp, pp)]
    sharding = megatron_sharding(suite_name, case.state, case.batch)
    planned = mw.plan(case.step, case.state, case.batch, cluster=cluster, method=mw.PipeshardParallel(
        num_micro_batches=k, layer_option=case.layer_option, stage_option=stage_option(stages, cluster),
        manual_sharding=sharding, remat=remat))
    stages = [dataclasses.replace(s, predicted_latency=p.latency) for s, p in zip(stages, planned.stages.stages)]
    return case, stages, sharding, planned, (dp, tp, pp, k)


def planned_entry(row: dict, planned, seconds: float) -> dict:
    """What a suite JSON row keeps of mw.plan's pricing of its Megatron configuration."""
    mega = next(b for b in row["baselines"] if b["method"].startswith("Megatron"))
    # No memory here: mw.plan does not count it for hand-given stages (StageSpec.memory is None).
    return {"config": mega["plan"], "analytic_step_time": mega["step_time"],
            "planned_step_time": planned.predicted_step_time,
            "stage_latencies": [s.latency for s in planned.stages.stages],
            "planning_seconds": round(seconds, 1)}


def compile_megatron(suite_name: str, cluster_name: str, row: dict, out_dir: str) -> sp.CompiledPlan:
    """In this process (with the row's devices): the row's best Megatron configuration, compiled."""
    import meshweave as mw

    case, stages, sharding, planned, (dp, tp, pp, k) = plan_megatron(suite_name, cluster_name, row)
    cluster = mw.ClusterSpec.preset(cluster_name, row["gpus"])
    plan = sp.compile_stages(case.step, case.state, case.batch, stages, k, cluster, case.layer_option, out_dir,
                             manual_sharding=sharding)
    plan.suite, plan.model = suite_name, case.model
    plan.directory = os.path.relpath(out_dir, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    plan.timings["plan_seconds"] = round(sum(planned.timings.values()), 3)
    plan.planned_step_time = planned.predicted_step_time     # the ILPs around Megatron's pins, the DP's objective
    plan.notes.append(f"Megatron dp={dp} tp={tp} pp={pp} mb={k} (the row's best analytic configuration)")
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
    p.add_argument("results", nargs="?", help="a suite JSON (gpt or bert)")
    p.add_argument("--gpus", default=None, help="only these rows (e.g. 8,16)")
    p.add_argument("--plans-dir", default=None)
    p.add_argument("--plan-only", action="store_true", help="only price each row's Megatron layout with mw.plan "
                   "(no devices, no XLA compile) into the row's \"megatron_planned\" entry")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)
    doc, want = sp.load_suite_json(p, args)
    for row in doc["rows"]:
        if (want and row["gpus"] not in want) or not any(b["method"].startswith("Megatron") for b in row["baselines"]):
            continue
        cluster = row["cluster"].split("x")[0]
        cmd = "python -m benchmarks.megatron_programs " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.plan_only:
            t0 = time.perf_counter()
            _, _, _, planned, _ = plan_megatron(row["suite"], cluster, row)
            entry = planned_entry(row, planned, time.perf_counter() - t0)
            print(f"{row['suite']} {row['cluster']} {row['model']} Megatron {entry['config']}: analytic "
                  f"{entry['analytic_step_time']} s, mw.plan {entry['planned_step_time']:.4g} s "
                  f"({entry['planning_seconds']} s)")
            sp.record(args.results, row["gpus"], "megatron_planned", entry, cmd)
            continue
        out = sp.plan_dir(row["suite"], cluster, row["gpus"], args.plans_dir) + "_megatron"
        t0 = time.perf_counter()
        compiled = sp.run_worker("benchmarks.megatron_programs", row["suite"], cluster, row, out)
        entry = sp.summary(compiled)
        entry["config"] = next(b["plan"] for b in row["baselines"] if b["method"].startswith("Megatron"))
        row["megatron_compiled"] = entry
        print(f"{row['suite']} {row['cluster']} {row['model']} Megatron {entry['config']}: judged step "
              f"{compiled['judged_step_time']} s; compiled in {time.perf_counter() - t0:.0f} s -> {out}")
        sp.record(args.results, row["gpus"], "megatron_compiled", entry, cmd)


if __name__ == "__main__":
    main()

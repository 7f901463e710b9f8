"""Whole planning time of one suite row, by phase: the issue's yardstick is GPT-39B on 64 virtual
GPUs (Alpa: about 40 minutes).

The row is planned plan-only (abstract arguments, no devices) at Alpa's micro-batch count (what
Alpa's planning time covers: it does not search the count) and, with --search, also with meshweave's
micro-batch search (`num_micro_batches="auto"`, the suite's default; several plans), each timed from
the call to `mw.plan` to its result, with the phases `PlanResult.timings` reports.

    python -m benchmarks.planning_time [--suite gpt --cluster h100 --gpus 64] [--search]
        -> benchmarks/results/planning_time_<suite>_<cluster>_<gpus>.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

from benchmarks import suite


def time_plan(case, cluster, micro_batches) -> dict:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    plan, _ = suite.plan_auto(case, cluster, micro_batches=micro_batches)
    seconds = time.perf_counter() - t0
    return {"micro_batches": micro_batches or case.micro_batches, "seconds": round(seconds, 2),
            "timings": plan.timings, "ilp_solves": plan.ilp_solves, "step_time": plan.step_time,
            "plan": [(s["layers"], s["logical"], s["remat"]) for s in plan.stages], "chosen_micro_batches":
            plan.micro_batches, "load_average_1min_before": round(load, 2)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", choices=("gpt", "bert", "moe", "wresnet"), default="gpt")
    p.add_argument("--cluster", choices=("h100", "p3"), default="h100")
    p.add_argument("--gpus", type=int, default=64)
    p.add_argument("--search", action="store_true", help="also time the plan with the micro-batch search")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    import meshweave as mw
    import jax

    case = suite.weak_scaling_case(args.suite, args.gpus)
    cluster = mw.ClusterSpec.preset(args.cluster, args.gpus)
    rows = [time_plan(case, cluster, None)] + ([time_plan(case, cluster, "auto")] if args.search else [])
    doc = {"command": "python -m benchmarks.planning_time " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
           "model": case.model, "cluster": args.cluster, "gpus": args.gpus, "rows": rows}
    out = args.out or os.path.join(suite.RESULTS, f"planning_time_{args.suite}_{args.cluster}_{args.gpus}.json")
    with open(out, "w") as f:
        json.dump(doc, f, indent=1)
    for r in rows:
        print(f"{case.model} on {args.gpus} {args.cluster}, micro-batches {r['micro_batches']}: {r['seconds']:.1f} s "
              f"({', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}; load {r['load_average_1min_before']})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

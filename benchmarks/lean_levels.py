"""The stage DP's memory-lean levels (`stage_profiling.LEAN_PRICE_FACTORS`) at one micro-batch count:
the predicted step time and planning time of a suite row's automatic plan with each set of factors.

    python -m benchmarks.lean_levels --suite gpt --cluster p3 --gpus 32 --micro-batches 1024 \
        --factors 0.2,5 0.05,0.2,5   -> benchmarks/results/lean_levels_<suite>_<cluster>_<gpus>.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def plan_with(suite_name: str, cluster_name: str, gpus: int, micro_batches: int, factors: tuple[float, ...]) -> dict:
    import meshweave as mw
    from benchmarks import suite
    from meshweave.passes import stage_profiling

    stage_profiling.LEAN_PRICE_FACTORS = factors
    case = suite.weak_scaling_case(suite_name, gpus)
    case = suite.make_case(suite_name, case.model, case.global_batch, micro_batches)
    t0 = time.perf_counter()
    p = mw.plan(case.step, case.state, case.batch, cluster=mw.ClusterSpec.preset(cluster_name, gpus),
                method=mw.PipeshardParallel(num_micro_batches=micro_batches, layer_option=case.layer_option,
                                            remat="auto"))
    return {"factors": list(factors), "model": case.model, "step_time": p.predicted_step_time,
            "memory_per_device": p.memory_per_device, "planning_seconds": round(time.perf_counter() - t0, 1),
            "stages": [{"layers": list(s.layers), "logical": list(s.mesh.shape), "remat": s.remat,
                        "lean": bool(s.auto_sharding.get("memory_price"))} for s in p.stages.stages]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suite", default="gpt")
    p.add_argument("--cluster", default="p3")
    p.add_argument("--gpus", type=int, default=32)
    p.add_argument("--micro-batches", type=int, default=1024)
    p.add_argument("--factors", nargs="+", default=["0.2,5", "0.05,0.2,5"])
    args = p.parse_args(argv)
    rows = []
    for f in args.factors:
        rows.append(plan_with(args.suite, args.cluster, args.gpus, args.micro_batches,
                              tuple(float(x) for x in f.split(","))))
        print(f"factors {f}: {rows[-1]['step_time']:.4g} s per step, planned in {rows[-1]['planning_seconds']} s")
    out = os.path.join(RESULTS, f"lean_levels_{args.suite}_{args.cluster}_{args.gpus}.json")
    with open(out, "w") as fh:
        json.dump({"command": "python -m benchmarks.lean_levels " + " ".join(sys.argv[1:] if argv is None else argv),
                   "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                   "load_average_1_5_15min": list(os.getloadavg()), "rows": rows}, fh, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()

"""Benchmark meshweave-solve on the bundled IOPDDL instances at the contest time limits.

Every instance runs as its own ``meshweave-solve PROBLEM TIMEOUT`` process, as the
contest ran its binaries: the wall time includes start-up and loading. The last
printed line is parsed, scored with the exact evaluator and compared with the
best known and XLA costs (README of ../shared/iopddl; see
meshweave.passes.solver.iopddl_data). Points = best known / our cost.

    .venv/bin/python benchmarks/iopddl_bench.py                  # all, contest limits
    .venv/bin/python benchmarks/iopddl_bench.py --scale 0.25 --instances B G
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "iopddl"


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(open("/proc/meminfo").read().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        mem = None
    from importlib.metadata import version
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_mib": mem, "python": platform.python_version(), "numpy": np.__version__,
            "pulp": version("pulp"), "highspy": version("highspy"), "platform": platform.platform()}


def run_instance(name: str, data: Path, limit: float, extra: list[str]) -> dict:
    from meshweave.passes.solver import evaluate, read_iopddl
    from meshweave.passes.solver.iopddl_data import BEST_KNOWN_COST, BEST_TEAM_COST, FILE, XLA_COST

    path = data / FILE.format(name)
    cmd = [sys.executable, "-m", "meshweave.cli.solve", str(path), f"{limit:g}"] + extra
    t = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit + 120)
    wall = time.monotonic() - t
    lines = proc.stdout.strip().splitlines()
    rec = {"instance": name, "time_limit_s": limit, "time_used_s": round(wall, 2),
           "within_time_limit": wall <= limit, "returncode": proc.returncode,
           "best_known_cost": BEST_KNOWN_COST[name], "best_team_cost": BEST_TEAM_COST[name],
           "xla_cost": XLA_COST.get(name)}
    done = next((ln for ln in reversed(lines) if ln.startswith("# done:")), "")
    m = re.search(r"first_feasible=([0-9.]+)s", done)
    rec["time_to_first_feasible_s"] = float(m.group(1)) if m else None
    for key in ("status", "method"):
        m = re.search(rf"{key}=(\S+)", done)
        rec[key] = m.group(1) if m else None
    try:
        s = np.array(json.loads(lines[-1]), dtype=np.int64)
    except (IndexError, ValueError):
        rec.update(feasible=False, cost=None, points=0.0, stderr=proc.stderr[-2000:])
        return rec
    problem = read_iopddl(path)
    if s.size == 0:
        rec.update(feasible=False, cost=None, points=0.0)
        return rec
    ev = evaluate(problem, s)
    rec.update(cost=ev.cost, peak_usage=ev.peak_usage, usage_limit=problem.usage_limit,
               feasible=ev.feasible, forbidden_entries=ev.num_forbidden,
               points=round(BEST_KNOWN_COST[name] / ev.cost, 6) if ev.feasible and ev.cost else 0.0)
    if rec["xla_cost"] is not None and ev.feasible:
        rec["beats_xla"] = ev.cost < rec["xla_cost"]
        rec["vs_xla"] = ("lower" if ev.cost < rec["xla_cost"] else
                         "equal" if ev.cost == rec["xla_cost"] else "higher")
        rec["xla_over_ours"] = round(rec["xla_cost"] / ev.cost, 4)
    return rec


def main(argv=None) -> int:
    from meshweave.passes.solver.iopddl_data import INSTANCES, TIME_LIMIT_S

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instances", nargs="*", default=list(INSTANCES), choices=INSTANCES)
    ap.add_argument("--scale", type=float, default=1.0, help="multiply the contest time limits")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "iopddl.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args(argv)
    extra = ["--seed", str(args.seed)] + (["--workers", str(args.workers)] if args.workers else [])
    result = {
        "command": " ".join([os.path.relpath(sys.executable, REPO), "benchmarks/iopddl_bench.py"]
                            + (argv if argv is not None else sys.argv[1:])),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "load_average_before": os.getloadavg(),
        "time_limit_scale": args.scale,
        "note": "contest limits are for an 8-core machine; this run uses the cores listed above",
        "instances": [],
    }
    total = 0.0
    for name in args.instances:
        limit = TIME_LIMIT_S[name] * args.scale
        rec = run_instance(name, args.data, limit, extra)
        rec["load_average_after"] = os.getloadavg()
        result["instances"].append(rec)
        total += rec["points"]
        print(f"{name}: cost={rec.get('cost')} points={rec['points']:.4f} "
              f"first_feasible={rec['time_to_first_feasible_s']}s used={rec['time_used_s']}s/"
              f"{limit:g}s status={rec.get('status')} vs_xla={rec.get('vs_xla')}", flush=True)
    result["load_average_after"] = os.getloadavg()
    result["total_points"] = round(total, 4)
    result["max_points"] = len(args.instances)
    result["all_feasible"] = all(r["feasible"] for r in result["instances"])
    result["all_within_time_limit"] = all(r["within_time_limit"] for r in result["instances"])
    xla = [r for r in result["instances"] if r["xla_cost"] is not None]
    result["beats_xla_on"] = {r["instance"]: r.get("beats_xla", False) for r in xla}
    result["vs_xla"] = {r["instance"]: r.get("vs_xla") for r in xla}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"total points {total:.4f} of {len(args.instances)}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A broader yardstick for the solver: problems it was not tuned on, each with a best-known cost.

Two families (issue 13):
- compiler problems: the auto-sharding problem meshweave builds for the model zoo (GPT, MLP) at
  several sizes and meshes, some with a tight memory budget (1.1-1.2x the smallest budget the
  planner can meet), written as IOPDDL files;
- variants of the small bundled IOPDDL instances (B, G, V): costs rescaled per node, usage limit
  moved to 1.02x / 1.5x of the least-usage peak, strategies dropped (a plan without forbidden
  entries and the least-usage plan stay possible).

    python benchmarks/yardstick.py build      # write benchmarks/yardstick/*.json.gz (needs jax + the bundle)
    python benchmarks/yardstick.py reference --time-limit 90   # best known: long exact-ILP runs -> JSON, once
    python benchmarks/yardstick.py run --time-limit 20         # meshweave-solve on each -> points
    python benchmarks/yardstick.py run --instances NAME --repeats 5 --out ...   # spread of repeated runs

`reference` records, per instance, the best cost of an exact-ILP run (HiGHS) and of an
`auto` run at the same long limit, with whether it is proven optimal and the file's sha256,
in benchmarks/results/yardstick_best.json; `run` refuses files whose hash differs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DIR = REPO / "benchmarks" / "yardstick"
BEST = REPO / "benchmarks" / "results" / "yardstick_best.json"


def sha256(path: Path) -> str:
    """Of the problem text (gzip headers carry a time stamp)."""
    import gzip

    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


# ---- build -------------------------------------------------------------------------------

def _compiler_problems(out: Path) -> list[str]:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import optax

    import meshweave as mw
    from meshweave.models import gpt, mlp
    from meshweave.passes.auto_sharding import MemoryBudgetError
    from meshweave.passes.solver import write_iopddl

    opt = optax.adam(1e-4)

    def gpt_args(layers, hidden):
        cfg = gpt.GPTConfig(vocab=512 if hidden < 1024 else 8192, seq_len=64 if hidden < 1024 else 512,
                            d_model=hidden, heads=8 if hidden < 1024 else hidden // 64, layers=layers)
        state = jax.eval_shape(lambda: gpt.init_state(jax.random.PRNGKey(0), cfg, opt))
        batch = jax.eval_shape(lambda: gpt.synthetic_batch(jax.random.PRNGKey(1), cfg,
                                                           16 if hidden < 1024 else 32))
        return gpt.make_train_step(opt), state, batch

    def mlp_args(width):
        sizes = [width, 4 * width, 4 * width, width]
        state = jax.eval_shape(lambda: mlp.init_state(jax.random.PRNGKey(0), sizes, opt))
        batch = jax.eval_shape(lambda: mlp.synthetic_batch(jax.random.PRNGKey(1), 64, sizes[0], sizes[-1]))
        return mlp.make_train_step(opt), state, batch

    def plan(args, mesh, budget=None):
        method = mw.ShardParallel(auto_sharding=mw.AutoShardingOption(memory_budget_per_device=budget,
                                                                       time_limit=5))
        return mw.plan(*args, method=method, cluster=mw.ClusterSpec(num_hosts=mesh[0],
                                                                    devices_per_host=mesh[1]))

    def floor(args, mesh):
        try:
            plan(args, mesh, budget=1)
        except MemoryBudgetError as e:
            return int(e.min_budget)
        raise RuntimeError("a 1-byte budget was met")

    cases = [("gpt-L4-H256-2x4", gpt_args(4, 256), (2, 4), None),
             ("gpt-L4-H256-2x4-mem1.1", gpt_args(4, 256), (2, 4), 1.1),
             ("gpt-L8-H1024-4x8", gpt_args(8, 1024), (4, 8), None),
             ("gpt-L8-H1024-2x4-mem1.2", gpt_args(8, 1024), (2, 4), 1.2),
             ("gpt-L24-H1024-2x4", gpt_args(24, 1024), (2, 4), None),
             ("mlp-W1024-2x4-mem1.1", mlp_args(1024), (2, 4), 1.1)]
    names = []
    for name, args, mesh, factor in cases:
        budget = None if factor is None else int(factor * floor(args, mesh))
        res = plan(args, mesh, budget)
        res.problem.name = name
        write_iopddl(res.problem, out / f"{name}.json.gz")
        names.append(name)
        print(f"built {name}: {res.problem.num_nodes} nodes, {res.problem.num_edges} edges", flush=True)
    return names


def _variants(out: Path) -> list[str]:
    from meshweave.passes.solver import min_peak_usage, read_iopddl, write_iopddl
    from meshweave.passes.solver.iopddl_data import find_instance

    rng = np.random.default_rng(2026)
    names = []

    def load(letter):
        path = find_instance(letter, REPO)
        if path is None:
            raise SystemExit(f"IOPDDL instance {letter} not found (set MESHWEAVE_IOPDDL_DIR)")
        p = read_iopddl(path)
        p.validate()
        return p

    def save(p, name):
        p.name = name
        p.validate()
        write_iopddl(p, out / f"{name}.json.gz")
        names.append(name)
        print(f"built {name}: {p.num_nodes} nodes, limit {p.usage_limit}", flush=True)

    def rescale(p):
        f = rng.uniform(0.5, 2.0, size=p.num_nodes)
        p.node_costs = [np.where(c >= 10**18, c, np.round(c * fi).astype(np.int64))
                        for c, fi in zip(p.node_costs, f)]

    def set_limit(p, factor):
        p.usage_limit = int(factor * min_peak_usage(p))

    def drop(p, frac):
        # kept on every node: its least-usage strategy (the limit stays reachable) and its
        # strategy in a plan without forbidden entries (one stays possible); a 20 s solve
        # supplies that plan, its quality does not matter
        from meshweave.passes.solver import solve

        plan = solve(p, 20, workers=1, seed=1).assignment
        keep = []
        for i, u in enumerate(p.node_usages):
            k = len(u)
            mask = rng.random(k) >= frac
            mask[int(np.argmin(u))] = True
            mask[int(plan[i])] = True
            keep.append(np.nonzero(mask)[0])
        p.node_costs = [c[kp] for c, kp in zip(p.node_costs, keep)]
        p.node_usages = [u[kp] for u, kp in zip(p.node_usages, keep)]
        p.edge_costs = [m[np.ix_(keep[a], keep[b])] for (a, b), m in zip(p.edge_nodes.tolist(), p.edge_costs)]
        p.strategy_names = None

    for letter, ops, name in [("B", [rescale], "B-rescaled"),
                              ("B", [lambda p: set_limit(p, 1.5)], "B-limit1.5"),
                              ("G", [lambda p: set_limit(p, 1.02)], "G-limit1.02"),
                              ("G", [rescale, lambda p: set_limit(p, 1.5)], "G-rescaled-limit1.5"),
                              ("V", [lambda p: drop(p, 0.3)], "V-drop0.3"),
                              ("V", [lambda p: drop(p, 0.5)], "V-drop0.5")]:
        p = load(letter)
        for op in ops:
            op(p)
        save(p, name)
    return names


# ---- reference and run ------------------------------------------------------------------

def _reference(time_limit: float, only: list[str] | None) -> None:
    from meshweave.passes.solver import evaluate, read_iopddl, solve

    best = json.loads(BEST.read_text()) if BEST.exists() else {"instances": {}}
    best["command"] = " ".join(["python", "benchmarks/yardstick.py"] + sys.argv[1:])
    best["note"] = (f"best known = the cheaper of solve(method='ilp') (the exact HiGHS ILP; on cores of "
                    f"5,000+ columns after a search given 30% of the time, which stops it when its bound "
                    f"proves the plan) and solve(method='auto'), each {time_limit:g} s with one worker on "
                    f"a shared 2-core machine; proven_optimal when either proved it")
    for path in sorted(DIR.glob("*.json.gz")):
        name = path.name[:-len(".json.gz")]
        if only and name not in only:
            continue
        p = read_iopddl(path)
        runs = {}
        for method in ("ilp", "auto"):
            s = solve(p, time_limit, method=method, workers=1)
            runs[method] = {"cost": s.cost, "status": s.status, "seconds": round(s.solve_time, 2),
                            "lower_bound": s.lower_bound}
        feasible = {m: r for m, r in runs.items() if r["cost"] is not None}
        m = min(feasible, key=lambda k: feasible[k]["cost"])
        assert evaluate(p, solve(p, 1, workers=1).assignment).feasible
        best["instances"][name] = {"best_known_cost": feasible[m]["cost"], "from": m,
                                   "proven_optimal": any(r["status"] == "optimal" for r in runs.values()),
                                   "runs": runs, "sha256": sha256(path), "nodes": p.num_nodes,
                                   "edges": p.num_edges, "usage_limit": p.usage_limit}
        print(name, json.dumps(best["instances"][name]["runs"]), flush=True)
        BEST.write_text(json.dumps(best, indent=2) + "\n")


def _run(time_limit: float, out: Path, extra: list[str], only: list[str] | None = None,
         repeats: int = 1) -> None:
    from meshweave.passes.solver import evaluate, read_iopddl

    best = json.loads(BEST.read_text())["instances"]
    rows = []
    paths = [p for p in sorted(DIR.glob("*.json.gz")) if not only or p.name[:-len(".json.gz")] in only]
    if only and len(paths) != len(only):
        raise SystemExit(f"unknown instances among {only}")
    for path in [p for p in paths for _ in range(repeats)]:
        name = path.name[:-len(".json.gz")]
        ref = best.get(name)
        if ref is None or ref["sha256"] != sha256(path):
            raise SystemExit(f"{name}: no best-known cost for this file (run `reference` first)")
        load = os.getloadavg()
        cmd = [sys.executable, "-m", "meshweave.cli.solve", str(path), f"{time_limit:g}"] + extra
        t = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=time_limit + 120)
        wall = time.monotonic() - t
        lines = proc.stdout.strip().splitlines()
        done = next((ln for ln in reversed(lines) if ln.startswith("# done:")), "")
        row = {"instance": name, "time_limit_s": time_limit, "time_used_s": round(wall, 2),
               "best_known_cost": ref["best_known_cost"], "best_known_proven": ref["proven_optimal"],
               "load_average_before": load}
        for key in ("status", "workers"):
            m = re.search(rf"{key}=(\S+)", done)
            row[key] = m.group(1) if m else None
        try:
            s = np.array(json.loads(lines[-1]), dtype=np.int64)
            ev = evaluate(read_iopddl(path), s)
            row.update(cost=ev.cost, feasible=ev.feasible,
                       points=round(ref["best_known_cost"] / ev.cost, 6) if ev.feasible and ev.cost else 0.0)
        except (IndexError, ValueError):
            row.update(cost=None, feasible=False, points=0.0, stderr=proc.stderr[-1000:])
        rows.append(row)
        print(f"{name}: cost={row['cost']} points={row['points']:.4f} status={row['status']} "
              f"used={row['time_used_s']}s", flush=True)
    pts = [r["points"] for r in rows]
    result = {"command": " ".join([os.path.relpath(sys.executable, REPO), "benchmarks/yardstick.py"]
                                  + sys.argv[1:]),
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "note": "each instance as its own meshweave-solve process; machine shared with other "
                      "jobs (load averages per row); best known costs from benchmarks/results/yardstick_best.json",
              "instances": rows, "average_points": round(float(np.mean(pts)), 4) if pts else None,
              "min_points": min(pts) if pts else None, "all_feasible": all(r["feasible"] for r in rows)}
    if repeats > 1:
        result["repeats"] = repeats
        result["points_spread"] = {n: round(max(r["points"] for r in rows if r["instance"] == n)
                                            - min(r["points"] for r in rows if r["instance"] == n), 6)
                                   for n in dict.fromkeys(r["instance"] for r in rows)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"average points {result['average_points']} over {len(rows)}; written to {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--only", choices=["compiler", "variants"], default=None)
    b.add_argument("--out", type=Path, default=DIR)
    r = sub.add_parser("reference")
    r.add_argument("--time-limit", type=float, default=90.0)
    r.add_argument("--instances", nargs="*", default=None)
    u = sub.add_parser("run")
    u.add_argument("--time-limit", type=float, default=20.0)
    u.add_argument("--workers", type=int, default=None)
    u.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "yardstick.json")
    u.add_argument("--instances", nargs="*", default=None)
    u.add_argument("--repeats", type=int, default=1, help="solve each instance this many times")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        args.out.mkdir(parents=True, exist_ok=True)
        if args.only in (None, "variants"):
            _variants(args.out)
        if args.only in (None, "compiler"):
            _compiler_problems(args.out)
    elif args.cmd == "reference":
        _reference(args.time_limit, args.instances)
    else:
        _run(args.time_limit, args.out, ["--workers", str(args.workers)] if args.workers else [],
             args.instances, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())

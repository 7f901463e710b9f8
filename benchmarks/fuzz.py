"""Fuzzing the planner (issue 12): random JAX training steps (models/random_programs.py) under
DataParallel, ShardParallel on a 1-D mesh and ShardParallel on a 2-D mesh. Every program must
plan, compile and equal single-device jax.jit, or fail with a clear meshweave error; crashes
(any other exception) and wrong results are counted.

    python benchmarks/fuzz.py [--programs 200] [--seed 0] [--out benchmarks/results/fuzz.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

import meshweave as mw  # noqa: E402
from meshweave.models import random_programs  # noqa: E402

METHODS = {
    "DataParallel-8": lambda: mw.DataParallel(mesh_shape=(8,), devices=tuple(jax.devices()[:8])),
    "ShardParallel-8": lambda: mw.ShardParallel(mesh_shape=(8,), devices=tuple(jax.devices()[:8])),
    "ShardParallel-2x4": lambda: mw.ShardParallel(mesh_shape=(2, 4), devices=tuple(jax.devices()[:8])),
}
CLEAR_ERRORS = (mw.ParallelizeError,)


@dataclasses.dataclass
class FuzzResult:
    seed: int
    ops: list[str]
    method: str
    outcome: str                 # "equal" | "mismatch" | "clear-error" | "crash"
    max_abs_error: float | None
    seconds: float
    message: str | None = None


def run_one(seed: int, method: str, rtol=1e-4, atol=1e-5) -> FuzzResult:
    prog = random_programs.program(seed)
    t0 = time.perf_counter()
    try:
        out = mw.parallelize(prog.step, method=METHODS[method]())(prog.state, prog.batch)
    except CLEAR_ERRORS as e:
        return FuzzResult(seed, prog.ops, method, "clear-error", None, time.perf_counter() - t0, str(e)[:400])
    except Exception as e:  # a crash: recorded with its type, never hidden
        return FuzzResult(seed, prog.ops, method, "crash", None, time.perf_counter() - t0,
                          f"{type(e).__name__}: {e}"[:400])
    ref = jax.jit(prog.step)(prog.state, prog.batch)
    worst, equal = 0.0, jax.tree.structure(out) == jax.tree.structure(ref)
    for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        a, e = np.asarray(a), np.asarray(e)
        worst = max(worst, float(np.max(np.abs(a - e))))
        equal &= bool(np.allclose(a, e, rtol=rtol, atol=atol))
    return FuzzResult(seed, prog.ops, method, "equal" if equal else "mismatch", worst, time.perf_counter() - t0)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/fuzz.json")
    args = ap.parse_args(argv)
    results = []
    for seed in range(args.seed, args.seed + args.programs):
        for method in METHODS:
            r = run_one(seed, method)
            results.append(r)
            if r.outcome != "equal":
                print(f"seed {seed} {method}: {r.outcome} {r.message or r.max_abs_error}", flush=True)
        summary = write(args, argv, results, seed - args.seed + 1)    # after every program: a partial run still reports
        if (seed - args.seed + 1) % 10 == 0:
            print(f"{seed - args.seed + 1} programs done", flush=True)
    print(json.dumps(summary))
    return 0 if summary["mismatch"] == summary["crash"] == 0 else 1


def write(args, argv, results, programs_done) -> dict:
    counts = {k: sum(r.outcome == k for r in results) for k in ("equal", "mismatch", "clear-error", "crash")}
    summary = {"programs": programs_done, "programs_requested": args.programs, "runs": len(results), **counts}
    out = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__},
           "summary": summary, "results": [dataclasses.asdict(r) for r in results]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(main())

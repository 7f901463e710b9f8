"""Numerics matrix (issue 12): zoo model x method x mesh, each parallelized step compared with
single-device jax.jit on the same inputs, with the plan-fidelity row (predicted vs compiled
collectives) of every configuration.

    python benchmarks/numerics_matrix.py [--models mlp,gpt] [--out benchmarks/results/numerics_matrix.json]

The default matrix: every model under ShardParallel and DataParallel on 1x8, 2x4, 4x2, 8x1 and
2x2; Zero2, Zero3 and gradient accumulation (2 micro-batches) on 2x4 and 2x2 -- except gradient
accumulation of the Wide-ResNet block: its batch norm normalizes each micro-batch by its own
statistics, so it is a different computation from the full-batch step, not a parallelization of it.
`--update` reruns only the configurations missing from an existing JSON, or not equal, or unfaithful
(a collective kind whose compiled count or bytes differ from the prediction).
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
from meshweave.models import zoo  # noqa: E402

MESHES = ((1, 8), (2, 4), (4, 2), (8, 1), (2, 2))
METHODS = ("ShardParallel", "DataParallel", "Zero2Parallel", "Zero3Parallel", "GradAccumulation")
BATCH_COUPLED = {"wide_resnet"}      # batch statistics: micro-batching changes the result


@dataclasses.dataclass
class MatrixRow:
    model: str
    method: str
    mesh: list[int]
    equal: bool                      # every output leaf within the case's rtol/atol of jax.jit
    max_abs_error: float
    seconds: float
    fidelity: list[dict]             # per collective kind: predicted, Shardy's, compiled, status
    error: str | None = None


def default_configs(models=zoo.NAMES) -> list[tuple[str, str, tuple[int, int]]]:
    out = []
    for m in models:
        for mesh in MESHES:
            out += [(m, "ShardParallel", mesh), (m, "DataParallel", mesh)]
        for mesh in ((2, 4), (2, 2)):
            out += [(m, meth, mesh) for meth in ("Zero2Parallel", "Zero3Parallel", "GradAccumulation")
                    if not (meth == "GradAccumulation" and m in BATCH_COUPLED)]
    return out


def make_method(method: str, mesh):
    devices = tuple(jax.devices()[: int(np.prod(mesh))])
    if method == "GradAccumulation":
        return mw.ShardParallel(mesh_shape=mesh, devices=devices, num_micro_batches=2)
    return getattr(mw, method)(mesh_shape=mesh, devices=devices)


def run_config(model: str, method: str, mesh) -> MatrixRow:
    c = zoo.case(model, grad_fn=mw.value_and_grad if method == "GradAccumulation" else jax.value_and_grad)
    t0 = time.perf_counter()
    try:
        f = mw.parallelize(c.step, method=make_method(method, mesh))
        out = f(c.state, c.batch)
    except Exception as e:  # recorded, not hidden: the row says what failed
        return MatrixRow(model, method, list(mesh), False, float("nan"), time.perf_counter() - t0, [],
                         f"{type(e).__name__}: {e}"[:500])
    ref = jax.jit(c.step)(c.state, c.batch)
    equal, worst = True, 0.0
    for a, e in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        a, e = np.asarray(a), np.asarray(e)
        worst = max(worst, float(np.max(np.abs(a - e))) if a.size else 0.0)
        equal &= bool(np.allclose(a, e, rtol=c.rtol, atol=c.atol))
    equal &= jax.tree.structure(out) == jax.tree.structure(ref)
    return MatrixRow(model, method, list(mesh), equal, worst, time.perf_counter() - t0,
                     list(f.last_executable.plan.stages[0].fidelity or []))


def faithful(fidelity: list[dict]) -> bool:
    return all(f["status"] != "mismatch" for f in fidelity)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(zoo.NAMES))
    ap.add_argument("--out", default="benchmarks/results/numerics_matrix.json")
    ap.add_argument("--update", action="store_true", help="keep the equal, faithful rows of --out, rerun the rest")
    args = ap.parse_args(argv)
    rows, commands, kept = [], [], {}
    if args.update and os.path.exists(args.out):
        with open(args.out) as fh:
            old = json.load(fh)
        commands = old.get("commands", [old.get("command")])
        kept = {(r["model"], r["method"], tuple(r["mesh"])): MatrixRow(**r) for r in old["rows"]
                if r["equal"] and faithful(r["fidelity"])}
    for model, method, mesh in default_configs(args.models.split(",")):
        if (model, method, tuple(mesh)) in kept:
            rows.append(kept[(model, method, tuple(mesh))])
            continue
        row = run_config(model, method, mesh)
        rows.append(row)
        print(f"{model:12s} {method:16s} {mesh[0]}x{mesh[1]}  {'equal' if row.equal else 'DIFFERENT'}  "
              f"max|err| {row.max_abs_error:.2e}  {row.seconds:5.1f} s  "
              + " ".join(f"{r['kind']}:{r['status']}" for r in row.fidelity) + (f"  {row.error}" if row.error else ""),
              flush=True)
    summary = {"configurations": len(rows), "equal": sum(r.equal for r in rows),
               "errors": sum(r.error is not None for r in rows),
               "fidelity_all_match_or_combined": sum(faithful(r.fidelity) for r in rows)}
    commands.append("python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])))
    result = {"commands": commands,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                          "devices": f"{len(jax.devices())} simulated {jax.devices()[0].platform}"},
              "summary": summary, "rows": [dataclasses.asdict(r) for r in rows]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(summary))
    return 0 if summary["equal"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())

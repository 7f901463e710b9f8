"""Every reshard of a small rank-1 / rank-2 tensor on 2-axis meshes: the cost model's priced
collectives against what XLA compiles for the bare reshard (`jax.jit` with different in and out
shardings, no meshweave annotation).

Pairs whose dims keep their axes or change in one dim only (gathers, slices, relayouts such as
`[xy]->[y]`) are what XLA does by itself and must match. Pairs that move an axis between dims are
reported too: there XLA's own route often differs from the priced one (it slices first, or
replicates), which is why `auto-sharding` spells those reshards out step by step
(`explicit_collectives.spell_reshard`); `tests/test_plan_quality.py` checks the spelled route.

    python benchmarks/reshard_sweep.py [--meshes 2x4,2x2,4x2] [--out benchmarks/results/reshard_sweep.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from meshweave.dialects.sharding import MeshSpec, TensorSharding  # noqa: E402
from meshweave.passes.cost_model import LogicalMesh  # noqa: E402
from meshweave.plugin import hlo_stats  # noqa: E402

SIZE = 16          # every dim; divisible by every axis product used


@dataclasses.dataclass
class ReshardRow:
    mesh: list[int]
    src: str
    dst: str
    one_dim: bool                   # dims differ in at most one dim and no axis moves between dims
    predicted: dict                 # {kind: [count, per-device bytes]}
    compiled: dict
    match: bool


def layouts(rank: int, axes) -> list[tuple]:
    out = set()
    for dims_of in itertools.product(range(-1, rank), repeat=len(axes)):
        for order in itertools.permutations(axes):
            dims = [[] for _ in range(rank)]
            for a in order:
                if dims_of[axes.index(a)] >= 0:
                    dims[dims_of[axes.index(a)]].append(a)
            out.add(tuple(tuple(d) for d in dims))
    return sorted(out)


def _spec(dims) -> P:
    return P(*[(tuple(d) if len(d) > 1 else d[0]) if d else None for d in dims])


def _one_dim(src: TensorSharding, dst: TensorSharding) -> bool:
    where = {a: d for d, axes in enumerate(src.dims) for a in axes}
    moved = any(a in where and where[a] != d for d, axes in enumerate(dst.dims) for a in axes)
    return not moved and sum(s != d for s, d in zip(src.dims, dst.dims)) <= 1


def sweep(mesh_shape, rank: int) -> list[ReshardRow]:
    spec = MeshSpec.from_shape(mesh_shape)
    lm = LogicalMesh.create(spec)
    jmesh = Mesh(np.array(jax.devices()[: spec.num_devices]).reshape(mesh_shape), spec.axis_names)
    x = jnp.ones((SIZE,) * rank, jnp.float32)
    rows = []
    for s, d in itertools.permutations(layouts(rank, list(spec.axis_names)), 2):
        src, dst = TensorSharding(s), TensorSharding(d)
        predicted: dict = {}
        for kind, axes, nbytes in lm.reshard_plan(4 * SIZE ** rank, src, dst):
            e = predicted.setdefault(kind, [0, 0])
            e[0] += 1
            e[1] += int(round(nbytes))
        f = jax.jit(lambda v: v * 2, in_shardings=NamedSharding(jmesh, _spec(s)),
                    out_shardings=NamedSharding(jmesh, _spec(d)))
        colls = hlo_stats.summarize(hlo_stats.collectives(f.lower(x).compile().as_text()))
        compiled = {k: [v["count"], v["bytes"]] for k, v in colls.items()}
        rows.append(ReshardRow(list(mesh_shape), src.short(), dst.short(), _one_dim(src, dst), predicted, compiled,
                               predicted == compiled))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meshes", default="2x4,2x2,4x2")
    ap.add_argument("--out", default="benchmarks/results/reshard_sweep.json")
    args = ap.parse_args(argv)
    rows = []
    for m in args.meshes.split(","):
        for rank in (1, 2):
            rows += sweep(tuple(int(t) for t in m.split("x")), rank)
    one = [r for r in rows if r.one_dim]
    moves = [r for r in rows if not r.one_dim]
    summary = {"pairs": len(rows), "one_dim": len(one), "one_dim_match": sum(r.match for r in one),
               "axis_moves": len(moves), "axis_moves_match_xla_own_route": sum(r.match for r in moves)}
    result = {"command": "python " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
              "jax": jax.__version__, "summary": summary, "rows": [dataclasses.asdict(r) for r in rows]}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(json.dumps(summary))
    return 0 if summary["one_dim_match"] == summary["one_dim"] else 1


if __name__ == "__main__":
    sys.exit(main())

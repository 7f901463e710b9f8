"""Random small sharding problems and a brute-force reference for the solver tests."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from meshweave.passes.solver import INF_COST, ShardingProblem
from meshweave.passes.solver.iopddl_data import find_instance, search_dirs

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
EXAMPLE = str(DATA / "iopddl" / "example.json")
GPT2 = str(DATA / "gpt2_h256_2x4.json.gz")
"""The auto-sharding problem of a 2-layer GPT (hidden 256) on a 2x4 mesh (tests/data/iopddl/README.md)."""


def instance(name: str) -> str:
    """Path of a bundled IOPDDL instance; skips the test (naming where it looked) when absent."""
    path = find_instance(name, REPO)
    if path is None:
        pytest.skip(f"IOPDDL instance {name} not found in " + ", ".join(map(str, search_dirs(REPO)))
                    + " (set MESHWEAVE_IOPDDL_DIR to the bundle)")
    return str(path)


def random_problem(rng: np.random.Generator, n: int, kmax: int = 3, *, forbid: float = 0.15,
                   limit: str | None = "tight", edges: float = 1.6, ties: int = 0) -> ShardingProblem:
    """n nodes with 1..kmax strategies, ~edges*n random edges (some forbidden pairs)."""
    ks = rng.integers(1, kmax + 1, size=n)
    costs = [rng.integers(0, 100, size=k).astype(np.int64) for k in ks]
    usages = [rng.integers(0, 50, size=k).astype(np.int64) for k in ks]
    lo = rng.integers(0, 20, size=n)
    hi = lo + rng.integers(0, 15, size=n)
    en, ec = [], []
    for _ in range(int(edges * n)):
        a, b = rng.integers(0, n, size=2)
        m = rng.integers(0, 80, size=(ks[a], ks[b])).astype(np.int64)
        m[rng.random(m.shape) < forbid] = INF_COST
        en.append((a, b))
        ec.append(m)
    for _ in range(ties):          # follower ties, as the compiler builds them
        a, b = rng.integers(0, n, size=2)
        if a == b or ks[a] != ks[b]:
            continue
        m = np.full((ks[a], ks[b]), INF_COST, dtype=np.int64)
        m[np.arange(ks[a]), rng.permutation(ks[b])] = rng.integers(0, 5)
        en.append((a, b))
        ec.append(m)
    p = ShardingProblem(name="random", node_costs=costs, node_usages=usages,
                        intervals=np.stack([lo, hi], axis=1).astype(np.int64),
                        edge_nodes=np.array(en, dtype=np.int64).reshape(-1, 2), edge_costs=ec)
    if limit is not None:
        lo_peak, hi_peak = peak_range(p)
        p.usage_limit = int(lo_peak + (hi_peak - lo_peak) * (0.3 if limit == "tight" else 0.8))
    p.validate()
    return p


def _peak(p: ShardingProblem, s) -> int:
    tmax = int(p.intervals[:, 1].max()) + 1 if p.num_nodes else 1
    load = [0] * (tmax + 1)
    for i, (lo, hi) in enumerate(p.intervals.tolist()):
        for t in range(lo, hi):
            load[t] += int(p.node_usages[i][s[i]])
    return max(load)


def peak_range(p: ShardingProblem) -> tuple[int, int]:
    lo = _peak(p, [int(np.argmin(u)) for u in p.node_usages])
    hi = _peak(p, [int(np.argmax(u)) for u in p.node_usages])
    return lo, hi


def brute_force(p: ShardingProblem):
    """(cost, assignment) of the cheapest assignment within the limit, or (None, None)."""
    best = (None, None)
    en = p.edge_nodes.tolist()
    for s in itertools.product(*[range(len(c)) for c in p.node_costs]):
        if p.usage_limit is not None and _peak(p, s) > p.usage_limit:
            continue
        c = sum(int(p.node_costs[i][s[i]]) for i in range(p.num_nodes))
        c += sum(int(m[s[a], s[b]]) for (a, b), m in zip(en, p.edge_costs))
        if best[0] is None or c < best[0]:
            best = (c, list(s))
    return best

"""Folding identical components (``fold.py``) is exact: same optimum as the unfolded problem."""

import importlib

import numpy as np
import pytest

from meshweave.passes.solver import ShardingProblem

solve_module = importlib.import_module("meshweave.passes.solver.solve")   # the module, not the function


def stacked(rng, copies=12, size=4, k=3, hub_k=4, differ=(), limit=None) -> ShardingProblem:
    """Two hubs and `copies` identical cliques of `size` nodes, every node tied to both hubs
    (a layer stack around its residual stream); copies listed in `differ` get other costs."""
    costs = [rng.integers(0, 50, size=hub_k), rng.integers(0, 50, size=hub_k)]
    unary = [rng.integers(0, 100, size=k) for _ in range(size)]
    inner = {(i, j): rng.integers(0, 100, size=(k, k)) for i in range(size) for j in range(i + 1, size)}
    to_hub = [[rng.integers(0, 100, size=(hub_k, k)) for _ in range(size)] for _ in range(2)]
    edges, mats = [], []
    for c in range(copies):
        base = len(costs)
        shift = 7 * (c + 1) if c in differ else 0
        costs += [u + shift for u in unary]
        for (i, j), m in inner.items():
            edges.append((base + i, base + j))
            mats.append(m)
        for h in range(2):
            for i in range(size):
                edges.append((h, base + i))
                mats.append(to_hub[h][i])
    n = len(costs)
    return ShardingProblem(
        name="stacked", node_costs=[np.asarray(c, dtype=np.int64) for c in costs],
        node_usages=[np.ones(len(c), dtype=np.int64) for c in costs],
        intervals=np.tile(np.array([[0, 1]], dtype=np.int64), (n, 1)),
        edge_nodes=np.array(edges, dtype=np.int64), edge_costs=[np.asarray(m, dtype=np.int64) for m in mats],
        usage_limit=limit)


def _unfolded(monkeypatch, p):
    with monkeypatch.context() as m:
        m.setattr(solve_module, "fold_identical", lambda core: None)
        return solve_module.solve(p, 60, workers=1, method="ilp")


@pytest.mark.parametrize("differ", [(), (3,), (0, 5, 9)], ids=["identical", "one-differs", "three-differ"])
def test_folded_optimum_is_the_unfolded_optimum(monkeypatch, differ):
    p = stacked(np.random.default_rng(len(differ)), differ=differ)
    folded = solve_module.solve(p, 60, workers=1)
    fold = folded.stats["reduction"].get("fold")
    assert fold is not None and fold["hubs"] == 2 and fold["classes"] == 1 + len(differ)
    ref = _unfolded(monkeypatch, p)
    assert folded.status == ref.status == "optimal"
    assert folded.cost == ref.cost
    # the copies that are alike take the same strategies
    same = [c for c in range(12) if c not in differ]
    x = folded.assignment
    assert all(np.array_equal(x[2 + 4 * same[0]: 6 + 4 * same[0]], x[2 + 4 * c: 6 + 4 * c]) for c in same)


def test_memory_rows_are_not_folded():
    """A binding usage limit couples the copies (they are live at once): no fold."""
    rng = np.random.default_rng(7)
    p = stacked(rng)
    p.node_usages = [rng.integers(0, 4, size=len(c)).astype(np.int64) for c in p.node_costs]
    least = sum(int(u.min()) for u in p.node_usages)
    p.usage_limit = least + 3
    sol = solve_module.solve(p, 60, workers=1)
    assert sol.feasible and sol.peak_usage <= p.usage_limit
    assert sol.stats["reduction"]["memory_constraints"] > 0 and "fold" not in sol.stats["reduction"]

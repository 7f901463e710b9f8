"""The exact evaluator against the README's test vectors and the upstream unit tests."""

import numpy as np
import pytest

from _problems import EXAMPLE, instance, random_problem
from meshweave.passes.solver import evaluate, read_iopddl
from meshweave.passes.solver.iopddl_data import TEST_VECTORS


def test_example_vectors():
    p = read_iopddl(EXAMPLE)
    ev = evaluate(p, [0, 0, 2, 1, 0])
    assert (ev.cost, ev.peak_usage, ev.feasible) == (445, 50, True)
    assert evaluate(p, [0, 1, 2, 0, 0]).cost == 495
    ev = evaluate(p, [0, 0, 1, 1, 0])
    assert (ev.cost, ev.peak_usage, ev.feasible) == (415, 55, False)
    p.usage_limit = None
    assert evaluate(p, [0, 0, 1, 1, 0]).feasible


def test_shape_and_range_errors():
    p = read_iopddl(EXAMPLE)
    with pytest.raises(ValueError, match="5 strategy indices"):
        evaluate(p, [0, 0, 2, 1])
    with pytest.raises(ValueError, match=r"assignment\[2\]: strategy 3 out of range"):
        evaluate(p, [0, 0, 3, 1, 0])
    with pytest.raises(ValueError, match=r"assignment\[1\]"):
        evaluate(p, [0, -1, 0, 0, 0])
    with pytest.raises(ValueError, match="integer"):
        evaluate(p, [0.0, 0, 0, 0, 0])


def test_half_open_intervals_and_empty_ones():
    p = read_iopddl(EXAMPLE)
    # nodes 3, 4 start at 110 where node 2 is still live; node 1 ends at 70 where node 2 is live
    p.intervals[0] = [70, 70]          # empty: never counts
    ev = evaluate(p, [0, 0, 2, 1, 0])
    assert ev.peak_usage == 40         # t in [110, 120): 15 + 10 + 15; t in [50, 70): 25 + 15


def test_forbidden_sums_do_not_overflow():
    p = random_problem(np.random.default_rng(0), 12, forbid=1.0, limit=None)
    s = [0] * p.num_nodes
    ev = evaluate(p, s)
    manual = sum(int(c[0]) for c in p.node_costs) + sum(int(m[0, 0]) for m in p.edge_costs)
    assert ev.cost == manual and ev.cost > 2**63
    assert ev.num_forbidden == p.num_edges


def test_matches_brute_force_definition():
    rng = np.random.default_rng(5)
    for _ in range(20):
        p = random_problem(rng, 8)
        s = [int(rng.integers(len(c))) for c in p.node_costs]
        cost = sum(int(p.node_costs[i][s[i]]) for i in range(8))
        cost += sum(int(m[s[a], s[b]]) for (a, b), m in zip(p.edge_nodes.tolist(), p.edge_costs))
        load = {}
        for i, (lo, hi) in enumerate(p.intervals.tolist()):
            for t in range(lo, hi):
                load[t] = load.get(t, 0) + int(p.node_usages[i][s[i]])
        peak = max(load.values(), default=0)
        ev = evaluate(p, s)
        assert (ev.cost, ev.peak_usage, ev.feasible) == (cost, peak, peak <= p.usage_limit)


def _check_vectors(name):
    p = read_iopddl(instance(name))
    want = TEST_VECTORS[name]
    ev = evaluate(p, np.zeros(p.num_nodes, dtype=np.int64))
    assert (ev.cost, ev.peak_usage, ev.feasible) == want["all_zero"]
    ev = evaluate(p, p.min_usage_assignment())
    assert (ev.cost, ev.peak_usage, ev.feasible) == want["min_usage"]


@pytest.mark.parametrize("name", ["B", "G", "V"])
def test_readme_vectors_small(name):
    _check_vectors(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["A", "K", "M", "P", "S"])
def test_readme_vectors_large(name):
    _check_vectors(name)

"""solve(): optimal on the example and on random small problems (brute force), errors, infeasibility."""

import numpy as np
import pytest

from _problems import EXAMPLE, brute_force, random_problem
from meshweave.passes.solver import evaluate, min_peak_usage, read_iopddl, solve


@pytest.mark.parametrize("method,backend", [("auto", "highs"), ("ilp", "highs"), ("ilp", "cbc"),
                                            ("heuristic", "highs")])
def test_example_optimum(method, backend):
    p = read_iopddl(EXAMPLE)
    sol = solve(p, 10, method=method, backend=backend, workers=1)
    assert sol.cost == 445 and sol.assignment.tolist() == [0, 0, 2, 1, 0]
    assert sol.feasible and sol.peak_usage == 50 and sol.status == "optimal"
    assert sol.time_to_first_feasible is not None and sol.solve_time < 10


def test_example_without_limit():
    p = read_iopddl(EXAMPLE)
    p.usage_limit = None
    sol = solve(p, 10, workers=1)
    assert sol.cost == 415 and sol.assignment.tolist() == [0, 0, 1, 1, 0]


CASES = [(seed, limit) for seed in range(8) for limit in ("tight", None)]


@pytest.mark.parametrize("seed,limit", CASES)
@pytest.mark.parametrize("backend", ["highs", "cbc"])
def test_random_small_vs_brute_force(seed, limit, backend):
    rng = np.random.default_rng(100 + seed)
    p = random_problem(rng, int(rng.integers(4, 8)), limit=limit, ties=3)
    want, _ = brute_force(p)
    sol = solve(p, 20, method="ilp", backend=backend, workers=1)
    if want is None:
        assert not sol.feasible or sol.stats.get("num_forbidden")
        return
    assert sol.feasible and sol.status == "optimal"
    assert sol.cost == want
    assert evaluate(p, sol.assignment).cost == want


@pytest.mark.parametrize("seed", range(6))
def test_random_small_heuristic_and_auto(seed):
    rng = np.random.default_rng(200 + seed)
    p = random_problem(rng, int(rng.integers(5, 8)), limit="tight" if seed % 2 else "loose", ties=2)
    want, _ = brute_force(p)
    for method in ("auto", "heuristic"):
        sol = solve(p, 20, method=method, workers=1, seed=seed)
        assert sol.feasible and sol.cost == want, method


def test_deterministic_for_a_seed():
    p = random_problem(np.random.default_rng(7), 40, kmax=4, ties=10)
    a = solve(p, 20, workers=1, seed=3)
    b = solve(p, 20, workers=1, seed=3)
    assert a.status == b.status == "optimal"
    assert np.array_equal(a.assignment, b.assignment)


def test_infeasible_limit_reports_smallest_peak():
    p = read_iopddl(EXAMPLE)
    floor = min_peak_usage(p)
    assert floor == 50
    p.usage_limit = floor - 1
    sol = solve(p, 5, workers=1)
    assert not sol.feasible and sol.assignment is None and sol.status == "infeasible"
    assert sol.stats["min_peak_usage"] == 50
    p.usage_limit = floor
    assert solve(p, 5, workers=1).feasible


def test_unavoidable_forbidden_entries():
    """Every pair of an edge forbidden: the answer must pick one, and still meet the limit."""
    p = random_problem(np.random.default_rng(11), 6, forbid=1.0, limit="tight")
    want, _ = brute_force(p)
    sol = solve(p, 10, workers=1)
    assert sol.feasible and sol.stats["num_forbidden"] >= 1
    assert sol.cost == want


def test_bad_arguments():
    p = read_iopddl(EXAMPLE)
    with pytest.raises(ValueError, match="method"):
        solve(p, 1, method="magic")
    with pytest.raises(ValueError, match="backend"):
        solve(p, 1, backend="gurobi")
    p.node_costs[0] = np.array([-1])
    with pytest.raises(ValueError, match=r"node_costs\[0\]"):
        solve(p, 1)


def test_time_limit_is_respected_on_a_medium_problem():
    p = random_problem(np.random.default_rng(1), 400, kmax=8, ties=100, edges=2.5)
    sol = solve(p, 3.0, workers=1)
    assert sol.feasible and sol.solve_time < 3.5
    assert evaluate(p, sol.assignment).cost == sol.cost

"""Solve time follows the problem: stop at a proven optimum, warm starts, valid LP bounds."""

import time

import numpy as np
import pytest
import scipy.sparse as sp

from _problems import GPT2, random_problem
from meshweave.passes.solver import SolveCache, read_iopddl, solve
from meshweave.passes.solver.bound import dual_bound, lp_bound
from meshweave.passes.solver.core import CoreModel
from meshweave.passes.solver.ilp import solve_ilp
from meshweave.passes.solver.problem import flatten
from meshweave.passes.solver.reduce import Reducer
from meshweave.passes.solver.subilp import SubILP

LONG = 120.0      # a limit no proven solve of these problems comes near


def _core(p):
    p.validate()
    r = Reducer(flatten(p), hard=True)
    r.run(deadline=time.monotonic() + 30)
    c = r.core()
    return CoreModel(c.k, c.cost, c.edges, c.terms, c.cap)


@pytest.mark.parametrize("workers", [1, 2])
def test_proven_optimum_stops_long_before_the_limit(workers):
    """The 2-layer GPT problem: the search finds the optimum, the LP bound proves it, done."""
    p = read_iopddl(GPT2)
    sol = solve(p, LONG, workers=workers)
    assert sol.status == "optimal" and sol.lower_bound == sol.cost
    assert sol.solve_time < LONG / 4          # the solver's own clock
    assert sol.stats["ilp_columns"] > 5_000   # not a problem the exact ILP alone would take


def test_warm_start_returns_the_same_plan_faster():
    p = read_iopddl(GPT2)
    cache = SolveCache()
    first = solve(p, LONG, workers=1, cache=cache)
    again = solve(p, LONG, workers=1, cache=cache)
    assert first.status == again.status == "optimal"
    assert again.method == "cache" and cache.hits == 1
    assert np.array_equal(first.assignment, again.assignment) and again.cost == first.cost
    assert again.solve_time < first.solve_time


def test_same_graph_other_costs_starts_from_the_cached_plan():
    p = read_iopddl(GPT2)
    cache = SolveCache()
    solve(p, LONG, workers=1, cache=cache)
    q = read_iopddl(GPT2)
    q.node_costs = [c * 3 // 2 for c in q.node_costs]      # e.g. another α-β
    warm = solve(q, LONG, workers=1, cache=cache)
    assert warm.stats["cache"] == "warm start" and cache.warm_starts == 1
    cold = solve(q, LONG, workers=1)
    assert warm.status == cold.status == "optimal" and warm.cost == cold.cost


def test_start_must_fit_the_problem():
    p = read_iopddl(GPT2)
    with pytest.raises(ValueError, match="start"):
        solve(p, 5, start=np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("seed", range(6))
def test_lp_bound_never_exceeds_the_optimum(seed):
    p = random_problem(np.random.default_rng(300 + seed), 40, kmax=4, ties=6, forbid=0.0, edges=2.5,
                       limit="tight" if seed % 2 else None)
    cm = _core(p)
    assert cm.m > 10          # a real core, not one the reductions solved
    opt = solve_ilp(cm, 30)
    assert opt.optimal
    b = lp_bound(cm, 30)
    assert b.value is not None and b.value <= cm.cost_of(opt.x) + 1e-6


def test_weak_duality_holds_for_any_duals():
    p = random_problem(np.random.default_rng(300), 40, kmax=4, ties=6, forbid=0.0, edges=2.5, limit=None)
    cm = _core(p)
    assert cm.m > 10
    opt = cm.cost_of(solve_ilp(cm, 30).x)
    sub = SubILP(cm, np.arange(cm.m), np.zeros(cm.m, dtype=np.int64), None)
    r, c, v = sub.A
    A = sp.csr_matrix((v, (r, c)), shape=(sub.nrow_struct, sub.ncol))
    ub = sub.col_ub.copy()
    ub[sub.nx:] = 1.0
    rng = np.random.default_rng(0)
    for _ in range(20):
        pi = rng.normal(scale=50.0, size=sub.nrow_struct)
        assert dual_bound(A, sub.col_cost, sub.col_lb, ub, sub.row_lb, sub.row_ub, pi) <= opt + 1e-6


@pytest.mark.parametrize("seed", range(4))
def test_message_passing_bound_never_exceeds_the_optimum(seed):
    """TRW-S's bound is valid for any messages (random ones too) and tight once converged here."""
    from meshweave.passes.solver.trws import TRWS

    p = random_problem(np.random.default_rng(400 + seed), 40, kmax=4, ties=6, forbid=0.0, edges=2.5,
                       limit=None)
    cm = _core(p)
    assert cm.m > 10
    opt = cm.cost_of(solve_ilp(cm, 30).x)
    tr = TRWS(cm)
    rng = np.random.default_rng(seed)
    tr.mh[:] = rng.normal(scale=100.0, size=tr.mh.shape)
    tr.ml[:] = rng.normal(scale=100.0, size=tr.ml.shape)
    assert tr.lower_bound(cm.cost_flat) <= opt + 1e-6
    tr.run(cm.cost_flat, 200)
    b = tr.lower_bound(cm.cost_flat)
    assert b <= opt + 1e-6 and b > opt - 0.5 * abs(opt)


def test_search_bound_proves_the_gpt_problem():
    """On the compiler's GPT problem the message-passing bound meets the plan: proven optimal
    by the search alone, the exact ILP after it never runs."""
    sol = solve(read_iopddl(GPT2), LONG, workers=1)
    assert sol.status == "optimal" and sol.stats["jobs"] == ["search:finished", "ilp:skipped"]

"""Exact ILP of the (reduced) problem, with HiGHS (highspy) or CBC (through PuLP).

This is the path for problems whose core is small -- most of what the
compiler builds -- and the reference the heuristics are tested against. The
formulation is the local-polytope model (binary x per node strategy,
continuous y per allowed edge pair tied to x by marginal constraints); memory
rows are added lazily, one per stretch of violated rows, until the solution
meets every row.

HiGHS gets the model of ``subilp.py`` for the whole core, built with numpy and
passed in one call, with compact edges (~40% fewer columns on compiler
problems) and a scaled objective: the 2-layer GPT problem (hidden 1024, 2x4)
is then solved to optimality in ~4 s, where the full model through PuLP had
not finished in 10 s. CBC keeps the PuLP model.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np

from .core import CoreModel, pick_violated_rows
from .subilp import SubILP

BACKENDS = ("highs", "cbc")


@dataclass
class ILPResult:
    x: np.ndarray | None
    optimal: bool
    status: str
    rounds: int
    num_variables: int
    num_constraints: int
    bound: float | None = None


@contextlib.contextmanager
def quiet_stdout():
    """Silence fd 1 (HiGHS prints a banner there; the CLI's stdout carries the answer)."""
    import sys
    sys.stdout.flush()
    fd = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(fd, 1)
        os.close(fd)


def ilp_size(cm: CoreModel) -> int:
    """Columns of the full-core ILP (x plus allowed edge pairs)."""
    return int(cm.nS + cm.nnz.sum())


def solve_ilp(cm: CoreModel, time_limit: float, backend: str = "highs", *, seed: int = 0,
              threads: int = 1) -> ILPResult:
    """Solve the core's ILP within ``time_limit`` s."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "highs":
        return _solve_highs(cm, time_limit, seed, threads)
    with warnings.catch_warnings():     # PuLP 3.x deprecation notices, once per variable
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return _solve_pulp(cm, time_limit, backend, seed, threads)


def _solve_highs(cm: CoreModel, time_limit: float, seed: int, threads: int) -> ILPResult:
    t0 = time.monotonic()
    sub = SubILP(cm, np.arange(cm.m), np.zeros(cm.m, dtype=np.int64), None)
    # building the model counts against the limit too
    res = sub.solve(max(0.0, time_limit - (time.monotonic() - t0)), seed=seed, threads=threads,
                    max_rounds=1 << 30)
    if res.x is not None:
        status = "optimal" if res.optimal else "feasible"
    else:
        status = "infeasible" if res.optimal else "timeout"
    return ILPResult(res.x, res.optimal and res.x is not None, status, res.rounds, res.cols, res.rows,
                     res.bound)


def _solve_pulp(cm: CoreModel, time_limit: float, backend: str, seed: int, threads: int) -> ILPResult:
    import pulp

    t_end = time.monotonic() + time_limit
    prob = pulp.LpProblem("sharding", pulp.LpMinimize)
    xs = []
    obj = []
    for v in range(cm.m):
        c = cm.cost[v]
        row = []
        for s in range(int(cm.k[v])):
            var = pulp.LpVariable(f"x_{v}_{s}", cat=pulp.LpBinary,
                                  upBound=1 if np.isfinite(c[s]) else 0)
            row.append(var)
            if np.isfinite(c[s]) and c[s] != 0:
                obj.append((var, float(c[s])))
        xs.append(row)
        prob += pulp.LpAffineExpression([(var, 1) for var in row]) == 1, f"one_{v}"
    for e in range(cm.E):
        a, b = int(cm.ea[e]), int(cm.eb[e])
        mat = cm.mats[e]
        sa, sb = np.nonzero(np.isfinite(mat))
        ys = [pulp.LpVariable(f"y_{e}_{i}", lowBound=0) for i in range(len(sa))]
        for var, i, j in zip(ys, sa, sb):
            if mat[i, j] != 0:
                obj.append((var, float(mat[i, j])))
        rows_a: list[list] = [[] for _ in range(mat.shape[0])]
        rows_b: list[list] = [[] for _ in range(mat.shape[1])]
        for var, i, j in zip(ys, sa, sb):
            rows_a[i].append((var, 1))
            rows_b[j].append((var, 1))
        for i in range(mat.shape[0]):
            prob += pulp.LpAffineExpression(rows_a[i] + [(xs[a][i], -1)]) == 0, f"ma_{e}_{i}"
        for j in range(mat.shape[1]):
            prob += pulp.LpAffineExpression(rows_b[j] + [(xs[b][j], -1)]) == 0, f"mb_{e}_{j}"
    prob += pulp.LpAffineExpression(obj)
    nvars = len(prob.variables())
    # PuLP hands the model to the solver variable by variable; that copy is not
    # covered by the solver's own time limit, so keep back about as long as the
    # model took to build here
    overhead = 1.2 * (time.monotonic() - (t_end - time_limit)) + 0.02
    rounds = 0
    added: set[int] = set()
    result = ILPResult(None, False, "timeout", 0, nvars, len(prob.constraints))
    while True:
        left = t_end - time.monotonic() - overhead
        if left <= 0.05:
            break
        rounds += 1
        if backend == "highs":
            solver = pulp.HiGHS(msg=False, timeLimit=left, gapRel=0.0, gapAbs=0.5,
                                threads=threads, random_seed=int(seed))
        else:
            solver = pulp.PULP_CBC_CMD(msg=False, timeLimit=max(1, int(left)), gapRel=0.0,
                                       gapAbs=0.5, threads=threads,
                                       options=[f"randomSeed {int(seed) + 1}"])
        with quiet_stdout() if backend == "highs" else contextlib.nullcontext():
            prob.solve(solver)
        if prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            if prob.status == pulp.LpStatusInfeasible:
                result.status = "infeasible"
            break
        x = np.array([int(np.argmax([var.varValue or 0.0 for var in row])) for row in xs],
                     dtype=np.int64)
        optimal = prob.sol_status == pulp.LpSolutionOptimal
        if backend == "highs" and getattr(prob, "solverModel", None) is not None:
            # a relaxation (memory rows not yet added) bounds the full problem from below
            result.bound = float(prob.solverModel.getInfo().mip_dual_bound)
        load = cm.load_of(x)
        excess = load - cm.cap
        new_rows = [r for r in pick_violated_rows(excess) if int(r) not in added]
        if not new_rows:
            if not (excess > 0).any():
                result.x, result.optimal = x, optimal
                result.status = "optimal" if optimal else "feasible"
            break
        for r in new_rows:
            added.add(int(r))
            terms = []
            for v in np.nonzero(cm.has_mem & (cm.span[:, 0] <= r) & (r < cm.span[:, 1]))[0]:
                bp, P = cm.prof_bp[v], cm.prof[v]
                j = int(np.searchsorted(bp, r, side="right")) - 1
                terms += [(xs[v][s], int(P[s, j])) for s in np.nonzero(P[:, j])[0]]
            prob += pulp.LpAffineExpression(terms) <= int(cm.cap[r]), f"mem_{r}"
    result.rounds = rounds
    result.num_constraints = len(prob.constraints)
    return result

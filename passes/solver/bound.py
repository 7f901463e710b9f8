"""A proven lower bound on the core's optimum, from the LP relaxation's duals.

The searches often find the optimum in a fraction of a second; what costs time
is knowing it. HiGHS's MIP proves it by solving the LP relaxation with simplex,
which takes seconds on compiler problems with large strategy sets. A first-order
LP solver (HiGHS's PDLP) gets near-optimal duals several times faster, and any
dual vector ``pi`` gives a valid bound by weak duality, with no trust in the
solver's tolerances: for ``min c'z`` s.t. ``L <= Az <= U``, ``l <= z <= u``,

    c'z >= sum_i (pi_i L_i if pi_i > 0 else pi_i U_i) + sum_j min(d_j l_j, d_j u_j),
    d = c - A'pi,

where ``pi_i`` is clipped to the sign its finite side allows. The edge columns get
``u = 1`` (implied by the one-hot rows), so every term is finite. Memory rows
left out of the LP only relax it: the bound stays valid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .core import CoreModel
from .subilp import SubILP, highs

PDLP_TOLERANCE = 1e-9
MEMORY_ROWS_MAX = 2000
"""Memory rows that can bind are put into the LP only up to this many (the bound is valid either way)."""


@dataclass
class LPBound:
    value: float | None       # core-cost lower bound; None when the LP gave nothing usable
    lp_objective: float | None
    seconds: float
    solver: str


def dual_bound(A: sp.csr_matrix, cost: np.ndarray, col_lb: np.ndarray, col_ub: np.ndarray,
               row_lb: np.ndarray, row_ub: np.ndarray, pi: np.ndarray) -> float:
    """Weak-duality bound of ``min cost'z`` over the box and rows for any row duals ``pi``."""
    pi = np.where(np.isfinite(row_lb), pi, np.minimum(pi, 0.0))
    pi = np.where(np.isfinite(row_ub), pi, np.maximum(pi, 0.0))
    rows = np.where(pi > 0, pi * np.where(np.isfinite(row_lb), row_lb, 0.0),
                    pi * np.where(np.isfinite(row_ub), row_ub, 0.0))
    d = cost - A.T @ pi
    return float(rows.sum() + np.minimum(d * col_lb, d * col_ub).sum())


def lp_bound(cm: CoreModel, time_limit: float, *, solver: str = "pdlp") -> LPBound:
    """Lower bound on the core's optimum from its LP relaxation (``solver``: pdlp | ipm | simplex)."""
    t0 = time.monotonic()
    sub = SubILP(cm, np.arange(cm.m), np.zeros(cm.m, dtype=np.int64), None)
    rows = sub.cand_rows if sub.cand_rows.size <= MEMORY_ROWS_MAX else sub.cand_rows[:0]
    r_i, c_i, v_i = sub.A
    mr, mc, mv = sub._mem_rows(rows)
    nrow = sub.nrow_struct + len(rows)
    A = sp.csc_matrix((np.concatenate([v_i, mv]),
                       (np.concatenate([r_i, sub.nrow_struct + mr]), np.concatenate([c_i, mc]))),
                      shape=(nrow, sub.ncol))
    row_lb = np.concatenate([sub.row_lb, np.full(len(rows), -np.inf)])
    row_ub = np.concatenate([sub.row_ub, sub.resid[rows].astype(np.float64)]) if len(rows) else sub.row_ub
    cost = sub.col_cost * sub.scale
    col_ub = sub.col_ub.copy()
    col_ub[sub.nx:] = 1.0
    left = time_limit - (time.monotonic() - t0)
    if left <= 0.01:
        return LPBound(None, None, time.monotonic() - t0, solver)
    h = highs()
    h.passModel(int(sub.ncol), int(nrow), int(A.nnz), 1, 1, 0.0, cost, sub.col_lb, col_ub,
                row_lb, row_ub, A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data,
                np.zeros(sub.ncol, dtype=np.int32))
    h.setOptionValue("solver", solver)
    h.setOptionValue("time_limit", float(left))
    # HiGHS starts one thread pool per process, sized by the first run: every run here uses 1
    h.setOptionValue("threads", 1)
    if solver == "pdlp":
        h.setOptionValue("pdlp_d_gap_tol", PDLP_TOLERANCE)
        h.setOptionValue("primal_feasibility_tolerance", PDLP_TOLERANCE)
        h.setOptionValue("dual_feasibility_tolerance", PDLP_TOLERANCE)
    elif solver == "ipm":
        h.setOptionValue("run_crossover", "off")
    h.run()
    sol = h.getSolution()
    if not sol.dual_valid:
        return LPBound(None, None, time.monotonic() - t0, solver)
    pi = np.asarray(sol.row_dual, dtype=np.float64)
    value = dual_bound(A.tocsr(), cost, sub.col_lb, col_ub, row_lb, row_ub, pi) / sub.scale
    obj = float(h.getInfo().objective_function_value) / sub.scale
    return LPBound(value if np.isfinite(value) else None, obj, time.monotonic() - t0, solver)


def proves_optimal(cost: float, bound: float | None, rel_gap: float) -> bool:
    """Integer costs: ``cost`` is optimal when no integer lies in [bound, cost) beyond the gap."""
    if bound is None or not np.isfinite(cost):
        return False
    return cost - bound < max(1.0 - 1e-6, rel_gap * abs(cost))

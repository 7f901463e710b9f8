"""Exact ILP over a set of free core nodes (the rest fixed), built straight for highspy.

Used for the whole core when it is small, and for the neighbourhoods of the
large-neighbourhood search. The model is the local-polytope ("marginal")
formulation: binary x[v, s]; for every edge between free nodes a continuous
y[s_a, s_b] per allowed pair with sum_t y[s, t] = x[a, s] and sum_s y[s, t] =
x[b, t]. Its LP relaxation is much tighter than the textbook
``y >= x_a + x_b - 1`` and forbidden pairs simply get no column. Memory rows
are added lazily: solve, check every row, add the violated ones, re-solve.
The arrays are assembled with numpy and passed in one call, which is far
cheaper than a modelling layer on thousands of small sub-problems.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .core import CoreModel

_hs = None


def highs():
    """A silent highspy.Highs (the banner goes to fd 1, which the CLI keeps for results)."""
    global _hs
    if _hs is None:
        import highspy
        _hs = highspy
    fd = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            h = _hs.Highs()
    finally:
        os.dup2(fd, 1)
        os.close(fd)
    h.setOptionValue("output_flag", False)
    return h


@dataclass
class SubResult:
    x: np.ndarray | None          # strategies of the free nodes (None: nothing found)
    objective: float | None       # free part of the cost (node costs incl. fixed-neighbour edges)
    bound: float | None           # lower bound on that objective
    optimal: bool
    rounds: int
    rows: int
    cols: int


class SubILP:
    """Builds and solves the ILP of ``free`` nodes given the assignment ``x`` of the rest."""

    def __init__(self, core: CoreModel, free: np.ndarray, x: np.ndarray, load: np.ndarray | None):
        self.core = core
        F = np.asarray(free, dtype=np.int64)
        self.F = F
        m = core.m
        pos = -np.ones(m, dtype=np.int64)
        pos[F] = np.arange(len(F))
        self.pos = pos
        k = core.k[F]
        self.xoff = np.zeros(len(F) + 1, dtype=np.int64)
        np.cumsum(k, out=self.xoff[1:])
        nx = int(self.xoff[-1])
        cost = np.empty(nx)
        internal = []
        for i, v in enumerate(F):
            c = core.cost[v].copy()
            for (e, u, row), mat in zip(core.nbr[v], core.nbr_mats[v]):
                if pos[u] < 0:
                    c += mat[:, x[u]]
                elif row:
                    internal.append(e)
            cost[self.xoff[i]:self.xoff[i + 1]] = c
        self.const = 0.0
        self.x_cost = cost
        # x columns must be finite: forbidden strategies get an upper bound of 0
        xub = np.where(np.isfinite(cost), 1.0, 0.0)
        cost = np.where(np.isfinite(cost), cost, 0.0)
        rows_i, cols_i, vals = [], [], []
        nrow = len(F)
        # one-hot rows
        rows_i.append(np.repeat(np.arange(len(F)), k))
        cols_i.append(np.arange(nx))
        vals.append(np.ones(nx))
        ycost = []
        ncol = nx
        self.internal = internal
        self.ycol = []
        for e in internal:
            a, b = int(core.ea[e]), int(core.eb[e])
            mat = core.mats[e]
            ka, kb = mat.shape
            fin = np.isfinite(mat)
            sa, sb = np.nonzero(fin)
            ny = len(sa)
            ycol = np.arange(ncol, ncol + ny)
            self.ycol.append((ycol, sa, sb))
            ycost.append(mat[sa, sb])
            ra = nrow + sa                       # rows: sum_t y[s, t] - x[a, s] = 0
            rb = nrow + ka + sb                  # rows: sum_s y[s, t] - x[b, t] = 0
            rows_i += [ra, rb, nrow + np.arange(ka), nrow + ka + np.arange(kb)]
            cols_i += [ycol, ycol, self.xoff[pos[a]] + np.arange(ka), self.xoff[pos[b]] + np.arange(kb)]
            vals += [np.ones(ny), np.ones(ny), -np.ones(ka), -np.ones(kb)]
            nrow += ka + kb
            ncol += ny
        self.nx, self.ncol, self.nrow_struct = nx, ncol, nrow
        self.col_cost = np.concatenate([cost] + ycost) if ycost else cost
        self.col_lb = np.zeros(ncol)
        self.col_ub = np.concatenate([xub, np.full(ncol - nx, np.inf)])
        self.row_lb = np.concatenate([np.ones(len(F)), np.zeros(nrow - len(F))])
        self.row_ub = self.row_lb.copy()
        self.A = (np.concatenate(rows_i), np.concatenate(cols_i), np.concatenate(vals))
        # memory: residual capacity of every row once the free nodes are taken out
        self.mem_nodes = [i for i, v in enumerate(F) if core.prof[v] is not None]
        self.resid = None
        if self.mem_nodes and core.T:
            if load is None:
                load = core.load_of(x)
            own = np.zeros(core.T + 1, dtype=np.int64)
            lo_span, hi_span = core.T, 0
            for i in self.mem_nodes:
                v = F[i]
                bp, P = core.prof_bp[v], core.prof[v]
                row = P[x[v]]
                own[bp[:-1]] += row
                own[bp[1:]] -= row
                lo_span, hi_span = min(lo_span, bp[0]), max(hi_span, bp[-1])
            own = np.cumsum(own)[:-1]
            self.resid = core.cap - (load - own)
            # rows that can never bind: max possible free load fits
            mx = np.zeros(core.T + 1, dtype=np.int64)
            for i in self.mem_nodes:
                v = F[i]
                bp, P = core.prof_bp[v], core.prof[v]
                row = P.max(axis=0)
                mx[bp[:-1]] += row
                mx[bp[1:]] -= row
            mx = np.cumsum(mx)[:-1]
            cand = np.nonzero(mx > self.resid)[0]
            # rows with the same free-node breakpoints share coefficients: keep the tightest
            if cand.size:
                bps = np.unique(np.concatenate([core.prof_bp[F[i]] for i in self.mem_nodes]))
                seg = np.searchsorted(bps, cand, side="right")
                order = np.lexsort((self.resid[cand], seg))
                c2 = cand[order]
                first = np.ones(len(c2), dtype=bool)
                first[1:] = seg[order][1:] != seg[order][:-1]
                cand = np.sort(c2[first])
            self.cand = cand
        else:
            self.cand = np.zeros(0, dtype=np.int64)

    def _mem_rows(self, rows: np.ndarray):
        """COO entries (local row index, column, coefficient) of memory rows ``rows``."""
        core = self.core
        ri, ci, vi = [], [], []
        for i in self.mem_nodes:
            v = self.F[i]
            bp, P = core.prof_bp[v], core.prof[v]
            lo, hi = np.searchsorted(rows, bp[0]), np.searchsorted(rows, bp[-1])
            if hi <= lo:
                continue
            rr = rows[lo:hi]
            seg = np.searchsorted(bp, rr, side="right") - 1
            coef = P[:, seg]                          # (k, len(rr))
            s_idx, r_idx = np.nonzero(coef)
            if s_idx.size == 0:
                continue
            ri.append(lo + r_idx)
            ci.append(self.xoff[i] + s_idx)
            vi.append(coef[s_idx, r_idx].astype(np.float64))
        if not ri:
            return (np.zeros(0, dtype=np.int64),) * 2 + (np.zeros(0),)
        return np.concatenate(ri), np.concatenate(ci), np.concatenate(vi)

    def free_load(self, xs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Load of the free nodes at ``rows`` for local assignment ``xs``."""
        core = self.core
        out = np.zeros(len(rows), dtype=np.int64)
        for i in self.mem_nodes:
            v = self.F[i]
            bp, P = core.prof_bp[v], core.prof[v]
            lo, hi = np.searchsorted(rows, bp[0]), np.searchsorted(rows, bp[-1])
            if hi > lo:
                seg = np.searchsorted(bp, rows[lo:hi], side="right") - 1
                out[lo:hi] += P[xs[i], seg]
        return out

    def objective_of(self, xs: np.ndarray) -> float:
        core = self.core
        c = float(sum(self.x_cost[self.xoff[i] + xs[i]] for i in range(len(self.F))))
        for e in self.internal:
            c += float(core.mats[e][xs[self.pos[core.ea[e]]], xs[self.pos[core.eb[e]]]])
        return c

    def solve(self, time_limit: float, start: np.ndarray | None = None, *, gap: float = 0.0,
              seed: int = 0, threads: int = 1, init_rows: np.ndarray | None = None,
              max_rounds: int = 50) -> SubResult:
        import scipy.sparse as sp
        t_end = time.monotonic() + time_limit
        h = highs()
        h.setOptionValue("mip_rel_gap", gap)
        h.setOptionValue("random_seed", int(seed))
        h.setOptionValue("threads", int(threads))
        h.setOptionValue("mip_abs_gap", 0.5)   # costs are integers
        cand = self.cand
        if init_rows is None:
            if start is not None and cand.size:
                slack = self.resid[cand] - self.free_load(start, cand)
                init_rows = cand[slack <= np.quantile(slack, 0.1)] if cand.size > 50 else cand
            else:
                init_rows = cand if cand.size <= 2000 else cand[:0]
        rows = np.intersect1d(init_rows, cand)
        r_i, c_i, v_i = self.A
        mr, mc, mv = self._mem_rows(rows)
        A = sp.csc_matrix((np.concatenate([v_i, mv]),
                           (np.concatenate([r_i, self.nrow_struct + mr]), np.concatenate([c_i, mc]))),
                          shape=(self.nrow_struct + len(rows), self.ncol))
        rlb = np.concatenate([self.row_lb, np.full(len(rows), -np.inf)])
        rub = np.concatenate([self.row_ub, self.resid[rows].astype(np.float64)]) if len(rows) else self.row_ub
        integrality = np.zeros(self.ncol, dtype=np.int32)
        integrality[:self.nx] = 1
        h.passModel(int(self.ncol), int(A.shape[0]), int(A.nnz), 1, 1, 0.0,
                    self.col_cost, self.col_lb, self.col_ub, rlb, rub,
                    A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data, integrality)
        best = None
        rounds = 0
        optimal = False
        bound = None
        obj = None
        while True:
            rounds += 1
            left = t_end - time.monotonic()
            if left <= 0.01:
                break
            h.setOptionValue("time_limit", float(left))
            if start is not None:
                self._set_start(h, start)
            h.run()
            info = h.getInfo()
            status = h.modelStatusToString(h.getModelStatus())
            if info.primal_solution_status < 2:   # no feasible point
                if status == "Infeasible":
                    optimal = True                 # proven: no improvement possible
                break
            vals = np.asarray(h.getSolution().col_value)[:self.nx]
            xs = np.array([int(np.argmax(vals[self.xoff[i]:self.xoff[i + 1]]))
                           for i in range(len(self.F))], dtype=np.int64)
            bound = float(info.mip_dual_bound)
            # check every candidate memory row; add the violated ones
            viol = np.zeros(0, dtype=np.int64)
            if cand.size:
                fl = self.free_load(xs, cand)
                viol = cand[fl > self.resid[cand]]
            if viol.size == 0:
                best = xs
                obj = self.objective_of(xs)
                optimal = status == "Optimal"
                break
            if rounds >= max_rounds:
                break
            viol = self._pick_rows(cand, fl - self.resid[cand])
            if os.environ.get("MW_DEBUG"):
                print(f"  round {rounds}: {time.monotonic() - t_end + time_limit:.1f}s status={status} "
                      f"obj={info.objective_function_value:.0f} bound={bound:.0f} add {len(viol)} rows")
            mr, mc, mv = self._mem_rows(viol)
            nnew = len(viol)
            order = np.argsort(mr, kind="stable")
            mr, mc, mv = mr[order], mc[order], mv[order]
            starts = np.searchsorted(mr, np.arange(nnew)).astype(np.int32)
            h.addRows(nnew, np.full(nnew, -np.inf), self.resid[viol].astype(np.float64),
                      len(mc), starts, mc.astype(np.int32), mv)
            rows = np.union1d(rows, viol)
        nrows = self.nrow_struct + len(rows)
        return SubResult(x=best, objective=obj, bound=bound, optimal=optimal, rounds=rounds,
                         rows=nrows, cols=self.ncol)

    @staticmethod
    def _pick_rows(cand: np.ndarray, excess: np.ndarray, per_run: int = 1) -> np.ndarray:
        """The most violated row of every run of consecutive violated rows.

        Load varies gradually over time, so neighbouring rows are nearly the same
        constraint; adding one per violated stretch keeps the model small.
        """
        bad = excess > 0
        idx = np.nonzero(bad)[0]
        if idx.size == 0:
            return cand[:0]
        brk = np.nonzero(np.diff(idx) > 1)[0] + 1
        runs = np.split(idx, brk)
        picks = [r[np.argmax(excess[r])] for r in runs]
        return cand[np.sort(np.array(picks))]

    def _set_start(self, h, xs: np.ndarray) -> None:
        val = np.zeros(self.ncol)
        val[self.xoff[:-1] + xs] = 1.0
        for (ycol, sa, sb), e in zip(self.ycol, self.internal):
            a, b = self.pos[self.core.ea[e]], self.pos[self.core.eb[e]]
            hit = (sa == xs[a]) & (sb == xs[b])
            val[ycol[hit]] = 1.0
        h.setSolution(self.ncol, np.arange(self.ncol, dtype=np.int32), val)

"""Exact ILP over a set of free core nodes (the rest fixed), built straight for highspy.

Used for the whole core when it is small, and for the neighbourhoods of the
large-neighbourhood search. The model is the local-polytope ("marginal")
formulation: binary x[v, s]; for every edge between free nodes a continuous
y[s_a, s_b] per allowed pair with sum_t y[s, t] = x[a, s] and sum_s y[s, t] =
x[b, t]. Its LP relaxation is much tighter than the textbook
``y >= x_a + x_b - 1`` and forbidden pairs simply get no column. Memory rows
are added lazily: solve, check every row, add the most violated row of each
violated stretch, re-solve. The arrays are assembled with numpy and passed in
one call, far cheaper than a modelling layer on thousands of sub-problems.

A node may be restricted to candidate strategies (``cands``): with hundreds of
strategies per node the edge matrices, hence the y columns, grow
quadratically, and a neighbourhood only needs the plausible ones.

Compact edges (``split_edge``): compiler resharding matrices are mostly a
per-row constant (the cost of gathering the source layout) with a few cheaper
pairs. Such a finite matrix is written M = r 1' + 1 c' - D with D >= 0 sparse;
r and c go into the node costs and only the pairs with D > 0 get a y column,
with ``<=`` marginals (the solver wants every y as large as the x allow). For
integer x this is exact (at most the one chosen pair can be non-zero), and its
LP relaxation equals the full one: a relaxed y can always be completed to full
marginals on the D = 0 pairs at no cost, and a full y restricted to D > 0 costs
the same. It removes about 40% of the columns on compiler problems.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from .core import CoreModel, pick_violated_rows

_hs = None


def highs():
    """A silent highspy.Highs (its banner goes to fd 1, which the CLI keeps for results)."""
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


OBJECTIVE_MAX = 2.0 ** 20
"""Objectives are scaled by a power of two (exact) so the largest coefficient is about this:
HiGHS is markedly slower on costs of 1e13 (compiler problems), which it flags as badly scaled."""


def split_edge(mat: np.ndarray):
    """The y columns of one edge: ``(r, c, sa, sb, w, compact)``.

    compact: mat = r[:, None] + c[None, :] - D with D >= 0; (sa, sb) are the pairs with
    D > 0 and w = -D there (marginal rows ``<=``). Otherwise r = c = 0 and (sa, sb) are the
    finite pairs with w = mat (marginal rows ``==``); used for matrices with forbidden
    entries (a relaxed y must not complete onto them) and where splitting saves nothing.
    """
    ka, kb = mat.shape
    fin = np.isfinite(mat)
    if fin.all() and mat.size:
        best = None
        rmax = mat.max(axis=1)
        cmax = mat.max(axis=0)
        for r, c in ((rmax, (mat - rmax[:, None]).max(axis=0)), ((mat - cmax[None, :]).max(axis=1), cmax)):
            D = r[:, None] + c[None, :] - mat
            n = int(np.count_nonzero(D > 0))
            if best is None or n < best[0]:
                best = (n, r, c, D)
        n, r, c, D = best
        if n < mat.size:
            sa, sb = np.nonzero(D > 0)
            return r, c, sa, sb, -D[sa, sb], True
    sa, sb = np.nonzero(fin)
    return np.zeros(ka), np.zeros(kb), sa, sb, mat[sa, sb], False


def objective_scale(cost: np.ndarray) -> float:
    """Power of two bringing the largest finite |cost| near OBJECTIVE_MAX (1.0 when small)."""
    f = np.abs(cost[np.isfinite(cost)])
    top = float(f.max()) if f.size else 0.0
    if top <= 16 * OBJECTIVE_MAX:
        return 1.0
    return 2.0 ** -int(np.ceil(np.log2(top / OBJECTIVE_MAX)))


@dataclass
class SubResult:
    x: np.ndarray | None          # strategies (global indices) of the free nodes; None: nothing found
    objective: float | None       # free part of the cost (incl. edges to fixed nodes)
    bound: float | None
    optimal: bool                 # solved to optimality (or proven infeasible when x is None)
    rounds: int
    rows: int
    cols: int


class SubILP:
    """The ILP of ``free`` nodes given the assignment ``x`` of the rest (and its ``load``)."""

    def __init__(self, core: CoreModel, free: np.ndarray, x: np.ndarray, load: np.ndarray | None,
                 cands: list[np.ndarray] | None = None, *, compact: bool = True):
        self.core = core
        self.x_ctx = x
        F = np.asarray(free, dtype=np.int64)
        self.F = F
        pos = -np.ones(core.m, dtype=np.int64)
        pos[F] = np.arange(len(F))
        self.pos = pos
        if cands is None:
            cands = [np.arange(int(core.k[v])) for v in F]
        self.cands = cands
        kk = np.array([len(c) for c in cands], dtype=np.int64)
        self.xoff = np.zeros(len(F) + 1, dtype=np.int64)
        np.cumsum(kk, out=self.xoff[1:])
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
            cost[self.xoff[i]:self.xoff[i + 1]] = c[cands[i]]
        xub = np.where(np.isfinite(cost), 1.0, 0.0)        # forbidden strategies: fixed to 0
        cost = np.where(np.isfinite(cost), cost, 0.0)
        rows_i = [np.repeat(np.arange(len(F)), kk)]       # one-hot rows
        cols_i = [np.arange(nx)]
        vals = [np.ones(nx)]
        row_lb = [np.ones(len(F))]
        nrow = len(F)
        ycost = []
        ncol = nx
        self.ycol = []
        for e in internal:
            a, b = int(pos[core.ea[e]]), int(pos[core.eb[e]])
            mat = core.mats[e][np.ix_(cands[a], cands[b])]
            if compact:
                r, c, sa, sb, w, is_compact = split_edge(mat)
            else:
                sa, sb = np.nonzero(np.isfinite(mat))
                w, is_compact = mat[sa, sb], False
            if is_compact:
                cost[self.xoff[a]:self.xoff[a + 1]] += r
                cost[self.xoff[b]:self.xoff[b + 1]] += c
                ia, ib = np.unique(sa), np.unique(sb)      # rows without pairs would be 0 <= x
                ra, rb = np.searchsorted(ia, sa), len(ia) + np.searchsorted(ib, sb)
            else:
                ia, ib = np.arange(mat.shape[0]), np.arange(mat.shape[1])
                ra, rb = sa, len(ia) + sb
            ny = len(sa)
            ycol = np.arange(ncol, ncol + ny)
            self.ycol.append((ycol, sa, sb, a, b))
            ycost.append(w)
            na = len(ia) + len(ib)
            rows_i += [nrow + ra, nrow + rb, nrow + np.arange(na)]
            cols_i += [ycol, ycol, np.concatenate([self.xoff[a] + ia, self.xoff[b] + ib])]
            vals += [np.ones(ny), np.ones(ny), -np.ones(na)]
            row_lb.append(np.full(na, -np.inf if is_compact else 0.0))
            nrow += na
            ncol += ny
        self.nx, self.ncol, self.nrow_struct = nx, ncol, nrow
        self.col_cost = np.concatenate([cost] + ycost) if ycost else cost
        self.col_lb = np.zeros(ncol)
        self.col_ub = np.concatenate([xub, np.full(ncol - nx, np.inf)])
        self.row_lb = np.concatenate(row_lb)
        self.row_ub = np.concatenate([np.ones(len(F)), np.zeros(nrow - len(F))])
        self.A = (np.concatenate(rows_i), np.concatenate(cols_i), np.concatenate(vals))
        self.scale = objective_scale(self.col_cost)
        self._init_memory(x, load)

    def _init_memory(self, x: np.ndarray, load: np.ndarray | None) -> None:
        """Residual capacity of every row with the free nodes taken out; candidate rows."""
        core, F = self.core, self.F
        self.mem_nodes = [i for i, v in enumerate(F) if core.prof[v] is not None]
        self.resid = None
        self.cand_rows = np.zeros(0, dtype=np.int64)
        if not self.mem_nodes or not core.T:
            return
        if load is None:
            load = core.load_of(x)
        own = np.zeros(core.T + 1, dtype=np.int64)
        mx = np.zeros(core.T + 1, dtype=np.int64)
        for i in self.mem_nodes:
            v = F[i]
            bp, P = core.prof_bp[v], core.prof[v]
            row = P[x[v]]
            own[bp[:-1]] += row
            own[bp[1:]] -= row
            row = P[self.cands[i]].max(axis=0)
            mx[bp[:-1]] += row
            mx[bp[1:]] -= row
        self.resid = core.cap - (load - np.cumsum(own)[:-1])
        mx = np.cumsum(mx)[:-1]
        cand = np.nonzero(mx > self.resid)[0]        # rows that can bind at all
        if cand.size:
            # rows between the same free-node breakpoints share coefficients: keep the tightest
            bps = np.unique(np.concatenate([core.prof_bp[F[i]] for i in self.mem_nodes]))
            seg = np.searchsorted(bps, cand, side="right")
            order = np.lexsort((self.resid[cand], seg))
            c2 = cand[order]
            first = np.ones(len(c2), dtype=bool)
            first[1:] = seg[order][1:] != seg[order][:-1]
            cand = np.sort(c2[first])
        self.cand_rows = cand

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
            seg = np.searchsorted(bp, rows[lo:hi], side="right") - 1
            coef = P[self.cands[i]][:, seg]                  # (k_i, rows)
            s_idx, r_idx = np.nonzero(coef)
            if s_idx.size:
                ri.append(lo + r_idx)
                ci.append(self.xoff[i] + s_idx)
                vi.append(coef[s_idx, r_idx].astype(np.float64))
        if not ri:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros(0)
        return np.concatenate(ri), np.concatenate(ci), np.concatenate(vi)

    def free_load(self, xs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Load of the free nodes at ``rows`` for their (global) strategies ``xs``."""
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
        """Free part of the cost for global strategies ``xs`` of the free nodes."""
        core = self.core
        full = self.x_ctx.copy()
        full[self.F] = xs
        c = 0.0
        for i, v in enumerate(self.F):
            c += float(core.cost[v][xs[i]])
            for (e, u, row), mat in zip(core.nbr[v], core.nbr_mats[v]):
                if self.pos[u] < 0 or row:
                    c += float(mat[xs[i], full[u]])
        return c

    def solve(self, time_limit: float, start: np.ndarray | None = None, *, gap: float = 0.0,
              seed: int = 0, threads: int = 1, max_rounds: int = 50) -> SubResult:
        """Solve (lazy memory rows); ``start``: global strategies of the free nodes."""
        t_end = time.monotonic() + time_limit
        h = highs()
        h.setOptionValue("mip_rel_gap", gap)
        h.setOptionValue("mip_abs_gap", 0.5 * self.scale)   # costs are integers
        h.setOptionValue("random_seed", int(seed))
        h.setOptionValue("threads", int(threads))
        local_start = self._local(start)
        cand = self.cand_rows
        if local_start is not None and cand.size > 50:
            slack = self.resid[cand] - self.free_load(start, cand)
            rows = cand[slack <= np.quantile(slack, 0.1)]
        else:
            rows = cand if cand.size <= 2000 else cand[:0]
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
                    self.col_cost * self.scale, self.col_lb, self.col_ub, rlb, rub,
                    A.indptr.astype(np.int32), A.indices.astype(np.int32), A.data, integrality)
        best, obj, bound = None, None, None
        rounds, optimal = 0, False
        while True:
            left = t_end - time.monotonic()
            if left <= 0.01:
                break
            rounds += 1
            h.setOptionValue("time_limit", float(left))
            if local_start is not None:
                self._set_start(h, local_start)
            h.run()
            info = h.getInfo()
            status = h.modelStatusToString(h.getModelStatus())
            if info.primal_solution_status < 2:   # no feasible point
                optimal = status == "Infeasible"   # proven: nothing fits
                break
            vals = np.asarray(h.getSolution().col_value)[:self.nx]
            xl = np.array([int(np.argmax(vals[self.xoff[i]:self.xoff[i + 1]]))
                           for i in range(len(self.F))], dtype=np.int64)
            xs = np.array([c[j] for c, j in zip(self.cands, xl)], dtype=np.int64)
            bound = float(info.mip_dual_bound) / self.scale
            if cand.size:
                excess = self.free_load(xs, cand) - self.resid[cand]
                viol = cand[pick_violated_rows(excess)]
            else:
                viol = cand[:0]
            if viol.size == 0:
                best = xs
                obj = self.objective_of(xs)
                optimal = status == "Optimal"
                break
            if rounds >= max_rounds:
                break
            mr, mc, mv = self._mem_rows(viol)
            order = np.argsort(mr, kind="stable")
            mr, mc, mv = mr[order], mc[order], mv[order]
            nnew = len(viol)
            starts = np.searchsorted(mr, np.arange(nnew)).astype(np.int32)
            h.addRows(nnew, np.full(nnew, -np.inf), self.resid[viol].astype(np.float64),
                      len(mc), starts, mc.astype(np.int32), mv)
            rows = np.union1d(rows, viol)
        return SubResult(x=best, objective=obj, bound=bound, optimal=optimal, rounds=rounds,
                         rows=self.nrow_struct + len(rows), cols=self.ncol)

    def _local(self, xs: np.ndarray | None) -> np.ndarray | None:
        """Candidate positions of global strategies ``xs`` (None if one is not a candidate)."""
        if xs is None:
            return None
        xl = np.array([int(np.searchsorted(c, s)) for c, s in zip(self.cands, xs)], dtype=np.int64)
        ok = all(ls < len(c) and c[ls] == s for ls, c, s in zip(xl, self.cands, xs))
        return xl if ok else None

    def _columns(self, xl: np.ndarray) -> np.ndarray:
        """Column values of the point that picks local strategies ``xl``."""
        val = np.zeros(self.ncol)
        val[self.xoff[:-1] + xl] = 1.0
        for ycol, sa, sb, a, b in self.ycol:
            val[ycol[(sa == xl[a]) & (sb == xl[b])]] = 1.0
        return val

    def _set_start(self, h, xl: np.ndarray) -> None:
        h.setSolution(self.ncol, np.arange(self.ncol, dtype=np.int32), self._columns(xl))

"""The reduced problem in flat arrays, with the queries the searches need.

After reduction (``reduce.py``) the search works on this "core": a few hundred
to a few thousand nodes, each with a cost vector, pairwise edge matrices, and a
memory profile. Costs are float64 (``inf`` = forbidden; finite sums of the
bundled instances stay far below 2^53, so they are exact); memory stays int64.

Memory: the rows are the constraints ``load[r] <= cap[r]``. Each node's usage
is piecewise constant over its own "segments" (row ranges); ``prof[v][s, j]`` is
the usage of strategy s on segment j. All segments of all nodes are also kept in
one sparse matrix ``Pm`` (strategy x segment), so loads and Lagrangian
penalties of a whole assignment are single vectorized operations.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


class CoreModel:
    def __init__(self, k, cost, edges, terms, cap):
        self.m = m = len(k)
        self.k = np.asarray(k, dtype=np.int64)
        self.off = np.zeros(m + 1, dtype=np.int64)
        np.cumsum(self.k, out=self.off[1:])
        self.nS = int(self.off[-1])
        self.cost = [np.asarray(c, dtype=np.float64) for c in cost]
        self.cost_flat = np.concatenate(self.cost) if m else np.zeros(0)
        self.E = E = len(edges)
        self.ea = np.array([e[0] for e in edges], dtype=np.int64)
        self.eb = np.array([e[1] for e in edges], dtype=np.int64)
        self.mats = [np.ascontiguousarray(e[2], dtype=np.float64) for e in edges]
        self.e_off = np.zeros(E + 1, dtype=np.int64)
        if E:
            np.cumsum([mt.size for mt in self.mats], out=self.e_off[1:])
            self.emat = np.concatenate([mt.ravel() for mt in self.mats])
        else:
            self.emat = np.zeros(0)
        self.nnz = np.array([int(np.isfinite(mt).sum()) for mt in self.mats], dtype=np.int64)
        nbr: list[list] = [[] for _ in range(m)]
        for e in range(E):
            a, b = int(self.ea[e]), int(self.eb[e])
            nbr[a].append((e, b, True))
            nbr[b].append((e, a, False))
        self.nbr = nbr
        self.nbr_nodes = [np.array([t[1] for t in lst], dtype=np.int64) for lst in nbr]
        self.nbr_mats = [[self.mats[e] if row else self.mats[e].T for e, _, row in lst]
                         for lst in nbr]
        self.cap = np.asarray(cap, dtype=np.int64)
        self.T = len(self.cap)
        self._build_profiles(terms)

    def _build_profiles(self, terms) -> None:
        m = self.m
        self.prof_bp: list[np.ndarray | None] = [None] * m
        self.prof: list[np.ndarray | None] = [None] * m
        seg_r0, seg_r1, rows, cols, vals = [], [], [], [], []
        nseg = 0
        self.span = np.zeros((m, 2), dtype=np.int64)
        for v in range(m):
            lst = [t for t in terms[v] if t[1] > t[0]]
            if not lst:
                continue
            t0 = np.array([t[0] for t in lst], dtype=np.int64)
            t1 = np.array([t[1] for t in lst], dtype=np.int64)
            bp = np.unique(np.concatenate([t0, t1]))
            P = np.zeros((int(self.k[v]), len(bp)), dtype=np.int64)
            for (r0, r1, u) in lst:
                P[:, np.searchsorted(bp, r0)] += u
                P[:, np.searchsorted(bp, r1)] -= u
            P = np.cumsum(P, axis=1)[:, :-1]
            if not P.any():
                continue
            self.prof_bp[v], self.prof[v] = bp, P
            self.span[v] = (bp[0], bp[-1])
            s_idx, j_idx = np.nonzero(P)
            rows.append(self.off[v] + s_idx)
            cols.append(nseg + j_idx)
            vals.append(P[s_idx, j_idx])
            seg_r0.append(bp[:-1])
            seg_r1.append(bp[1:])
            nseg += len(bp) - 1
        self.has_mem = np.array([p is not None for p in self.prof], dtype=bool)
        self.nseg = nseg
        if nseg:
            self.seg_r0 = np.concatenate(seg_r0)
            self.seg_r1 = np.concatenate(seg_r1)
            self.Pm = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                    shape=(self.nS, nseg), dtype=np.int64)
        else:
            self.seg_r0 = self.seg_r1 = np.zeros(0, dtype=np.int64)
            self.Pm = sp.csr_matrix((self.nS, 0), dtype=np.int64)

    # ----- whole-assignment queries ------------------------------------------
    def cost_of(self, x: np.ndarray) -> float:
        c = float(self.cost_flat[self.off[:-1] + x].sum())
        if self.E:
            c += float(self.emat[self.e_off[:-1] + x[self.ea] * self.k[self.eb] + x[self.eb]].sum())
        return c

    def load_of(self, x: np.ndarray) -> np.ndarray:
        """Exact int64 load of every memory row."""
        if not self.nseg:
            return np.zeros(self.T, dtype=np.int64)
        sel = self.Pm[self.off[:-1] + x]
        sel = sel.tocoo()
        d = np.zeros(self.T + 1, dtype=np.int64)
        np.add.at(d, self.seg_r0[sel.col], sel.data)
        np.subtract.at(d, self.seg_r1[sel.col], sel.data)
        return np.cumsum(d)[:-1]

    def penalty(self, mu: np.ndarray) -> np.ndarray:
        """Flat per-strategy cost of memory at row prices ``mu``: sum_r mu[r] * usage[r]."""
        if not self.nseg:
            return np.zeros(self.nS)
        cm = np.concatenate([[0.0], np.cumsum(mu)])
        w = cm[self.seg_r1] - cm[self.seg_r0]
        return self.Pm @ w

    # ----- single-node queries -----------------------------------------------
    def add_node_load(self, load: np.ndarray, v: int, s_old: int, s_new: int) -> None:
        """Update ``load`` in place for node v switching s_old -> s_new."""
        if self.prof[v] is None or s_old == s_new:
            return
        bp, P = self.prof_bp[v], self.prof[v]
        diff = P[s_new] - P[s_old]
        d = np.zeros(len(bp), dtype=np.int64)
        d[:-1] = diff
        d[1:] -= diff
        load[bp[0]:bp[-1]] += np.repeat(np.cumsum(d)[:-1], np.diff(bp))

    def local_cost(self, v: int, x: np.ndarray) -> np.ndarray:
        """Cost of each strategy of v given its neighbours' current strategies."""
        c = self.cost[v].copy()
        for mat, u in zip(self.nbr_mats[v], self.nbr_nodes[v]):
            c += mat[:, x[u]]
        return c

    def seg_slack(self, v: int, load: np.ndarray) -> np.ndarray | None:
        """min over each of v's segments of (cap - load)."""
        bp = self.prof_bp[v]
        if bp is None:
            return None
        sl = self.cap[bp[0]:bp[-1]] - load[bp[0]:bp[-1]]
        return np.minimum.reduceat(sl, bp[:-1] - bp[0])

    def fits(self, v: int, x: np.ndarray, load: np.ndarray) -> np.ndarray:
        """Strategies of v that keep every row within capacity (others fixed).

        Rows already over capacity only accept strategies that do not add to them.
        """
        if self.prof[v] is None:
            return np.ones(int(self.k[v]), dtype=bool)
        P = self.prof[v]
        slack = self.seg_slack(v, load)
        room = np.maximum(slack, 0) + P[x[v]]
        return (P <= room[None, :]).all(axis=1)


def pick_violated_rows(excess: np.ndarray) -> np.ndarray:
    """Index of the most violated row of every run of consecutive violated rows.

    Load varies gradually over time, so neighbouring rows are nearly the same
    constraint; adding one per violated stretch keeps lazily grown ILPs small.
    """
    idx = np.nonzero(excess > 0)[0]
    if idx.size == 0:
        return idx
    runs = np.split(idx, np.nonzero(np.diff(idx) > 1)[0] + 1)
    return np.sort(np.array([r[np.argmax(excess[r])] for r in runs], dtype=np.int64))

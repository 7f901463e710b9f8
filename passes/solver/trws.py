"""Sequential tree-reweighted message passing (TRW-S), vectorized by colour class.

Single-node and tree moves get stuck where a hub and its neighbours must change
together; message passing optimizes the LP relaxation (local polytope) of the
whole pairwise problem and decodes labels that respect it, which is what gets
out of those minima. TRW-S (Kolmogorov 2006) processes nodes in a fixed order;
nodes that are not adjacent can be processed at the same time, so the order
here is "by colour" of a greedy graph colouring and every colour class is one
batch of numpy operations over its edges, grouped by padded matrix shape.
Unaries can be changed between calls (Lagrangian memory prices) while the
messages are kept, so repeated calls are warm-started.
"""

from __future__ import annotations

import numpy as np

from .core import CoreModel

_PADS = np.array([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64,
                  80, 96, 112, 128, 160, 192, 224, 256, 320, 384, 448, 512, 640, 768, 896, 1024])


def _pad(k: np.ndarray) -> np.ndarray:
    k = np.asarray(k)
    out = _PADS[np.minimum(np.searchsorted(_PADS, k), len(_PADS) - 1)]
    return np.where(k > _PADS[-1], k, out)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, lengths))."""
    if len(lengths) == 0:
        return np.zeros(0, dtype=np.int64)
    out = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths)
    return out + np.arange(int(lengths.sum()))


def greedy_colouring(cm: CoreModel) -> np.ndarray:
    """Welsh-Powell colouring (highest degree first)."""
    deg = np.array([len(n) for n in cm.nbr_nodes])
    colour = -np.ones(cm.m, dtype=np.int64)
    for v in np.argsort(-deg, kind="stable"):
        used = set(colour[cm.nbr_nodes[v]].tolist())
        c = 0
        while c in used:
            c += 1
        colour[v] = c
    return colour


class _Group:
    """Edges sent from one colour class with one padded shape (n, KA, KB)."""

    __slots__ = ("src_idx", "in_msg_idx", "gam", "mat", "out_msg_idx", "out_valid", "tgt")


class TRWS:
    """Message passing on the core's pairwise problem; ``run`` returns decoded labels.

    Edge e is oriented from its earlier-coloured end ``lo`` to ``hi``; the forward
    sweep updates messages lo -> hi colour by colour, the backward sweep hi -> lo.
    Forbidden entries stand in as ``big`` (finite, so no inf - inf arises).
    """

    def __init__(self, cm: CoreModel):
        self.cm = cm
        m, E = cm.m, cm.E
        k = cm.k
        self.off = cm.off
        self.nS = int(cm.off[-1])
        colour = greedy_colouring(cm)
        self.colour = colour
        self.C = int(colour.max()) + 1 if m else 0
        finite_max = 1.0
        for mat in cm.mats:
            f = mat[np.isfinite(mat)]
            if f.size:
                finite_max = max(finite_max, float(np.abs(f).max()))
        for c in cm.cost:
            f = c[np.isfinite(c)]
            if f.size:
                finite_max = max(finite_max, float(np.abs(f).max()))
        self.big = finite_max * 1e4     # stands in for "forbidden" inside the messages
        ea, eb = cm.ea, cm.eb
        swap = colour[ea] > colour[eb]
        lo = np.where(swap, eb, ea)
        hi = np.where(swap, ea, eb)
        self.lo, self.hi, self.swap = lo, hi, swap
        n_out = np.bincount(lo, minlength=m)
        n_in = np.bincount(hi, minlength=m)
        self.gam = 1.0 / np.maximum(1, np.maximum(n_in, n_out))
        # message layouts: mh[e] over hi's strategies (lo -> hi), ml[e] over lo's (hi -> lo)
        khi, klo = k[hi], k[lo]
        self.mh_off = np.zeros(E + 1, dtype=np.int64)
        np.cumsum(khi, out=self.mh_off[1:])
        self.ml_off = np.zeros(E + 1, dtype=np.int64)
        np.cumsum(klo, out=self.ml_off[1:])
        self.mh = np.zeros(int(self.mh_off[-1]))
        self.ml = np.zeros(int(self.ml_off[-1]))
        self.tgt_mh = _ranges(cm.off[hi], khi)      # flat strategy index each entry lands on
        self.tgt_ml = _ranges(cm.off[lo], klo)
        # edge matrices, flat, oriented rows = lo (for energies)
        mats_lo = [cm.mats[e].T if swap[e] else cm.mats[e] for e in range(E)]
        self.e_off = np.zeros(E + 1, dtype=np.int64)
        np.cumsum(klo * khi, out=self.e_off[1:])
        self.emat = (np.concatenate([np.where(np.isfinite(mt), mt, self.big).ravel() for mt in mats_lo])
                     if E else np.zeros(0))
        self.fwd = [self._groups(np.nonzero(colour[lo] == c)[0], mats_lo, forward=True)
                    for c in range(self.C)]
        self.bwd = [self._groups(np.nonzero(colour[hi] == c)[0], mats_lo, forward=False)
                    for c in range(self.C)]
        # per colour: nodes and a padded gather of their strategies (for decoding)
        self.nodes_c = [np.nonzero(colour == c)[0] for c in range(self.C)]
        self.dec_idx = []
        for c in range(self.C):
            vs = self.nodes_c[c]
            kp = int(k[vs].max()) if len(vs) else 1
            idx = np.full((len(vs), kp), self.nS, dtype=np.int64)
            for i, v in enumerate(vs):
                idx[i, :k[v]] = cm.off[v] + np.arange(k[v])
            self.dec_idx.append(idx)
        # decoding: colour c adds, for every edge whose hi end is in c, the row of the
        # (already decoded) lo end: entries e_off[e] + x[lo]*k_hi + t, t < k_hi
        self.dec_edges = []
        for c in range(self.C):
            es = np.nonzero(colour[hi] == c)[0]
            if es.size == 0:
                self.dec_edges.append(None)
                continue
            rep = np.repeat(es, khi[es])
            t = np.concatenate([np.arange(khi[e]) for e in es])
            self.dec_edges.append((rep, t, self.e_off[rep] + t, lo[rep], khi[rep], cm.off[hi[rep]] + t))

    def _groups(self, edges: np.ndarray, mats_lo, forward: bool) -> list:
        cm = self.cm
        if edges.size == 0:
            return []
        src = self.lo[edges] if forward else self.hi[edges]
        dst = self.hi[edges] if forward else self.lo[edges]
        ks, kd = cm.k[src], cm.k[dst]
        ps, pd = _pad(ks), _pad(kd)
        groups = []
        keys = ps * 100000 + pd
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            KA, KB = int(ps[sel[0]]), int(pd[sel[0]])
            g = _Group()
            n = len(sel)
            es = edges[sel]
            src_idx = np.full((n, KA), self.nS, dtype=np.int64)     # into S (sentinel: +inf)
            in_idx = np.full((n, KA), -1, dtype=np.int64)   # message into src; -1: the 0 sentinel
            out_idx = np.zeros((n, KB), dtype=np.int64)            # message src -> dst
            valid = np.zeros((n, KB), dtype=bool)
            mat = np.full((n, KA, KB), np.inf)
            for i, e in enumerate(es):
                s, d = int(src[sel[i]]), int(dst[sel[i]])
                a, b = int(cm.k[s]), int(cm.k[d])
                src_idx[i, :a] = cm.off[s] + np.arange(a)
                mt = mats_lo[e] if forward else mats_lo[e].T
                mat[i, :a, :b] = np.where(np.isfinite(mt), mt, self.big)
                if forward:
                    in_idx[i, :a] = self.ml_off[e] + np.arange(a)
                    out_idx[i, :b] = self.mh_off[e] + np.arange(b)
                else:
                    in_idx[i, :a] = self.mh_off[e] + np.arange(a)
                    out_idx[i, :b] = self.ml_off[e] + np.arange(b)
                valid[i, :b] = True
            g.src_idx = src_idx
            g.in_msg_idx = in_idx
            g.gam = self.gam[src[sel]][:, None]
            g.mat = mat
            g.out_msg_idx = out_idx[valid]
            g.out_valid = valid
            g.tgt = (self.tgt_mh if forward else self.tgt_ml)[g.out_msg_idx]
            groups.append(g)
        return groups

    def _sweep(self, S: np.ndarray, forward: bool, theta: np.ndarray | None = None,
               x: np.ndarray | None = None) -> None:
        """One pass; S (length nS + 1, last entry +inf) stays theta + all incoming messages.

        With ``x`` (forward pass only) also decodes labels colour by colour.
        """
        out_msgs = self.mh if forward else self.ml
        in_ext = np.append(self.ml if forward else self.mh, 0.0)
        order = range(self.C) if forward else range(self.C - 1, -1, -1)
        D = None
        if x is not None:
            D = np.append(theta + np.bincount(self.tgt_ml, self.ml, minlength=self.nS), np.inf)
        for c in order:
            if D is not None:
                d = D
                de = self.dec_edges[c]
                if de is not None:
                    rep, t, base, lo_n, kh, pos = de
                    d = D.copy()
                    d[:-1] += np.bincount(pos, self.emat[base + x[lo_n] * kh], minlength=self.nS)
                vs = self.nodes_c[c]
                if len(vs):
                    x[vs] = np.argmin(d[self.dec_idx[c]], axis=1)
            for g in (self.fwd[c] if forward else self.bwd[c]):
                h = g.gam * S[g.src_idx] - in_ext[g.in_msg_idx]
                new = (h[:, :, None] + g.mat).min(axis=1)
                new -= new.min(axis=1, keepdims=True)
                nv = new[g.out_valid]
                delta = nv - out_msgs[g.out_msg_idx]
                out_msgs[g.out_msg_idx] = nv
                S[:-1] += np.bincount(g.tgt, delta, minlength=self.nS)

    def _bound_index(self) -> None:
        """Per edge-matrix entry: its lo/hi strategy and message positions (built on first use)."""
        cm = self.cm
        klo, khi = cm.k[self.lo], cm.k[self.hi]
        sizes = klo * khi
        eid = np.repeat(np.arange(cm.E), sizes)
        within = np.arange(int(sizes.sum())) - np.repeat(self.e_off[:-1], sizes)
        s, t = within // khi[eid], within % khi[eid]
        deg = np.bincount(self.lo, minlength=cm.m) + np.bincount(self.hi, minlength=cm.m)
        self._bi = (cm.off[self.lo[eid]] + s, cm.off[self.hi[eid]] + t, self.ml_off[eid] + s,
                    self.mh_off[eid] + t, 1.0 / deg[self.lo[eid]], 1.0 / deg[self.hi[eid]],
                    np.nonzero(deg == 0)[0])

    def lower_bound(self, theta: np.ndarray) -> float:
        """A valid lower bound on min_x energy(theta, x) from the current messages.

        The messages reparametrize the energy (unaries S = theta + incoming messages, edge
        terms theta_e - m_lo->hi - m_hi->lo; every labelling keeps its energy). Each node's
        S is split evenly over its edges and every edge minimised on its own: the sum of
        those minima (plus isolated nodes' minima) bounds every labelling's energy from
        below, whatever the messages. As TRW-S converges it meets the optimum wherever
        the LP relaxation is tight, which compiler problems without a binding memory
        limit usually are.
        """
        if not hasattr(self, "_bi"):
            self._bound_index()
        lo_i, hi_i, ml_i, mh_i, wlo, whi, iso = self._bi
        th = np.where(np.isfinite(theta), theta, self.big)
        S = th + np.bincount(self.tgt_mh, self.mh, minlength=self.nS) \
            + np.bincount(self.tgt_ml, self.ml, minlength=self.nS)
        total = 0.0
        if self.cm.E:
            val = S[lo_i] * wlo + S[hi_i] * whi + self.emat - self.mh[mh_i] - self.ml[ml_i]
            total += float(np.minimum.reduceat(val, self.e_off[:-1]).sum())
        for v in iso:
            total += float(S[self.off[v]:self.off[v + 1]].min())
        return total

    def energy(self, theta: np.ndarray, x: np.ndarray) -> float:
        """sum theta[x] + sum edge costs (forbidden entries count as ``big``)."""
        e = float(theta[self.off[:-1] + x].sum())
        if self.cm.E:
            e += float(self.emat[self.e_off[:-1] + x[self.lo] * self.cm.k[self.hi] + x[self.hi]].sum())
        return e

    def run(self, theta: np.ndarray, iters: int, deadline: float | None = None):
        """``iters`` forward+backward sweeps with unaries ``theta`` (flat, len nS).

        Returns the best decoded labelling (by energy under ``theta``) and its energy.
        """
        import time
        th = np.where(np.isfinite(theta), theta, self.big)
        S = np.append(th + np.bincount(self.tgt_mh, self.mh, minlength=self.nS)
                      + np.bincount(self.tgt_ml, self.ml, minlength=self.nS), np.inf)
        best_x, best_e = None, np.inf
        x = np.zeros(self.cm.m, dtype=np.int64)
        for _ in range(iters):
            self._sweep(S, True, th, x)
            en = self.energy(th, x)
            if en < best_e:
                best_e, best_x = en, x.copy()
            self._sweep(S, False)
            if deadline is not None and time.monotonic() > deadline:
                break
        return best_x, best_e

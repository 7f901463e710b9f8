"""Exact graph reductions: shrink the problem before any search.

Production graphs are mostly bookkeeping: nodes with one strategy, "follower"
nodes whose strategy is forced by a neighbour (an edge matrix with one finite
entry per row), dominated strategies, and tree-like fringes that carry no
memory decision. Removing them leaves a core that is several times smaller,
and every removal is exact (the core optimum expands to an optimum of the
input), so the search spends its time only where choices matter.

Forbidden (``>= INF_COST``) entries become ``inf`` here: the reduction assumes
a solution of finite cost exists; ``Infeasible`` is raised when it proves none
does (the caller then falls back to treating them as large finite costs).

Memory: a node's usage counts over one or more live intervals ("terms";
merging gives a node the terms of the nodes it absorbed). Only time points
where the load could exceed the limit matter ("binding" points); a node none
of whose terms can change the load at a binding point is memory-free and can
be eliminated like any other node.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .problem import INF_COST, FlatProblem

_DOMINANCE_MAX_ELEMS = 4_000_000
_DEG2_MAX_ELEMS = 2_000_000


def _soft_big(fp: FlatProblem) -> float:
    """A stand-in for forbidden entries above any sum of finite costs.

    Minimising with it minimises the number of forbidden entries first, then the
    cost, while keeping float64 sums exact far better than 10^18 itself would.
    """
    def max_finite(vals, off):
        v = np.where(vals >= INF_COST, 0, vals).astype(np.float64)
        if v.size == 0:
            return 0.0
        return float(np.maximum.reduceat(v, off[:-1]).sum())
    return max_finite(fp.cost, fp.node_off) + max_finite(fp.edge_cost, fp.edge_off) + 1.0


class Infeasible(Exception):
    """No assignment avoids the forbidden entries."""


class ReductionTimeout(Exception):
    """The reduction did not finish before its deadline."""


@dataclass
class Core:
    """The reduced problem handed to the search (compact node ids 0..m-1).

    ``cost[v]`` (float64, inf = forbidden), ``edges[e] = (a, b, M)`` with a < b and
    M of shape (k_a, k_b). Memory: constraint j says
    ``sum over terms live at j of usage[s] <= cap[j]``; ``terms[v]`` lists
    ``(j0, j1, usage)`` covering constraints [j0, j1) (usage int64, min 0).
    """

    k: np.ndarray
    cost: list
    edges: list
    terms: list
    cap: np.ndarray
    rep_ids: np.ndarray           # core node -> reducer node id
    stats: dict = field(default_factory=dict)


class Reducer:
    """Applies the reductions and maps a core assignment back to the input."""

    def __init__(self, fp: FlatProblem, hard: bool = True):
        self.fp = fp
        self.hard = hard
        n = fp.num_nodes
        self.n0 = n
        big = np.inf if hard else _soft_big(fp)
        cost = fp.cost.astype(np.float64)
        cost[fp.cost >= INF_COST] = big
        self.cost = [cost[fp.node_off[i]:fp.node_off[i + 1]].copy() for i in range(n)]
        self.k = fp.ks.astype(np.int64).copy()
        self.alive = np.ones(n, dtype=bool)
        self.adj: list[dict[int, np.ndarray]] = [dict() for _ in range(n)]
        self.edge_work: list[tuple[int, int]] = []
        self.dom_dirty = np.ones(n, dtype=bool)   # dominance must be (re)checked
        ecost = fp.edge_cost.astype(np.float64)
        ecost[fp.edge_cost >= INF_COST] = big
        ea, eb, eo, ks = fp.edge_a, fp.edge_b, fp.edge_off, fp.ks
        for e in range(fp.num_edges):
            a, b = int(ea[e]), int(eb[e])
            m = ecost[eo[e]:eo[e + 1]].reshape(ks[a], ks[b])
            if a == b:
                self.cost[a] = self.cost[a] + np.diagonal(m)
            else:
                self._add_edge(a, b, m)
        self.limit = fp.usage_limit
        iv = fp.intervals
        self.terms: list[list] = [[] for _ in range(n)]
        usage = fp.usage
        if self.limit is not None:
            for i in range(n):
                lo, hi = int(iv[i, 0]), int(iv[i, 1])
                if lo < hi:
                    u = usage[fp.node_off[i]:fp.node_off[i + 1]]
                    self.terms[i].append((lo, hi, u.copy()))
        self.base: list[tuple[int, int, int]] = []   # constant usage (lo, hi, amount)
        # reconstruction: original node o takes strategy tab[o][s[rep[o]]]
        self.rep = np.arange(n)
        self.tab = [np.arange(int(k)) for k in self.k]
        self.members = [[i] for i in range(n)]
        self.records: list[list] = []        # [v, p, q, T] degree-2 eliminations
        self.dependents: list[set[int]] = [set() for _ in range(n)]
        self.node_work: list[int] = list(range(n))
        self.relevant: np.ndarray | None = None    # per node: has a memory-relevant term
        self.counts = dict(fixed=0, merged=0, leaf=0, deg2=0, dominated=0, isolated=0)
        self.deadline: float | None = None

    # ----- primitive edits -------------------------------------------------
    def _add_edge(self, a: int, b: int, m: np.ndarray) -> None:
        self.dom_dirty[a] = self.dom_dirty[b] = True
        old = self.adj[a].get(b)
        if old is not None:
            m = old + m
        self.adj[a][b] = m
        self.adj[b][a] = m.T
        self.edge_work.append((a, b))

    def _del_edge(self, a: int, b: int) -> None:
        self.dom_dirty[a] = self.dom_dirty[b] = True
        del self.adj[a][b]
        del self.adj[b][a]

    def _restrict(self, v: int, keep: np.ndarray) -> None:
        """Keep only strategies ``keep`` (indices) of node v."""
        self.cost[v] = self.cost[v][keep]
        for u, m in list(self.adj[v].items()):
            self._set(v, u, m[keep])
            self.edge_work.append((v, u))
        self.terms[v] = [(lo, hi, u[keep]) for lo, hi, u in self.terms[v]]
        for o in self.members[v]:
            self.tab[o] = self.tab[o][keep]
        for r in self.dependents[v]:
            rec = self.records[r]
            if rec[1] == v:
                rec[3] = rec[3][keep, :]
            if rec[2] == v:
                rec[3] = rec[3][:, keep]
        self.k[v] = len(keep)
        self.node_work.append(v)

    def _set(self, a: int, b: int, m: np.ndarray) -> None:
        self.dom_dirty[a] = self.dom_dirty[b] = True
        self.adj[a][b] = m
        self.adj[b][a] = m.T

    def _absorb(self, v: int, into: int, f: np.ndarray) -> None:
        """Node v's strategy becomes f[strategy of `into`]: move its members and references."""
        for o in self.members[v]:
            self.tab[o] = self.tab[o][f]
            self.rep[o] = into
        self.members[into].extend(self.members[v])
        self.members[v] = []
        for r in self.dependents[v]:
            rec = self.records[r]
            if rec[1] == v:
                rec[1], rec[3] = into, rec[3][f, :]
            if rec[2] == v:
                rec[2], rec[3] = into, rec[3][:, f]
            self.dependents[into].add(r)
        self.dependents[v] = set()
        self.alive[v] = False

    def _fix(self, v: int) -> None:
        """Node with a single strategy: fold its edges into the neighbours."""
        for u, m in list(self.adj[v].items()):
            self.cost[u] = self.cost[u] + m[0]
            self._del_edge(v, u)
            self.node_work.append(u)
        for lo, hi, u in self.terms[v]:
            self.base.append((lo, hi, int(u[0])))
        self.terms[v] = []
        self.alive[v] = False
        self.counts["fixed"] += 1

    def _merge(self, b: int, a: int, f: np.ndarray) -> None:
        """b follows a: b's strategy is f[s_a]; fold b into a."""
        m = self.adj[a][b]
        idx = np.arange(len(f))
        self.cost[a] = self.cost[a] + self.cost[b][f] + m[idx, f]
        self._del_edge(a, b)
        for c, mbc in list(self.adj[b].items()):
            self._del_edge(b, c)
            self._add_edge(a, c, mbc[f])
        self.terms[a].extend((lo, hi, u[f]) for lo, hi, u in self.terms[b])
        self.terms[b] = []
        self._absorb(b, a, f)
        self.node_work.append(a)
        self.counts["merged"] += 1

    # ----- the reductions --------------------------------------------------
    def _check_node(self, v: int) -> None:
        """Drop forbidden strategies; fix a node left with one strategy."""
        if not self.alive[v]:
            return
        ok = np.isfinite(self.cost[v])
        if not ok.all():
            if not ok.any():
                raise Infeasible(f"node {v}: every strategy is forbidden")
            self._restrict(v, np.nonzero(ok)[0])
        if self.k[v] == 1:
            self._fix(v)

    def _check_edge(self, a: int, b: int) -> None:
        """Arc consistency, followers and separable (trivial) edges on edge (a, b)."""
        m = self.adj[a].get(b)
        if m is None:
            return
        fin = np.isfinite(m)
        if not fin.all():
            rows, cols = fin.any(axis=1), fin.any(axis=0)
            if not rows.all() or not cols.all():
                if not rows.any():
                    raise Infeasible(f"edge ({a}, {b}): every strategy pair is forbidden")
                if not rows.all():
                    self._restrict(a, np.nonzero(rows)[0])
                if not cols.all():
                    self._restrict(b, np.nonzero(cols)[0])
                self.node_work.extend((a, b))
                self.edge_work.append((a, b))
                return
            if self.k[a] == 1 or self.k[b] == 1:
                self.node_work.extend((a, b))
                return
            row_one = (fin.sum(axis=1) == 1).all()
            col_one = (fin.sum(axis=0) == 1).all()
            if row_one and col_one:      # bijection: move the smaller adjacency
                if len(self.adj[b]) > len(self.adj[a]):
                    self._merge(a, b, np.argmax(fin.T, axis=1))
                else:
                    self._merge(b, a, np.argmax(fin, axis=1))
            elif row_one:
                self._merge(b, a, np.argmax(fin, axis=1))
            elif col_one:
                self._merge(a, b, np.argmax(fin.T, axis=1))
            return
        r = m[:, :1]
        cc = m[:1, :] - m[0, 0]
        if np.array_equal(m, r + cc):       # separable: fold into the node costs
            self.cost[a] = self.cost[a] + r[:, 0]
            self.cost[b] = self.cost[b] + cc[0]
            self._del_edge(a, b)

    def _run_local(self) -> None:
        steps = 0
        while self.node_work or self.edge_work:
            while self.node_work:
                self._check_node(self.node_work.pop())
            if self.edge_work:
                a, b = self.edge_work.pop()
                if self.alive[a] and self.alive[b]:
                    self._check_edge(a, b)
            steps += 1
            if steps % 2048 == 0:
                self._check_deadline()

    def _check_deadline(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise ReductionTimeout("reduction ran out of time")

    def _binding(self) -> None:
        """Mark memory-relevant terms; drop the others into the base load."""
        n = self.n0
        self.relevant = np.zeros(n, dtype=bool)
        if self.limit is None:
            for v in range(n):
                self.terms[v] = []
            return
        # normalise: constant part of every term into the base
        for v in np.nonzero(self.alive)[0]:
            new = []
            for lo, hi, u in self.terms[v]:
                mn = int(u.min())
                if mn:
                    self.base.append((lo, hi, mn))
                    u = u - mn
                if u.max() > 0:
                    new.append((lo, hi, u))
            self.terms[v] = new
        lo_l, hi_l, mx_l = [], [], []
        for v in np.nonzero(self.alive)[0]:
            for lo, hi, u in self.terms[v]:
                lo_l.append(lo)
                hi_l.append(hi)
                mx_l.append(int(u.max()))
        blo = [b[0] for b in self.base]
        bhi = [b[1] for b in self.base]
        bam = [b[2] for b in self.base]
        times = np.unique(np.array(lo_l + hi_l + blo + bhi, dtype=np.int64))
        if times.size == 0:
            return
        tcount = times.size
        base = np.zeros(tcount + 1, dtype=np.int64)
        if blo:
            np.add.at(base, np.searchsorted(times, blo), bam)
            np.subtract.at(base, np.searchsorted(times, bhi), bam)
        base = np.cumsum(base)[:-1]
        mx = np.zeros(tcount + 1, dtype=np.int64)
        tlo = np.searchsorted(times, np.array(lo_l, dtype=np.int64))
        thi = np.searchsorted(times, np.array(hi_l, dtype=np.int64))
        if lo_l:
            np.add.at(mx, tlo, mx_l)
            np.subtract.at(mx, thi, mx_l)
        mx = np.cumsum(mx)[:-1]
        if int(base.max()) > self.limit:
            t = int(np.argmax(base))
            raise Infeasible(f"usage limit {self.limit} cannot be met: forced usage {int(base[t])} "
                             f"at time {int(times[t])}")
        bind = (base + mx) > self.limit
        self.times, self.base_load, self.bind = times, base, bind
        pref = np.concatenate([[0], np.cumsum(bind)])
        rel = (pref[thi] - pref[tlo]) > 0 if lo_l else np.zeros(0, dtype=bool)
        j = 0
        for v in np.nonzero(self.alive)[0]:
            kept = []
            for t in self.terms[v]:
                if rel[j]:
                    kept.append(t)
                j += 1
            if len(kept) < len(self.terms[v]):
                self.dom_dirty[v] = True
            self.terms[v] = kept
            if kept:
                self.relevant[v] = True

    def _dominance(self, v: int) -> bool:
        k = int(self.k[v])
        if k < 2:
            return False
        cols = [self.cost[v][:, None]]
        cols.extend(u[:, None].astype(np.float64) for _, _, u in self.terms[v])
        cols.extend(self.adj[v].values())
        f = np.hstack(cols)
        # better[t, s]: t <= s everywhere, and not equal unless t < s (one of equal rows stays).
        # Columns are compared a block at a time and pairs that fail drop out: a hub's rows
        # span thousands of columns, but most pairs differ within the first few.
        better = ~np.eye(k, dtype=bool)
        ge = np.ones((k, k), dtype=bool)               # ge[t, s]: t >= s on the columns seen
        c0, block, most = 0, 16, max(1, _DOMINANCE_MAX_ELEMS // (k * k))
        while c0 < f.shape[1]:
            fb = f[:, c0:c0 + block]
            better &= (fb[:, None, :] <= fb[None, :, :]).all(axis=2)
            if not better.any():
                return False
            ge &= (fb[:, None, :] >= fb[None, :, :]).all(axis=2)
            c0, block = c0 + block, min(4 * block, most)
        better &= ~ge | np.tri(k, k, -1, dtype=bool).T
        dominated = better.any(axis=0)
        if dominated.any():
            self._restrict(v, np.nonzero(~dominated)[0])
            self.counts["dominated"] += int(dominated.sum())
            return True
        return False

    def _eliminate(self, v: int) -> bool:
        """Memory-free node of degree <= 2: eliminate it exactly."""
        deg = len(self.adj[v])
        c = self.cost[v]
        if deg == 0:
            s = int(np.argmin(c))
            self._restrict(v, np.array([s]))
            self._fix(v)
            self.counts["isolated"] += 1
            return True
        if deg == 1:
            (p, m), = self.adj[v].items()
            tot = c[:, None] + m
            best = np.argmin(tot, axis=0)
            self.cost[p] = self.cost[p] + tot[best, np.arange(tot.shape[1])]
            self._del_edge(v, p)
            self._absorb(v, p, best)
            self.node_work.append(p)
            self.counts["leaf"] += 1
            return True
        if deg == 2:
            (p, mp), (q, mq) = self.adj[v].items()
            if len(c) * mp.shape[1] * mq.shape[1] > _DEG2_MAX_ELEMS:
                return False
            tot = c[:, None, None] + mp[:, :, None] + mq[:, None, :]
            best = np.argmin(tot, axis=0)
            newm = np.take_along_axis(tot, best[None], axis=0)[0]
            self._del_edge(v, p)
            self._del_edge(v, q)
            self._add_edge(p, q, newm)
            r = len(self.records)
            self.records.append([v, p, q, best])
            self.dependents[p].add(r)
            self.dependents[q].add(r)
            self.alive[v] = False
            self.counts["deg2"] += 1
            return True
        return False

    def run(self, max_rounds: int = 8, deadline: float | None = None) -> None:
        """Apply the reductions to a fixpoint (or ``max_rounds``).

        Raises ReductionTimeout past ``deadline`` (time.monotonic()).
        """
        self.deadline = deadline
        check = self._check_deadline
        self._run_local()
        for _ in range(max_rounds):
            check()
            self._binding()
            changed = False
            for i, v in enumerate(np.nonzero(self.alive & self.dom_dirty)[0]):
                v = int(v)
                if self.alive[v]:
                    self.dom_dirty[v] = False
                    if self._dominance(v):
                        changed = True
                if i % 256 == 0:
                    check()
            self._run_local()
            check()
            for v in np.nonzero(self.alive)[0]:
                v = int(v)
                if self.alive[v] and not self.relevant[v] and self._eliminate(v):
                    changed = True
                    self._run_local()
            if not changed:
                break
        self._binding()

    # ----- results ---------------------------------------------------------
    def core(self) -> Core:
        ids = np.nonzero(self.alive)[0]
        pos = -np.ones(self.n0, dtype=np.int64)
        pos[ids] = np.arange(len(ids))
        edges = []
        for v in ids:
            for u, m in self.adj[v].items():
                if u > v:
                    edges.append((int(pos[v]), int(pos[u]), m))
        cap, terms = self._constraints(ids)
        core = Core(k=self.k[ids].copy(), cost=[self.cost[v] for v in ids], edges=edges,
                    terms=terms, cap=cap, rep_ids=ids)
        core.stats = dict(self.counts, core_nodes=len(ids), core_edges=len(edges),
                          core_strategies=int(self.k[ids].sum()),
                          memory_nodes=int(sum(1 for t in terms if t)),
                          memory_constraints=len(cap))
        return core

    def _constraints(self, ids):
        """Constraint rows: one per run of binding time points with the same live terms."""
        terms_out = [[] for _ in ids]
        if self.limit is None or not hasattr(self, "times") or not self.bind.any():
            return np.zeros(0, dtype=np.int64), terms_out
        times, bind = self.times, self.bind
        # segment boundaries: where any relevant term starts or ends
        bnd = []
        for v in ids:
            for lo, hi, _ in self.terms[v]:
                bnd.append(lo)
                bnd.append(hi)
        cuts = np.unique(np.searchsorted(times, np.array(bnd, dtype=np.int64)))
        seg_of_t = np.searchsorted(cuts, np.arange(times.size), side="right")
        slack = self.limit - self.base_load
        # per segment: smallest slack over its binding time points
        nseg = len(cuts) + 1
        seg_slack = np.full(nseg, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(seg_slack, seg_of_t[bind], slack[bind])
        active = seg_slack < np.iinfo(np.int64).max
        segs = np.nonzero(active)[0]
        # term -> covered segment range [seg(lo), seg(hi)); map to rows
        first_row = np.cumsum(active) - active.astype(np.int64)  # rows before seg i
        first_row = np.concatenate([first_row, [first_row[-1] + active[-1]]])
        for j, v in enumerate(ids):
            for lo, hi, u in self.terms[v]:
                s0 = int(seg_of_t[np.searchsorted(times, lo)])
                s1 = int(seg_of_t[np.searchsorted(times, hi)]) if hi <= times[-1] else nseg
                r0, r1 = int(first_row[s0]), int(first_row[s1])
                if r1 > r0:
                    terms_out[j].append((r0, r1, u.astype(np.int64)))
        return seg_slack[segs], terms_out

    def project(self, assignment) -> np.ndarray:
        """A core assignment that picks ``assignment``'s strategy wherever the core still offers
        it (a warm start; where a reduction removed that strategy, the core node's first one)."""
        ids = np.nonzero(self.alive)[0]
        x = np.zeros(len(ids), dtype=np.int64)
        full = np.asarray(assignment, dtype=np.int64)
        for i, v in enumerate(ids):
            hit = np.nonzero(self.tab[v] == full[v])[0]
            if hit.size:
                x[i] = hit[0]
        return x

    def expand(self, core_assignment) -> np.ndarray:
        """Input-problem assignment from a core assignment."""
        s = np.zeros(self.n0, dtype=np.int64)
        ids = np.nonzero(self.alive)[0]
        s[ids] = np.asarray(core_assignment, dtype=np.int64)
        for v, p, q, t in reversed(self.records):
            s[v] = t[s[p], s[q]]
        out = np.empty(self.n0, dtype=np.int64)
        for o in range(self.n0):
            out[o] = self.tab[o][s[self.rep[o]]]
        return out

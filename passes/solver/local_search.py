"""Moves on the core: feasible starts, tree block moves, repair of memory overloads.

* ``least_memory`` + ``greedy_sweeps``: a feasible start in well under a second.
  The least-memory assignment meets the limit whenever anything does (usage is
  separable per node), and single-node moves that keep every row within
  capacity keep it feasible.
* ``tree_move``: exact minimisation over an induced forest of the graph (all
  other nodes fixed) by dynamic programming; the block is large (most of the
  core), so this escapes many single-node minima. Extra per-strategy costs
  (Lagrangian memory prices) can be added.
* ``repair``: turns an assignment that overloads some rows into a feasible one,
  each step taking the move with the least cost increase per byte removed from
  the worst row.
* ``feasible_tree_move``: a tree move whose changed parts (connected components
  of changed nodes, whose costs add up independently) are accepted one by one
  when they lower the cost and keep memory within the limit.
"""

from __future__ import annotations

import time

import numpy as np

from .core import CoreModel


def least_memory(cm: CoreModel) -> np.ndarray:
    """Per node, the strategy with the smallest peak (then total) usage, then cost."""
    x = np.zeros(cm.m, dtype=np.int64)
    for v in range(cm.m):
        P = cm.prof[v]
        if P is None:
            x[v] = int(np.argmin(cm.cost[v]))
            continue
        x[v] = int(np.lexsort((cm.cost[v], P.sum(axis=1), P.max(axis=1)))[0])
    return x


def greedy_sweeps(cm: CoreModel, x: np.ndarray, load: np.ndarray, deadline: float,
                  rng: np.random.Generator, max_sweeps: int = 20) -> int:
    """Single-node moves to the cheapest strategy that fits in memory; in place."""
    moves = 0
    order = np.arange(cm.m)
    for _ in range(max_sweeps):
        rng.shuffle(order)
        changed = 0
        for v in order:
            if cm.k[v] < 2:
                continue
            lc = cm.local_cost(v, x)
            if cm.has_mem[v]:
                lc = np.where(cm.fits(v, x, load), lc, np.inf)
            s = int(np.argmin(lc))
            cur = int(x[v])
            if s != cur and lc[s] < lc[cur]:
                cm.add_node_load(load, v, cur, s)
                x[v] = s
                changed += 1
            if time.monotonic() > deadline:
                return moves + changed
        moves += changed
        if not changed:
            break
    return moves


def induced_forest(cm: CoreModel, rng: np.random.Generator) -> np.ndarray:
    """A random maximal set of nodes whose induced subgraph has no cycle."""
    m = cm.m
    parent = np.arange(m)

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    inb = np.zeros(m, dtype=bool)
    for v in rng.permutation(m):
        roots = []
        for u in cm.nbr_nodes[v]:
            if inb[u]:
                r = find(u)
                if r in roots:
                    break
                roots.append(r)
        else:
            inb[v] = True
            for r in roots:
                parent[r] = v
    return inb


def tree_move(cm: CoreModel, x: np.ndarray, inb: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
    """Optimal strategies for the nodes of forest ``inb`` given the others; returns a new x.

    ``extra`` (flat, per strategy) is added to the node costs.
    """
    newx = x.copy()
    visited = np.zeros(cm.m, dtype=bool)
    off = cm.off
    for root in np.nonzero(inb)[0]:
        if visited[root]:
            continue
        order = [int(root)]
        par = [None]
        visited[root] = True
        i = 0
        while i < len(order):
            v = order[i]
            i += 1
            for u, mat in zip(cm.nbr_nodes[v], cm.nbr_mats[v]):
                if inb[u] and not visited[u]:
                    visited[u] = True
                    order.append(int(u))
                    par.append((v, mat))
        un = {}
        for v in order:
            c = cm.cost[v].copy()
            if extra is not None:
                c += extra[off[v]:off[v + 1]]
            for u, mat in zip(cm.nbr_nodes[v], cm.nbr_mats[v]):
                if not inb[u]:
                    c += mat[:, x[u]]
            un[v] = c
        arg = {}
        for idx in range(len(order) - 1, 0, -1):
            v = order[idx]
            p, mat = par[idx]                  # mat: rows = p, cols = v
            tot = un[v][None, :] + mat
            a = np.argmin(tot, axis=1)
            arg[v] = a
            un[p] = un[p] + tot[np.arange(tot.shape[0]), a]
        newx[root] = int(np.argmin(un[root]))
        for idx in range(1, len(order)):
            v = order[idx]
            newx[v] = arg[v][newx[par[idx][0]]]
    return newx


def changed_components(cm: CoreModel, changed: np.ndarray) -> list[list[int]]:
    """Connected components of the changed nodes (their cost changes add up)."""
    ch = np.zeros(cm.m, dtype=bool)
    ch[changed] = True
    seen = np.zeros(cm.m, dtype=bool)
    comps = []
    for v in changed:
        if seen[v]:
            continue
        comp = [int(v)]
        seen[v] = True
        i = 0
        while i < len(comp):
            a = comp[i]
            i += 1
            for u in cm.nbr_nodes[a]:
                if ch[u] and not seen[u]:
                    seen[u] = True
                    comp.append(int(u))
        comps.append(comp)
    return comps


def component_delta(cm: CoreModel, comp: list[int], x: np.ndarray, xn: np.ndarray) -> float:
    inc = set(comp)
    d = 0.0
    for v in comp:
        d += cm.cost[v][xn[v]] - cm.cost[v][x[v]]
        for u, mat in zip(cm.nbr_nodes[v], cm.nbr_mats[v]):
            u = int(u)
            if u in inc:
                if u > v:
                    d += mat[xn[v], xn[u]] - mat[x[v], x[u]]
            else:
                d += mat[xn[v], x[u]] - mat[x[v], x[u]]
    return float(d)


def apply_components(cm: CoreModel, x: np.ndarray, load: np.ndarray, xn: np.ndarray) -> float:
    """Accept the improving, memory-feasible changed components of ``xn``; in place.

    Returns the cost change (<= 0).
    """
    changed = np.nonzero(xn != x)[0]
    if changed.size == 0:
        return 0.0
    comps = changed_components(cm, changed)
    scored = [(component_delta(cm, c, x, xn), c) for c in comps]
    scored.sort(key=lambda t: t[0])
    total = 0.0
    for d, comp in scored:
        if not d < 0:
            break
        trial = load.copy()
        for v in comp:
            cm.add_node_load(trial, v, int(x[v]), int(xn[v]))
        lo = min((cm.span[v, 0] for v in comp if cm.has_mem[v]), default=0)
        hi = max((cm.span[v, 1] for v in comp if cm.has_mem[v]), default=0)
        if hi > lo and (trial[lo:hi] > cm.cap[lo:hi]).any():
            continue
        load[:] = trial
        x[comp] = xn[comp]
        total += d
    return total


def repair(cm: CoreModel, x: np.ndarray, load: np.ndarray, deadline: float) -> bool:
    """Remove memory overloads in place, cheapest cost per freed byte first.

    Works on the most overloaded row: every node live there offers its best move
    (least cost increase per byte freed at that row, creating no overload
    elsewhere); moves are taken in that order until the row fits. Returns True
    when every row is within capacity.
    """
    over = load - cm.cap
    lc_cache: dict[int, np.ndarray] = {}
    stuck: set[int] = set()
    while True:
        bad = over > 0
        if not bad.any():
            return True
        if time.monotonic() > deadline:
            return False
        masked = np.where(bad, over, -1)
        if stuck:
            masked[list(stuck)] = -1
        r = int(np.argmax(masked))
        if masked[r] <= 0:
            return False
        offers = []
        for v in np.nonzero(cm.has_mem & (cm.span[:, 0] <= r) & (r < cm.span[:, 1]))[0]:
            P = cm.prof[v]
            j = int(np.searchsorted(cm.prof_bp[v], r, side="right")) - 1
            cur = int(x[v])
            red = P[cur, j] - P[:, j]
            if red.max() <= 0:
                continue
            lc = lc_cache.get(v)
            if lc is None:
                lc = lc_cache[v] = cm.local_cost(v, x)
            fin = np.isfinite(lc)
            ok = (red > 0) & fin
            if not ok.any():
                continue
            base = lc[cur] if fin[cur] else lc[fin].max()
            ratio = np.where(ok, (np.where(fin, lc, 0.0) - base) / np.maximum(red, 1), np.inf)
            s = int(np.argmin(ratio))
            offers.append((float(ratio[s]), int(v), s))
        offers.sort()
        moved: set[int] = set()
        touched: set[int] = set()
        for _, v, s in offers:
            if over[r] <= 0 or time.monotonic() > deadline:
                break
            if v in touched:          # a neighbour moved: its offer is stale
                continue
            P = cm.prof[v]
            cur = int(x[v])
            room = np.maximum(cm.seg_slack(v, load), 0) + P[cur]
            if not (P[s] <= room).all():
                continue
            lo, hi = cm.span[v]
            cm.add_node_load(load, v, cur, s)
            over[lo:hi] = load[lo:hi] - cm.cap[lo:hi]
            x[v] = s
            moved.add(v)
            touched.add(v)
            lc_cache.pop(v, None)
            for u in cm.nbr_nodes[v]:
                touched.add(int(u))
                lc_cache.pop(int(u), None)
        if moved:
            stuck.clear()
        else:
            stuck.add(r)

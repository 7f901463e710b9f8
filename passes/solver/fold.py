"""Fold identical components: solve one copy of each repeated layer.

A stack of identical layers hangs off a few hub nodes (the residual stream's layout is one
choice shared by every layer, as is its gradient's). Without the hubs the core falls apart
into one component per layer (or layer half). Components that are identical -- same
strategies, costs and edges among themselves and to the hubs -- make the same best choice
for any labels of the hubs, and each adds the same cost. So the problem with one copy per
class, its costs multiplied by the number of copies, has the same optimum value, and its
solution repeated over the copies is optimal for the core; any lower bound of the folded
problem bounds the core too. Exact only without memory rows (they would couple the copies),
so cores with memory constraints are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .reduce import Core

HUB_MIN_DEGREE = 16
"""A node is a hub when its degree is at least this and at least `HUB_DEGREE_RATIO` x the mean."""
HUB_DEGREE_RATIO = 4.0
MAX_HUBS = 8
MIN_SAVING = 0.25
"""Fold only when it removes at least this share of the core's nodes."""


@dataclass
class Fold:
    """A folded core and the map back: core node v takes folded node ``owner[v]``'s strategy."""

    core: Core
    owner: np.ndarray            # core node -> folded node
    reps: np.ndarray             # folded node -> the core node it is (a representative)
    stats: dict

    def expand(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.int64)[self.owner]

    def project(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.int64)[self.reps]


def fold_identical(core: Core) -> Fold | None:
    """The folded core, or None when the core has memory rows or no repeated components."""
    m = len(core.k)
    if m == 0 or len(core.cap) or any(core.terms[v] for v in range(m)) or not core.edges:
        return None
    ea = np.array([e[0] for e in core.edges], dtype=np.int64)
    eb = np.array([e[1] for e in core.edges], dtype=np.int64)
    deg = np.bincount(ea, minlength=m) + np.bincount(eb, minlength=m)
    threshold = max(HUB_MIN_DEGREE, HUB_DEGREE_RATIO * deg.mean())
    hubs = np.argsort(-deg, kind="stable")[:MAX_HUBS]
    hubs = np.sort(hubs[deg[hubs] >= threshold])
    is_hub = np.zeros(m, dtype=bool)
    is_hub[hubs] = True
    inner = ~is_hub[ea] & ~is_hub[eb]
    label = np.where(is_hub, -1, _components(m, ea[inner], eb[inner]))

    # a component's signature: its strategies, costs and edges in node order, edges to hubs by hub
    comps: dict[int, list[int]] = {}
    for v in np.nonzero(~is_hub)[0].tolist():
        comps.setdefault(int(label[v]), []).append(v)
    pos = np.zeros(m, dtype=np.int64)
    for nodes in comps.values():
        pos[nodes] = np.arange(len(nodes))
    parts: dict[int, list] = {c: [] for c in comps}
    for e, (a, b, mat) in enumerate(core.edges):
        if is_hub[a] and is_hub[b]:
            continue
        if is_hub[a]:       # oriented component node first
            a, b, mat = b, a, mat.T
        c = int(label[a])
        other = ("hub", int(b)) if is_hub[b] else ("in", int(pos[b]))
        parts[c].append((int(pos[a]), other, np.ascontiguousarray(mat).tobytes()))
    classes: dict[bytes, list[int]] = {}
    for c, nodes in comps.items():
        edges = sorted(parts[c], key=lambda t: t[:2])
        key = b"".join([repr(([int(core.k[v]) for v in nodes], [t[:2] for t in edges])).encode()]
                       + [t[2] for t in edges] + [np.ascontiguousarray(core.cost[v]).tobytes() for v in nodes])
        classes.setdefault(key, []).append(c)
    repeated = [cs for cs in classes.values() if len(cs) > 1]
    folded_away = sum(len(comps[c]) * (len(cs) - 1) for cs in repeated for c in cs[:1])
    if folded_away < MIN_SAVING * m:
        return None

    # keep hubs, and one component per class (its costs times the copies); copies follow it
    copies = np.ones(m, dtype=np.int64)
    owner = np.arange(m)
    for cs in repeated:
        first = comps[cs[0]]
        copies[first] = len(cs)
        for c in cs[1:]:
            owner[comps[c]] = first
    keep = np.nonzero(owner == np.arange(m))[0]
    new_id = -np.ones(m, dtype=np.int64)
    new_id[keep] = np.arange(len(keep))
    edges = []
    for a, b, mat in core.edges:
        if owner[a] != a or owner[b] != b:
            continue
        n = copies[b] if is_hub[a] else copies[a]       # an edge inside a kept copy, or to a hub
        edges.append((int(new_id[a]), int(new_id[b]), mat * n if n > 1 else mat))
    cost = [core.cost[v] * copies[v] if copies[v] > 1 else core.cost[v] for v in keep.tolist()]
    stats = {"hubs": len(hubs), "components": len(comps), "classes": len(classes),
             "folded_nodes": int(m - len(keep)), "nodes": int(len(keep))}
    small = Core(k=core.k[keep].copy(), cost=cost, edges=edges, terms=[[] for _ in keep],
                 cap=core.cap, rep_ids=core.rep_ids[keep], stats=dict(core.stats, fold=stats))
    return Fold(small, new_id[owner], keep, stats)


def _components(m: int, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Connected component label per node (union-find; scipy's csgraph costs 0.1 s to import)."""
    parent = list(range(m))

    def root(v):
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    for a, b in zip(ea.tolist(), eb.tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(v) for v in range(m)], dtype=np.int64)

"""Large-neighbourhood search: re-solve one region of the core exactly, by ILP.

A neighbourhood is a connected set of core nodes grown breadth-first from a
seed until the sub-ILP reaches a column budget; everything outside stays
fixed, its edges and memory folded into the sub-problem (``SubILP``). Half the
seeds are nodes live at the tightest memory rows, where trading memory between
nodes is what pays. The sub-problem starts from the current solution, so its
answer is never worse and always feasible. The budget adapts: it grows while
sub-problems solve to optimality quickly and shrinks when they time out.
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from .core import CoreModel
from .incumbent import Incumbent
from .subilp import SubILP


class LNS:
    def __init__(self, cm: CoreModel, inc: Incumbent, *, seed: int = 0, budget: int = 8000,
                 sub_time: float = 2.0, max_cands: int = 12):
        self.cm = cm
        self.inc = inc
        self.rng = np.random.default_rng(seed + 7919)
        self.budget = budget
        self.sub_time = sub_time
        self.max_cands = max_cands
        self.iters = 0
        self.accepted = 0
        self.optimal_subs = 0

    def candidates(self, v: int, x: np.ndarray) -> np.ndarray:
        """Strategies of v worth offering the sub-ILP: all when few, else the current one,
        the cheapest given the neighbours, the cheapest if the neighbours could adapt, and
        the least-memory one."""
        cm = self.cm
        k = int(cm.k[v])
        if k <= self.max_cands:
            return np.arange(k)
        lc = cm.local_cost(v, x)
        opt = cm.cost[v].copy()
        for mat in cm.nbr_mats[v]:
            opt += mat.min(axis=1)
        m = self.max_cands // 2
        pick = {int(x[v])}
        pick.update(np.argsort(lc, kind="stable")[:m].tolist())
        pick.update(np.argsort(opt, kind="stable")[:m].tolist())
        if cm.prof[v] is not None:
            P = cm.prof[v]
            pick.add(int(np.lexsort((cm.cost[v], P.sum(axis=1), P.max(axis=1)))[0]))
        return np.array(sorted(pick), dtype=np.int64)

    def neighbourhood(self, seed: int, x: np.ndarray):
        """Breadth-first region around ``seed`` whose ILP has about ``budget`` columns;
        returns the nodes and their candidate strategies."""
        cm = self.cm
        seen = np.zeros(cm.m, dtype=bool)
        kc = np.zeros(cm.m, dtype=np.int64)        # candidate count of chosen nodes
        chosen, cands = [], {}
        size = 0
        q = deque([seed])
        seen[seed] = True
        while q:
            v = q.popleft()
            cv = self.candidates(v, x)
            add = len(cv)
            for u in cm.nbr_nodes[v]:
                if kc[u]:
                    add += len(cv) * int(kc[u])
            if size + add > self.budget and chosen:
                continue
            chosen.append(v)
            cands[v] = cv
            kc[v] = len(cv)
            size += add
            nb = [int(u) for u in cm.nbr_nodes[v] if not seen[u]]
            self.rng.shuffle(nb)
            for u in nb:
                seen[u] = True
                q.append(u)
        free = np.array(sorted(chosen), dtype=np.int64)
        return free, [cands[int(v)] for v in free]

    def _seed(self, load: np.ndarray) -> int:
        cm = self.cm
        if cm.T and self.iters % 2 == 0:
            slack = cm.cap - load
            tight = np.argsort(slack)[:max(1, cm.T // 50)]
            r = int(self.rng.choice(tight))
            cand = np.nonzero(cm.has_mem & (cm.span[:, 0] <= r) & (r < cm.span[:, 1]))[0]
            if cand.size:
                return int(self.rng.choice(cand))
        return int(self.rng.integers(cm.m))

    def run(self, deadline: float) -> None:
        cm = self.cm
        x = self.inc.x.copy()
        load = cm.load_of(x)
        while True:
            left = deadline - time.monotonic()
            if left < 0.3 or self.inc.stop_requested():
                return
            free, cands = self.neighbourhood(self._seed(load), x)
            sub = SubILP(cm, free, x, load, cands)
            cur = x[free]
            cur_obj = sub.objective_of(cur)
            tl = min(self.sub_time, left - 0.1)
            t0 = time.monotonic()
            res = sub.solve(tl, start=cur, seed=int(self.rng.integers(1 << 30)))
            dt = time.monotonic() - t0
            self.iters += 1
            if res.optimal:
                self.optimal_subs += 1
                if dt < 0.3 * self.sub_time:
                    self.budget = int(self.budget * 1.2)
            elif dt >= 0.9 * tl:
                self.budget = max(500, int(self.budget * 0.7))
            if res.x is not None and res.objective < cur_obj - 0.5:
                for v, s_old, s_new in zip(free, cur, res.x):
                    if s_old != s_new:
                        cm.add_node_load(load, int(v), int(s_old), int(s_new))
                x[free] = res.x
                self.accepted += 1
                self.inc.offer(x, None, load, "lns")

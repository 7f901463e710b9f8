"""Solutions kept across ``solve`` calls: the same problem again, or the same graph re-priced.

The pipeline planner solves the intra-operator problem of many (layer range x
sub-mesh) candidates, and the compiler re-solves a graph when α-β or the memory
budget change. A ``SolveCache`` passed to ``solve(cache=...)`` remembers, per
graph (strategy counts, edges, live intervals), the last plan: the identical
problem solved to proven optimality returns it at once; the same graph with
other costs or limit starts from it (its cost is an upper bound from the first
moment). The cache is an explicit object, never module state, so identical
calls without one stay independent.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from .problem import FlatProblem


def _digest(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.data)
    return h.hexdigest()


def graph_key(fp: FlatProblem) -> str:
    """Identifies the graph: strategy counts, edges, live intervals."""
    return _digest(fp.ks, fp.edge_a, fp.edge_b, fp.intervals)


def problem_key(fp: FlatProblem) -> str:
    """Identifies the whole problem: the graph plus every cost, usage and the limit."""
    limit = None if fp.usage_limit is None else np.array([fp.usage_limit], dtype=np.int64)
    return _digest(fp.ks, fp.edge_a, fp.edge_b, fp.intervals, fp.cost, fp.usage, fp.edge_cost, limit)


@dataclass
class CachedPlan:
    problem_key: str
    assignment: np.ndarray
    cost: int
    optimal: bool


class SolveCache:
    """Last plan per graph (least recently used graphs dropped beyond ``max_graphs``)."""

    def __init__(self, max_graphs: int = 64):
        self.max_graphs = max_graphs
        self._plans: OrderedDict[str, CachedPlan] = OrderedDict()
        self.hits = 0          # identical problem, proven optimum returned
        self.warm_starts = 0   # same graph, plan used as a start

    def lookup(self, fp: FlatProblem) -> tuple[CachedPlan | None, bool]:
        """(plan of this graph or None, whether it is for this very problem)."""
        plan = self._plans.get(graph_key(fp))
        if plan is None:
            return None, False
        self._plans.move_to_end(graph_key(fp))
        return plan, plan.problem_key == problem_key(fp)

    def store(self, fp: FlatProblem, assignment: np.ndarray, cost: int, optimal: bool) -> None:
        key = graph_key(fp)
        self._plans[key] = CachedPlan(problem_key(fp), np.array(assignment, copy=True), cost, optimal)
        self._plans.move_to_end(key)
        while len(self._plans) > self.max_graphs:
            self._plans.popitem(last=False)

    def __len__(self) -> int:
        return len(self._plans)

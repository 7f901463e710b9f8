"""Exact scoring of an assignment, as the contest's reference evaluator does.

Costs are summed in Python integers (a few forbidden 10^18 entries overflow
int64); usage is checked over half-open live intervals. This is the ground
truth every solver result is reported with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import INF_COST, FlatProblem, ShardingProblem, flatten


@dataclass
class Evaluation:
    cost: int
    peak_usage: int
    feasible: bool
    num_forbidden: int = 0
    """How many chosen node/edge entries are forbidden (>= INF_COST)."""


def exact_sum(values: np.ndarray) -> int:
    """Exact sum of non-negative int64 values as a Python int (no int64 overflow)."""
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return 0
    hi = int(np.sum(v >> 32, dtype=np.int64))
    lo = int(np.sum(v & 0xFFFFFFFF, dtype=np.int64))
    return (hi << 32) + lo


def load_profile(intervals: np.ndarray, usage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times, load): load[j] is the summed usage on [times[j], times[j+1]).

    Only interval end points are kept as time points, so huge time values cost nothing.
    """
    lo, hi = intervals[:, 0], intervals[:, 1]
    live = lo < hi
    lo, hi, u = lo[live], hi[live], np.asarray(usage, dtype=np.int64)[live]
    if lo.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    times = np.unique(np.concatenate([lo, hi]))
    delta = np.zeros(times.size, dtype=object if exact_sum(u) >= 2**62 else np.int64)
    np.add.at(delta, np.searchsorted(times, lo), u)
    np.subtract.at(delta, np.searchsorted(times, hi), u)
    return times, np.cumsum(delta)


def check_assignment(problem: FlatProblem, assignment) -> np.ndarray:
    """Return the assignment as int64, or raise ValueError (wrong length, index out of range)."""
    s = np.asarray(assignment)
    n = problem.num_nodes
    if s.ndim != 1 or s.shape[0] != n:
        raise ValueError(f"assignment: expected {n} strategy indices (one per node), got shape {s.shape}")
    if s.size and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"assignment: expected integer strategy indices, got {s.dtype}")
    s = s.astype(np.int64, copy=False)
    bad = np.nonzero((s < 0) | (s >= problem.ks))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"assignment[{i}]: strategy {int(s[i])} out of range [0, {int(problem.ks[i])})")
    return s


def evaluate(problem: ShardingProblem | FlatProblem, assignment) -> Evaluation:
    """Total cost, peak usage and usage-limit feasibility of ``assignment`` (exact ints)."""
    fp = problem if isinstance(problem, FlatProblem) else flatten(problem)
    s = check_assignment(fp, assignment)
    node_vals = fp.cost[fp.node_off[:-1] + s]
    if fp.num_edges:
        idx = fp.edge_off[:-1] + s[fp.edge_a] * fp.ks[fp.edge_b] + s[fp.edge_b]
        edge_vals = fp.edge_cost[idx]
    else:
        edge_vals = np.zeros(0, dtype=np.int64)
    cost = exact_sum(node_vals) + exact_sum(edge_vals)
    forbidden = int(np.count_nonzero(node_vals >= INF_COST) + np.count_nonzero(edge_vals >= INF_COST))
    _, load = load_profile(fp.intervals, fp.usage[fp.node_off[:-1] + s])
    peak = int(load.max()) if load.size else 0
    feasible = fp.usage_limit is None or peak <= fp.usage_limit
    return Evaluation(cost=cost, peak_usage=peak, feasible=feasible, num_forbidden=forbidden)

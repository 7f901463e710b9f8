"""The anytime search for large cores.

One search = a feasible start (least memory + greedy moves, well under a
second; or a given start, e.g. the previous call's plan), then the Lagrangian
search (message passing + tree moves + repair) until the deadline, with the
last part of the time spent on exact ILP re-solves of neighbourhoods
(``lns.py``). ``portfolio.py`` runs several of them (different seeds) in
forked workers; every improvement goes to ``progress`` as it is found.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .core import CoreModel
from .ilp import ilp_size
from .incumbent import Incumbent
from .lagrangian import LagrangianSearch
from .lns import LNS
from .local_search import greedy_sweeps, least_memory, repair
from .subilp import SubILP

EXACT_CORE_MAX_COLUMNS = 20_000
"""A core this small is solved whole by one exact sub-ILP before any heuristic runs."""


@dataclass
class SearchResult:
    x: np.ndarray | None
    cost: float
    first_feasible: float | None      # seconds after t_start
    stats: dict = field(default_factory=dict)
    optimal: bool = False


def run_search(cm: CoreModel, t_start: float, deadline: float, seed: int = 0, progress=None,
               lns_fraction: float = 0.25, *, start: np.ndarray | None = None,
               stop=None, on_bound=None) -> SearchResult:
    """One complete anytime search on the core; returns the best feasible assignment.

    ``progress(source, cost, x)`` on every improvement; ``stop()`` True ends the search early
    (the caller holds a proven optimum); ``start``: a core assignment to begin from;
    ``on_bound(value)`` on every improved lower bound (from the Lagrangian dual).
    """
    rng = np.random.default_rng(seed)
    inc = Incumbent(cm, t_start, progress, stop, on_bound)
    if start is not None:
        inc.offer(np.asarray(start, dtype=np.int64), None, None, "warm start")
    x = least_memory(cm)
    load = cm.load_of(x)
    # merged nodes may have no strategy that is smallest on every row at once
    if not (load <= cm.cap).all() and not repair(cm, x, load, deadline):
        if inc.x is None:
            return SearchResult(None, np.inf, None, {"note": "no memory-feasible start found"})
        x = inc.x.copy()
        load = cm.load_of(x)
    inc.offer(x, None, load, "least-memory")
    greedy_sweeps(cm, x, load, min(deadline, time.monotonic() + 0.25 * (deadline - time.monotonic())),
                  rng)
    inc.offer(x, None, load, "greedy")
    if inc.x is not None and inc.cost < cm.cost_of(x):
        x = inc.x.copy()
    stats: dict = {}
    if ilp_size(cm) <= EXACT_CORE_MAX_COLUMNS and time.monotonic() < deadline - 0.05:
        sub = SubILP(cm, np.arange(cm.m), x, None)
        res = sub.solve(deadline - time.monotonic(), start=inc.x, seed=seed)
        if res.x is not None:
            inc.offer(res.x, None, None, "exact")
        if res.optimal:    # solved, or proven that nothing feasible exists
            stats["incumbent_updates"] = inc.updates
            return SearchResult(inc.x, inc.cost, inc.first_feasible, dict(stats, exact=True), True)
    lns_start = deadline - lns_fraction * max(0.0, deadline - time.monotonic())
    if time.monotonic() < lns_start and cm.E and not inc.stop_requested():
        # without memory rows the prices never move: more message passing per step, which
        # is what tightens the bound, and fewer tree moves on the same unaries
        lag = LagrangianSearch(cm, inc, rng) if cm.T else LagrangianSearch(cm, inc, rng, trws_iters=10,
                                                                            tree_passes=1)
        lag.run(lns_start)
        stats.update(lagrangian_iterations=lag.iters, repairs=lag.repairs)
    if time.monotonic() < deadline - 0.2 and inc.x is not None and not inc.stop_requested():
        lns = LNS(cm, inc, seed=seed)
        lns.run(deadline)
        stats.update(lns_iterations=lns.iters, lns_improvements=lns.accepted)
    stats["incumbent_updates"] = inc.updates
    return SearchResult(inc.x, inc.cost, inc.first_feasible, stats)

"""The anytime search for large cores, and running several of them on the cores we have.

One search = a feasible start (least memory + greedy moves, well under a
second), then the Lagrangian search (message passing + tree moves + repair)
until the deadline, with the last part of the time spent on exact ILP
re-solves of neighbourhoods (``lns.py``). Several searches with different
seeds run in forked worker processes (one per core); the best result wins.
"""

from __future__ import annotations

import multiprocessing as mp
import os
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
               lns_fraction: float = 0.25) -> SearchResult:
    """One complete anytime search on the core; returns the best feasible assignment."""
    rng = np.random.default_rng(seed)
    inc = Incumbent(cm, t_start, progress)
    x = least_memory(cm)
    load = cm.load_of(x)
    # merged nodes may have no strategy that is smallest on every row at once
    if not (load <= cm.cap).all() and not repair(cm, x, load, deadline):
        return SearchResult(None, np.inf, None, {"note": "no memory-feasible start found"})
    inc.offer(x, None, load, "least-memory")
    greedy_sweeps(cm, x, load, min(deadline, time.monotonic() + 0.25 * (deadline - time.monotonic())),
                  rng)
    inc.offer(x, None, load, "greedy")
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
    if time.monotonic() < lns_start and cm.E:
        lag = LagrangianSearch(cm, inc, rng)
        lag.run(lns_start)
        stats.update(lagrangian_iterations=lag.iters, repairs=lag.repairs)
    if time.monotonic() < deadline - 0.2 and inc.x is not None:
        lns = LNS(cm, inc, seed=seed)
        lns.run(deadline)
        stats.update(lns_iterations=lns.iters, lns_improvements=lns.accepted)
    stats["incumbent_updates"] = inc.updates
    return SearchResult(inc.x, inc.cost, inc.first_feasible, stats)


def _worker(conn, cm, t_start, deadline, seed, progress):
    try:
        res = run_search(cm, t_start, deadline, seed, progress)
        conn.send(("ok", res))
    except BaseException as e:  # report, never hang the parent
        conn.send(("error", repr(e)))
    finally:
        conn.close()


def run_portfolio(cm: CoreModel, t_start: float, deadline: float, seeds: list[int],
                  progress=None) -> SearchResult:
    """Run one search per seed in parallel (forked processes); keep the best."""
    if len(seeds) <= 1 or not fork_is_safe():
        return run_search(cm, t_start, deadline, seeds[0] if seeds else 0, progress)
    ctx = mp.get_context("fork")
    procs = []
    for s in seeds[1:]:
        parent, child = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(child, cm, t_start, deadline, s, progress), daemon=True)
        p.start()
        child.close()
        procs.append((p, parent))
    results = [run_search(cm, t_start, deadline, seeds[0], progress)]
    for p, conn in procs:
        if conn.poll(max(0.05, deadline - time.monotonic() + 0.25)):
            try:
                kind, payload = conn.recv()
                if kind == "ok":
                    results.append(payload)
            except EOFError:
                pass
        p.join(timeout=0.05)
        if p.is_alive():
            p.kill()
    best = min(results, key=lambda r: (r.cost, not r.optimal))
    ff = [r.first_feasible for r in results if r.first_feasible is not None]
    best.first_feasible = min(ff) if ff else None
    best.stats = dict(best.stats, workers=len(seeds), worker_costs=[float(r.cost) for r in results])
    return best


def fork_is_safe() -> bool:
    """Forking is only safe while the process runs no foreign threads (e.g. an initialised
    XLA backend); numpy's BLAS pool (up to one thread per core) is fine."""
    if "fork" not in mp.get_all_start_methods():
        return False
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1]) <= (os.cpu_count() or 1) + 1
    except OSError:
        pass
    return False


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)

"""``solve``: pick the path for a problem and return an exactly scored Solution.

1. Infeasible limit? The least-usage assignment reaches the smallest load at
   every time point at once, so if its peak exceeds the limit nothing fits
   (reported with that smallest peak). Otherwise it is also the fallback answer.
2. Exact reductions (``reduce.py``) shrink the problem to its core.
3. Small core: exact ILP (PuLP + HiGHS or CBC) -- deterministic, proven optimal
   when it finishes. On a multi-core machine a heuristic search runs beside it
   as insurance and is stopped once the ILP proves optimality.
   Large core: the anytime heuristic search (``heuristic.py``), one per core.
4. The core answer is expanded back and scored by the exact evaluator.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field

import numpy as np

from .core import CoreModel
from .evaluate import evaluate
from .heuristic import default_workers, fork_is_safe, run_portfolio, run_search
from .ilp import BACKENDS, ilp_size, solve_ilp
from .local_search import greedy_sweeps, least_memory
from .problem import ShardingProblem, flatten
from .reduce import Infeasible, Reducer, ReductionTimeout

METHODS = ("auto", "ilp", "heuristic")
AUTO_ILP_MAX_COLUMNS = 120_000
"""Cores whose full ILP has at most this many columns go to the exact path in "auto"."""
SIDE_SEARCH_MIN_COLUMNS = 5_000
"""Below this ILP size the exact path alone is fast; no heuristic runs beside it."""


@dataclass
class Solution:
    assignment: np.ndarray | None
    cost: int | None
    peak_usage: int | None
    feasible: bool
    status: str            # "optimal" | "feasible" | "infeasible" | "timeout"
    solve_time: float
    time_to_first_feasible: float | None
    method: str
    stats: dict = field(default_factory=dict)


def min_peak_usage(problem: ShardingProblem) -> int:
    """The smallest peak usage any assignment can reach (that of the least-usage one)."""
    return evaluate(problem, problem.min_usage_assignment()).peak_usage


class _Reporter:
    """Turns core-level improvements into progress calls with exact costs (rate-limited)."""

    def __init__(self, progress, t0, reducer, fp, const):
        self.progress, self.t0, self.reducer, self.fp, self.const = progress, t0, reducer, fp, const
        self.last_exact = -1.0

    def __call__(self, source: str, core_cost: float, x: np.ndarray) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        peak = None
        if now - self.last_exact > 1.0:
            ev = evaluate(self.fp, self.reducer.expand(x))
            cost, peak = ev.cost, ev.peak_usage
            self.last_exact = time.monotonic()
        else:
            cost = int(round(core_cost)) + self.const
        self.progress(now - self.t0, cost, peak, source)


def _emit(progress, t0, cost, peak, message):
    if progress is not None:
        progress(time.monotonic() - t0, cost, peak, message)


def solve(problem: ShardingProblem, time_limit: float = 60.0, *, method: str = "auto",
          backend: str = "highs", seed: int = 0, workers: int | None = None,
          progress=None) -> Solution:
    """Find a cheap assignment meeting the usage limit within ``time_limit`` seconds.

    ``progress(elapsed_s, cost, peak_or_None, message)`` is called on every improvement
    (from worker processes too, when several run).
    """
    t0 = time.monotonic()
    deadline = t0 + max(0.0, float(time_limit))
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    workers = default_workers() if workers is None else max(1, int(workers))
    problem.validate()
    fp = flatten(problem)
    stats: dict = {"nodes": fp.num_nodes, "edges": fp.num_edges,
                   "strategies": int(fp.ks.sum()), "workers": workers}

    def finish(x, status, method_name, first=None, ev=None):
        ev = ev if ev is not None else evaluate(fp, x)
        stats["num_forbidden"] = ev.num_forbidden
        if method_name == "least-usage" and ev.num_forbidden:
            status = "timeout"     # only the fallback, which picks forbidden entries
        return Solution(assignment=x, cost=ev.cost, peak_usage=ev.peak_usage, feasible=ev.feasible,
                        status=status, solve_time=time.monotonic() - t0,
                        time_to_first_feasible=first, method=method_name, stats=stats)

    x_min = problem.min_usage_assignment()
    ev_min = evaluate(fp, x_min)
    stats["min_peak_usage"] = ev_min.peak_usage
    if not ev_min.feasible:
        _emit(progress, t0, None, ev_min.peak_usage,
              f"usage limit {fp.usage_limit} cannot be met: smallest peak usage is {ev_min.peak_usage}")
        return Solution(assignment=None, cost=None, peak_usage=None, feasible=False,
                        status="infeasible", solve_time=time.monotonic() - t0,
                        time_to_first_feasible=None, method="none", stats=stats)
    t_fallback = time.monotonic() - t0
    _emit(progress, t0, ev_min.cost, ev_min.peak_usage, "least-usage assignment")

    # reductions (hard: forbidden entries removed; soft if that proves impossible)
    try:
        reducer = Reducer(fp, hard=True)
        reducer.run(deadline=deadline - 0.05 * time_limit)
    except Infeasible as e:
        stats["forbidden_unavoidable"] = str(e)
        try:
            reducer = Reducer(fp, hard=False)
            reducer.run(deadline=deadline - 0.05 * time_limit)
        except (Infeasible, ReductionTimeout):
            return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    except ReductionTimeout:
        stats["reduction"] = "timeout"
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    core = reducer.core()
    stats.update(reduction=core.stats, reduce_time=time.monotonic() - t0)
    cm = CoreModel(core.k, core.cost, core.edges, core.terms, core.cap)
    stats["ilp_columns"] = ilp_size(cm)
    if cm.m == 0:
        x = reducer.expand(np.zeros(0, dtype=np.int64))
        ev = evaluate(fp, x)
        if ev.feasible:
            return finish(x, "optimal", "reduction", time.monotonic() - t0, ev)
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)

    x0 = np.zeros(cm.m, dtype=np.int64)
    const = evaluate(fp, reducer.expand(x0)).cost - int(round(cm.cost_of(x0))) \
        if np.isfinite(cm.cost_of(x0)) else None
    if const is None:   # pick a finite point for the offset
        x0 = np.array([int(np.argmin(c)) for c in cm.cost], dtype=np.int64)
        c0 = cm.cost_of(x0)
        const = evaluate(fp, reducer.expand(x0)).cost - int(round(c0)) if np.isfinite(c0) else 0
    report = _Reporter(progress, t0, reducer, fp, const)

    use_ilp = method == "ilp" or (method == "auto" and stats["ilp_columns"] <= AUTO_ILP_MAX_COLUMNS)
    if use_ilp:
        return _solve_exact(cm, reducer, fp, stats, finish, report, t0, deadline, backend, seed,
                            workers, method, x_min, ev_min, t_fallback, progress)
    margin = min(1.0, 0.05 * time_limit)
    res = run_portfolio(cm, t0, deadline - margin, [seed + i for i in range(workers)], report)
    stats.update(search=res.stats)
    if res.x is None:
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    x = reducer.expand(res.x)
    ev = evaluate(fp, x)
    if not ev.feasible or ev.cost > ev_min.cost:
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    return finish(x, "feasible", "heuristic", res.first_feasible, ev)


def _search_worker(conn, cm, t0, deadline, seed):
    try:
        res = run_search(cm, t0, deadline, seed, None)
        conn.send((res.x, res.cost, res.first_feasible))
    except BaseException:
        conn.send((None, np.inf, None))
    finally:
        conn.close()


def _solve_exact(cm, reducer, fp, stats, finish, report, t0, deadline, backend, seed, workers,
                 method, x_min, ev_min, t_fallback, progress):
    """Exact ILP of the core, with a heuristic search beside it on a second core."""
    side = None
    if (workers >= 2 and method == "auto" and stats["ilp_columns"] >= SIDE_SEARCH_MIN_COLUMNS
            and fork_is_safe()):
        ctx = mp.get_context("fork")
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_search_worker,
                           args=(child, cm, t0, deadline - min(1.0, 0.05 * (deadline - t0)), seed),
                           daemon=True)
        proc.start()
        child.close()
        side = (proc, parent)
    # a quick feasible start: the answer if the ILP finds nothing in time
    candidates = []
    xg = least_memory(cm)
    load = cm.load_of(xg)
    if (load <= cm.cap).all():
        greedy_sweeps(cm, xg, load, time.monotonic() + min(2.0, 0.05 * (deadline - t0)),
                      np.random.default_rng(seed))
        cg = cm.cost_of(xg)
        if np.isfinite(cg):
            report("greedy", cg, xg)
            candidates.append((cg, xg, time.monotonic() - t0, "greedy"))
    margin = min(1.0, 0.05 * (deadline - t0))
    res = solve_ilp(cm, max(0.0, deadline - margin - time.monotonic()), backend, seed=seed)
    t_ilp = time.monotonic() - t0
    stats.update(ilp=dict(status=res.status, rounds=res.rounds, variables=res.num_variables,
                          constraints=res.num_constraints))
    name = f"ilp-{backend}"
    if res.x is not None:
        report(name, cm.cost_of(res.x), res.x)
        candidates.append((cm.cost_of(res.x), res.x, t_ilp, name))
    if side is not None:
        proc, conn = side
        if res.optimal:
            proc.kill()
        elif conn.poll(max(0.1, deadline - time.monotonic())):
            try:
                sx, scost, sfirst = conn.recv()
                if sx is not None:
                    candidates.append((scost, sx, sfirst, "heuristic"))
            except EOFError:
                pass
        proc.join(timeout=0.5)
        if proc.is_alive():
            proc.kill()
    if not candidates:
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    cost, xc, first, used = min(candidates, key=lambda c: c[0])
    x = reducer.expand(xc)
    ev = evaluate(fp, x)
    if not ev.feasible:
        return finish(x_min, "feasible", "least-usage", t_fallback, ev_min)
    status = "optimal" if (res.optimal and used == name) else "feasible"
    firsts = [c[2] for c in candidates if c[2] is not None]
    return finish(x, status, used, min(firsts) if firsts else None, ev)

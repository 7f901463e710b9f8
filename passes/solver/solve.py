"""``solve``: pick the path for a problem and return an exactly scored Solution.

1. Infeasible limit? The least-usage assignment reaches the smallest load at
   every time point at once, so if its peak exceeds the limit nothing fits
   (reported with that smallest peak). Otherwise it is also the fallback answer.
2. Exact reductions (``reduce.py``) shrink the problem to its core, treating
   forbidden (INF_COST) entries as impossible.
3. Small core: exact ILP (HiGHS through highspy, or CBC through PuLP) -- proven optimal
   when it finishes; on a multi-core machine a heuristic search runs beside it
   as insurance and is stopped once the ILP proves optimality.
   Large core: the anytime heuristic search (``heuristic.py``), one per core.
4. If no solution avoids every forbidden entry, the same runs again with
   forbidden entries as large finite costs (fewest forbidden entries first).
5. The core answer is expanded back and scored by the exact evaluator.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from dataclasses import dataclass, field

import numpy as np

from .core import CoreModel
from .evaluate import Evaluation, evaluate
from .heuristic import default_workers, fork_is_safe, run_portfolio, run_search
from .ilp import BACKENDS, ilp_size, solve_ilp
from .local_search import greedy_sweeps, least_memory
from .problem import FlatProblem, ShardingProblem, flatten
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


@dataclass
class _Found:
    x: np.ndarray            # full assignment
    ev: Evaluation
    optimal: bool
    method: str
    first: float | None


class _Run:
    """One solve() call: its clock, options, fallback and progress reporting."""

    def __init__(self, fp: FlatProblem, t0: float, deadline: float, method: str, backend: str,
                 seed: int, workers: int, progress):
        self.fp, self.t0, self.deadline = fp, t0, deadline
        self.method, self.backend, self.seed, self.workers = method, backend, seed, workers
        self.progress = progress
        self.stats: dict = {}
        self.core_bound: float | None = None

    def emit(self, cost, peak, message):
        if self.progress is not None:
            self.progress(time.monotonic() - self.t0, cost, peak, message)

    def margin(self) -> float:
        return min(1.0, 0.05 * (self.deadline - self.t0))

    def reduced(self, hard: bool) -> _Found | None:
        """Reduce and solve; None when nothing memory-feasible (without forbidden
        entries, if ``hard``) was found."""
        fp = self.fp
        reducer = Reducer(fp, hard=hard)
        reducer.run(deadline=self.deadline - self.margin())
        core = reducer.core()
        key = "" if hard else "soft_"
        self.stats[key + "reduction"] = core.stats
        self.stats[key + "reduce_time"] = time.monotonic() - self.t0
        cm = CoreModel(core.k, core.cost, core.edges, core.terms, core.cap)
        self.stats[key + "ilp_columns"] = ilp_size(cm)
        if cm.m == 0:
            x = reducer.expand(np.zeros(0, dtype=np.int64))
            ev = evaluate(fp, x)
            return _Found(x, ev, True, "reduction", time.monotonic() - self.t0) if ev.feasible else None
        report = _Reporter(self, reducer, cm)
        use_ilp = self.method == "ilp" or (self.method == "auto" and ilp_size(cm) <= AUTO_ILP_MAX_COLUMNS)
        if use_ilp:
            cands = self._exact(cm, report, key)
        else:
            res = run_portfolio(cm, self.t0, self.deadline - self.margin(),
                                [self.seed + i for i in range(self.workers)], report)
            self.stats[key + "search"] = res.stats
            cands = [] if res.x is None else [(res.cost, res.x, res.first_feasible, "heuristic",
                                               res.optimal)]
        if not cands:
            return None
        cost, xc, _, used, optimal = min(cands, key=lambda c: (c[0], not c[4]))
        firsts = [c[2] for c in cands if c[2] is not None and np.isfinite(c[0])]
        first = min(firsts) if firsts else None
        if not np.isfinite(cost) and hard:
            return None
        x = reducer.expand(xc)
        ev = evaluate(fp, x)
        if not ev.feasible:
            return None
        if optimal:
            self.stats["lower_bound"] = ev.cost
        elif self.core_bound is not None and hard and np.isfinite(cost):
            # core costs differ from full costs by the constant the reductions folded away
            self.stats["lower_bound"] = int(np.ceil(self.core_bound - 0.5)) + ev.cost - int(round(cost))
        return _Found(x, ev, optimal, used, first)

    def _exact(self, cm: CoreModel, report, key: str) -> list:
        """Exact ILP of the core, a greedy start before it, a heuristic beside it."""
        side = None
        if (self.workers >= 2 and self.method == "auto" and ilp_size(cm) >= SIDE_SEARCH_MIN_COLUMNS
                and fork_is_safe()):
            ctx = mp.get_context("fork")
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_search_worker,
                               args=(child, cm, self.t0, self.deadline - self.margin(), self.seed),
                               daemon=True)
            proc.start()
            child.close()
            side = (proc, parent)
        cands = []
        xg = least_memory(cm)
        load = cm.load_of(xg)
        if (load <= cm.cap).all():
            greedy_sweeps(cm, xg, load, time.monotonic() + min(2.0, 0.05 * (self.deadline - self.t0)),
                          np.random.default_rng(self.seed))
            cg = cm.cost_of(xg)
            if np.isfinite(cg):
                report("greedy", cg, xg)
                cands.append((cg, xg, time.monotonic() - self.t0, "greedy", False))
        # No start solution: with one, memory rows near its peak are added up front, which
        # made IOPDDL A slower (26 s -> no proof in 60 s) and the GPT problems no faster.
        res = solve_ilp(cm, max(0.0, self.deadline - self.margin() - time.monotonic()), self.backend,
                        seed=self.seed)
        name = f"ilp-{self.backend}"
        self.stats[key + "ilp"] = dict(status=res.status, rounds=res.rounds,
                                       variables=res.num_variables, constraints=res.num_constraints)
        if res.x is not None:
            c = cm.cost_of(res.x)
            report(name, c, res.x)
            cands.append((c, res.x, time.monotonic() - self.t0, name, res.optimal))
        if res.bound is not None and np.isfinite(res.bound):
            self.core_bound = res.bound
        if side is not None:
            proc, conn = side
            if res.optimal:
                proc.kill()
            elif conn.poll(max(0.05, self.deadline - 0.5 * self.margin() - time.monotonic())):
                try:
                    sx, scost, sfirst = conn.recv()
                    if sx is not None:
                        cands.append((scost, sx, sfirst, "heuristic", False))
                except EOFError:
                    pass
            proc.join(timeout=0.05)
            if proc.is_alive():
                proc.kill()
        return cands


class _Reporter:
    """Turns core-level improvements into progress calls with exact costs (rate-limited)."""

    def __init__(self, run: _Run, reducer: Reducer, cm: CoreModel):
        self.run, self.reducer = run, reducer
        self.last_exact = -1.0
        self.const = None
        if run.progress is not None:
            x0 = np.array([int(np.argmin(c)) for c in cm.cost], dtype=np.int64)
            c0 = cm.cost_of(x0)
            if np.isfinite(c0):
                self.const = evaluate(run.fp, reducer.expand(x0)).cost - int(round(c0))

    def __call__(self, source: str, core_cost: float, x: np.ndarray) -> None:
        if self.run.progress is None:
            return
        peak = None
        if time.monotonic() - self.last_exact > 1.0 or self.const is None:
            ev = evaluate(self.run.fp, self.reducer.expand(x))
            cost, peak = ev.cost, ev.peak_usage
            self.last_exact = time.monotonic()
        else:
            cost = int(round(core_cost)) + self.const
        self.run.emit(cost, peak, source)


def _search_worker(conn, cm, t0, deadline, seed):
    try:
        res = run_search(cm, t0, deadline, seed, None)
        conn.send((res.x, res.cost, res.first_feasible))
    except BaseException:
        conn.send((None, np.inf, None))
    finally:
        conn.close()


def solve(problem: ShardingProblem, time_limit: float = 60.0, *, method: str = "auto",
          backend: str = "highs", seed: int = 0, workers: int | None = None,
          progress=None) -> Solution:
    """Find a cheap assignment meeting the usage limit within ``time_limit`` seconds.

    ``progress(elapsed_s, cost, peak_or_None, message)`` is called on improvements
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
    run = _Run(fp, t0, deadline, method, backend, seed, workers, progress)
    stats = run.stats
    stats.update(nodes=fp.num_nodes, edges=fp.num_edges, strategies=int(fp.ks.sum()), workers=workers)

    def finish(found: _Found, status: str | None = None) -> Solution:
        stats["num_forbidden"] = found.ev.num_forbidden
        if status is None:
            status = "optimal" if found.optimal else "feasible"
        return Solution(assignment=found.x, cost=found.ev.cost, peak_usage=found.ev.peak_usage,
                        feasible=found.ev.feasible, status=status, solve_time=time.monotonic() - t0,
                        time_to_first_feasible=found.first, method=found.method, stats=stats)

    x_min = problem.min_usage_assignment()
    ev_min = evaluate(fp, x_min)
    stats["min_peak_usage"] = ev_min.peak_usage
    if not ev_min.feasible:
        run.emit(None, ev_min.peak_usage,
                 f"usage limit {fp.usage_limit} cannot be met: smallest peak usage is {ev_min.peak_usage}")
        return Solution(assignment=None, cost=None, peak_usage=None, feasible=False,
                        status="infeasible", solve_time=time.monotonic() - t0,
                        time_to_first_feasible=None, method="none", stats=stats)
    fallback = _Found(x_min, ev_min, False, "least-usage", time.monotonic() - t0)
    run.emit(ev_min.cost, ev_min.peak_usage, "least-usage assignment")

    found = None
    try:
        found = run.reduced(hard=True)
    except Infeasible as e:
        stats["forbidden_unavoidable"] = str(e)
    except ReductionTimeout:
        stats["reduction"] = "timeout"
    if found is None and ev_min.num_forbidden and time.monotonic() < deadline - run.margin():
        try:   # no solution without forbidden entries: minimise how many, then the cost
            found = run.reduced(hard=False)
        except (Infeasible, ReductionTimeout):
            found = None
    if found is None or found.ev.cost > ev_min.cost:
        # only the fallback: "timeout" when it still picks forbidden entries
        return finish(fallback, "timeout" if ev_min.num_forbidden else "feasible")
    return finish(found)

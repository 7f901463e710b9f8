"""``solve``: pick the path for a problem and return an exactly scored Solution.

1. Infeasible limit? The least-usage assignment reaches the smallest load at
   every time point at once, so if its peak exceeds the limit nothing fits
   (reported with that smallest peak). Otherwise it is also the fallback answer.
   A ``SolveCache`` returns a proven plan of the identical problem at once and
   starts from the previous plan of the same graph otherwise.
2. Exact reductions (``reduce.py``) shrink the problem to its core, treating
   forbidden (INF_COST) entries as impossible. Without memory rows, identical
   components around hub nodes (a stack of identical layers) fold into one copy
   each (``fold.py``, exact).
3. The core goes to a set of jobs (``plan_jobs``): the anytime search
   (``heuristic.py``), a lower bound from the LP relaxation (``bound.py``) and
   the exact ILP (``ilp.py``) when the core is small enough. With several cores
   (and a core big enough to pay for the processes) they run in forked workers
   that stream every improvement back (``portfolio.py``); otherwise one after
   another in this process. Everything stops once the best plan is proven
   optimal: the ILP finished, or the bound meets the plan's cost.
4. If no solution avoids every forbidden entry, the same runs again with
   forbidden entries as large finite costs (fewest forbidden entries first).
5. The core answer is expanded back and scored by the exact evaluator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .bound import lp_bound
from .cache import SolveCache
from .core import CoreModel
from .evaluate import Evaluation, evaluate
from .fold import Fold, fold_identical
from .heuristic import run_search
from .ilp import BACKENDS, ilp_size, solve_ilp
from .local_search import greedy_sweeps, least_memory
from .portfolio import Channel, Collector, Job, WorkerReport, default_workers, fork_is_safe, run_forked, run_inline
from .problem import FlatProblem, ShardingProblem, flatten
from .reduce import Infeasible, Reducer, ReductionTimeout

METHODS = ("auto", "ilp", "heuristic")
AUTO_ILP_MAX_COLUMNS = 120_000
"""Cores whose full ILP has at most this many columns get the exact ILP in "auto"."""
SIDE_SEARCH_MIN_COLUMNS = 5_000
"""Below this ILP size the exact ILP alone is fast: one job, no worker processes."""
BOUND_MAX_COLUMNS = 400_000
"""The LP bound is computed for cores up to this size (its model alone costs seconds beyond)."""
DEFAULT_REL_GAP = 1e-9
"""A plan within this relative distance of the proven bound counts as optimal (integer costs:
within one unit always does)."""


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
    workers: list[WorkerReport] = field(default_factory=list)
    """One report per job: finished, failed (with the exception and where), late, died."""
    lower_bound: int | None = None
    """Proven lower bound on the optimum (input-problem cost), when one was computed."""


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


def plan_jobs(cm: CoreModel, *, method: str, backend: str, seed: int, workers: int, forked: bool,
              t0: float, deadline: float, start: np.ndarray | None, collector: Collector
              ) -> list[tuple[str, Job]]:
    """The jobs for one core; forked jobs run side by side, inline ones one after another."""
    size = ilp_size(cm)
    exact = method == "ilp" or (method == "auto" and size <= AUTO_ILP_MAX_COLUMNS)
    bound = method == "auto" and SIDE_SEARCH_MIN_COLUMNS <= size <= BOUND_MAX_COLUMNS
    stop = (lambda: collector.optimal) if not forked else None

    def search(s: int, until: float | None = None) -> Job:
        def job(ch: Channel) -> None:
            x0 = collector.x if collector.x is not None else start
            res = run_search(cm, t0, deadline if until is None else min(until, deadline), s,
                             lambda src, c, x: ch.improved(x, c, src), start=x0, stop=stop,
                             on_bound=ch.bound)
            if res.optimal and res.x is not None:
                ch.improved(res.x, res.cost, "exact", optimal=True)
        return job

    def ilp(ch: Channel) -> None:
        # HiGHS checks its clock between steps: keep a tenth back for its overshoot
        res = solve_ilp(cm, max(0.0, 0.9 * (deadline - time.monotonic())), backend, seed=seed)
        if res.x is not None:
            ch.improved(res.x, cm.cost_of(res.x), f"ilp-{backend}", optimal=res.optimal)
        if res.bound is not None and np.isfinite(res.bound):
            ch.bound(res.bound)

    def lower_bound(ch: Channel) -> None:
        b = lp_bound(cm, min(max(0.0, deadline - time.monotonic()),
                             max(1.0, 0.3 * (deadline - time.monotonic()))))
        if b.value is not None:
            ch.bound(b.value)

    def greedy(ch: Channel) -> None:
        x = least_memory(cm)
        load = cm.load_of(x)
        if (load <= cm.cap).all():
            greedy_sweeps(cm, x, load, time.monotonic() + min(2.0, 0.05 * (deadline - t0)),
                          np.random.default_rng(seed))
            ch.improved(x, cm.cost_of(x), "greedy")

    if method == "heuristic":
        return [(f"search-{i}", search(seed + i)) for i in range(workers if forked else 1)]
    if not forked:
        if exact and size < SIDE_SEARCH_MIN_COLUMNS:
            return [("greedy", greedy), ("ilp", ilp)]
        if exact:   # search first (its dual bound may prove it); what is left goes to the ILP
            mid = time.monotonic() + 0.3 * max(0.0, deadline - time.monotonic())
            return [("search", search(seed, mid)), ("ilp", ilp)]
        return [("search", search(seed))]

    def bound_then(rest: Job) -> Job:
        def job(ch: Channel) -> None:
            lower_bound(ch)
            rest(ch)
        return job

    # the second core: the exact ILP (which solves the LP itself), or the LP bound and a search
    second = ilp if exact else (bound_then(search(seed + 1)) if bound else search(seed + 1))
    jobs = [("search-0", search(seed)), ("exact" if exact else "search-1", second)]
    jobs += [(f"search-{i}", search(seed + i)) for i in range(2, workers)]
    return jobs


class _Run:
    """One solve() call: its clock, options, fallback and progress reporting."""

    def __init__(self, fp: FlatProblem, t0: float, deadline: float, method: str, backend: str,
                 seed: int, workers: int, progress, rel_gap: float, start: np.ndarray | None):
        self.fp, self.t0, self.deadline = fp, t0, deadline
        self.method, self.backend, self.seed, self.workers = method, backend, seed, workers
        self.progress, self.rel_gap, self.start = progress, rel_gap, start
        self.stats: dict = {}
        self.reports: list[WorkerReport] = []
        self.lower_bound: int | None = None

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
        fold = fold_identical(core)
        if fold is not None:
            core, reducer = fold.core, _Unfolded(reducer, fold)
            self.stats[key + "folded_nodes"] = fold.stats["folded_nodes"]
        self.stats[key + "reduction"] = core.stats
        self.stats[key + "reduce_time"] = time.monotonic() - self.t0
        cm = CoreModel(core.k, core.cost, core.edges, core.terms, core.cap)
        self.stats[key + "ilp_columns"] = ilp_size(cm)
        if cm.m == 0:
            x = reducer.expand(np.zeros(0, dtype=np.int64))
            ev = evaluate(fp, x)
            return _Found(x, ev, True, "reduction", time.monotonic() - self.t0) if ev.feasible else None
        report = _Reporter(self, reducer, cm)
        collector = Collector(report, lambda msg: self.emit(None, None, msg), self.rel_gap)
        collector.bound_offset = report.const or 0     # progress lines show input-problem costs
        start = reducer.project(self.start) if self.start is not None else None
        if start is not None and (cm.load_of(start) <= cm.cap).all():
            collector.offer(start, cm.cost_of(start), "warm start", False)
        forked = self.workers >= 2 and ilp_size(cm) >= SIDE_SEARCH_MIN_COLUMNS and fork_is_safe()
        jobs = plan_jobs(cm, method=self.method, backend=self.backend, seed=self.seed,
                         workers=self.workers, forked=forked, t0=self.t0,
                         deadline=self.deadline - self.margin(), start=start, collector=collector)
        if forked:
            reports = run_forked(jobs, collector, self.deadline - 0.5 * self.margin())
        else:
            reports = run_inline(jobs, collector)
        self.reports += reports
        self.stats[key + "jobs"] = [f"{r.name}:{r.status}" for r in reports]
        if collector.x is None or not np.isfinite(collector.cost):
            return None
        x = reducer.expand(collector.x)
        ev = evaluate(fp, x)
        if not ev.feasible:
            return None
        first = None if collector.first is None else collector.first - self.t0
        if collector.optimal:
            self.lower_bound = ev.cost
        elif collector.bound is not None and hard:
            # core costs differ from full costs by the constant the reductions folded away
            self.lower_bound = int(np.ceil(collector.bound - 1e-6)) + ev.cost - int(round(collector.cost))
        if self.lower_bound is not None:
            self.stats["lower_bound"] = self.lower_bound
        method = collector.source.split("@")[0]
        return _Found(x, ev, collector.optimal, "heuristic" if method not in ("ilp-highs", "ilp-cbc")
                      else method, first)


class _Unfolded:
    """The reducer's expand/project seen through a fold (folded core <-> core <-> input)."""

    def __init__(self, reducer: Reducer, fold: Fold):
        self.reducer, self.fold = reducer, fold

    def expand(self, x: np.ndarray) -> np.ndarray:
        return self.reducer.expand(self.fold.expand(x))

    def project(self, x: np.ndarray) -> np.ndarray:
        return self.fold.project(self.reducer.project(x))


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


def solve(problem: ShardingProblem, time_limit: float = 60.0, *, method: str = "auto",
          backend: str = "highs", seed: int = 0, workers: int | None = None,
          progress=None, start: np.ndarray | None = None, cache: SolveCache | None = None,
          rel_gap: float = DEFAULT_REL_GAP) -> Solution:
    """Find a cheap assignment meeting the usage limit within ``time_limit`` seconds.

    Stops early once the plan is proven optimal (within ``rel_gap``, or one cost unit).
    ``progress(elapsed_s, cost, peak_or_None, message)`` is called on every improvement
    (streamed from worker processes as they find it) and on worker failures.
    ``start``: an assignment to begin from. ``cache``: see ``SolveCache``.
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
    if start is not None:
        start = np.asarray(start, dtype=np.int64)
        if start.shape != (fp.num_nodes,) or (start < 0).any() or (start >= fp.ks).any():
            raise ValueError(f"start: expected one strategy index per node ({fp.num_nodes} values "
                             f"within each node's strategy count)")
    cached, same = (None, False) if cache is None else cache.lookup(fp)
    if cached is not None and same and cached.optimal:
        cache.hits += 1
        ev = evaluate(fp, cached.assignment)
        return Solution(assignment=cached.assignment.copy(), cost=ev.cost, peak_usage=ev.peak_usage,
                        feasible=ev.feasible, status="optimal", solve_time=time.monotonic() - t0,
                        time_to_first_feasible=time.monotonic() - t0, method="cache",
                        stats={"cache": "hit"}, lower_bound=ev.cost)
    if start is None and cached is not None:
        start = cached.assignment
        cache.warm_starts += 1
    run = _Run(fp, t0, deadline, method, backend, seed, workers, progress, rel_gap, start)
    stats = run.stats
    stats.update(nodes=fp.num_nodes, edges=fp.num_edges, strategies=int(fp.ks.sum()), workers=workers)
    if cache is not None:
        stats["cache"] = "warm start" if cached is not None else "miss"

    def finish(found: _Found, status: str | None = None) -> Solution:
        stats["num_forbidden"] = found.ev.num_forbidden
        if status is None:
            status = "optimal" if found.optimal else "feasible"
        if cache is not None and found.ev.feasible:
            cache.store(fp, found.x, found.ev.cost, status == "optimal")
        return Solution(assignment=found.x, cost=found.ev.cost, peak_usage=found.ev.peak_usage,
                        feasible=found.ev.feasible, status=status, solve_time=time.monotonic() - t0,
                        time_to_first_feasible=found.first, method=found.method, stats=stats,
                        workers=run.reports, lower_bound=run.lower_bound)

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
    if start is not None:
        ev_start = evaluate(fp, start)
        if ev_start.feasible and ev_start.cost < ev_min.cost:
            fallback = _Found(start.copy(), ev_start, False, "warm start", time.monotonic() - t0)

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
    if found is None or found.ev.cost > fallback.ev.cost:
        # only the fallback: "timeout" when it still picks forbidden entries
        return finish(fallback, "timeout" if fallback.ev.num_forbidden else "feasible")
    return finish(found)

"""Run solver jobs in forked workers and stream every improvement back as it is found.

A worker that sends its answer only when it finishes takes that answer with
it when it is late, killed at the deadline or crashes. Here every job reports
through a ``Channel``: each improved core assignment, each lower bound and
each failure (exception type, message, where) is sent the moment it exists,
and the parent keeps the best one. The parent only collects; it stops every
worker once the best assignment is proven optimal (an exact job finished, or
a bound meets it) or the deadline comes, and describes each worker's fate in
a ``WorkerReport``.
"""

from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .bound import proves_optimal


@dataclass
class WorkerReport:
    """What became of one worker: ``status`` is finished | failed | late | died."""
    name: str
    status: str
    improvements: int = 0
    best_cost: float | None = None        # core cost of its best streamed assignment
    error: str | None = None              # "TypeError: message" when it raised or died
    where: str | None = None              # "file.py:123 in function" of the raise

    def line(self) -> str:
        s = f"worker {self.name} {self.status}"
        if self.error:
            s += f": {self.error}"
        if self.where:
            s += f" (at {self.where})"
        return s


class Channel:
    """A job's way to report: improvements, bounds, failures (a pipe, or direct calls in-process)."""

    def __init__(self, send: Callable[[tuple], None]):
        self._send = send

    def improved(self, x: np.ndarray, cost: float, source: str, optimal: bool = False) -> None:
        self._send(("improved", x, float(cost), source, optimal))

    def bound(self, value: float) -> None:
        self._send(("bound", float(value)))


Job = Callable[[Channel], None]
"""A job solves until its own deadline, reporting through the channel; its return value is ignored."""


def where_raised(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    if not tb:
        return "unknown"
    f = tb[-1]
    return f"{os.path.basename(f.filename)}:{f.lineno} in {f.name}"


def _worker_main(conn, job: Job) -> None:
    try:
        job(Channel(conn.send))
        conn.send(("done",))
    except BaseException as e:      # report, never hang the parent
        try:
            conn.send(("error", f"{type(e).__name__}: {e}", where_raised(e)))
        except (OSError, ValueError):
            pass
    finally:
        conn.close()


class Collector:
    """The best core assignment from all jobs, the best bound, and progress calls."""

    def __init__(self, on_improved: Callable[[str, float, np.ndarray], None] | None,
                 on_event: Callable[[str], None] | None, rel_gap: float):
        self.x: np.ndarray | None = None
        self.cost = np.inf
        self.source = ""
        self.optimal = False
        self.bound: float | None = None
        self.first: float | None = None
        self.on_improved, self.on_event, self.rel_gap = on_improved, on_event, rel_gap
        self.t0 = time.monotonic()
        self._bound_said = -1.0
        self.bound_offset = 0       # added to bounds in progress lines (core -> input costs)

    def offer(self, x: np.ndarray, cost: float, source: str, optimal: bool) -> bool:
        if optimal and cost <= self.cost:
            self.optimal = True
            self.bound = cost if self.bound is None else max(self.bound, cost)
        if not cost < self.cost:
            return False
        self.x, self.cost, self.source = np.array(x, copy=True), cost, source
        self.optimal = optimal or proves_optimal(cost, self.bound, self.rel_gap)
        if self.first is None and np.isfinite(cost):
            self.first = time.monotonic()
        if self.on_improved is not None:
            self.on_improved(source, cost, self.x)
        return True

    def add_bound(self, value: float, source: str) -> None:
        if self.bound is None or value > self.bound:
            self.bound = value
            if proves_optimal(self.cost, self.bound, self.rel_gap):
                self.optimal = True
            if self.on_event is not None and (self.optimal or time.monotonic() - self._bound_said > 1.0):
                self._bound_said = time.monotonic()
                self.on_event(f"lower bound {int(np.ceil(value - 1e-6)) + self.bound_offset} ({source})"
                              + (": the best plan is optimal" if self.optimal else ""))

    def event(self, message: str) -> None:
        if self.on_event is not None:
            self.on_event(message)

    def channel(self, name: str, report: WorkerReport) -> Channel:
        """An in-process channel that feeds this collector directly."""
        return Channel(lambda msg: self.handle(name, report, msg))

    def handle(self, name: str, report: WorkerReport, msg: tuple) -> None:
        kind = msg[0]
        if kind == "improved":
            _, x, cost, source, optimal = msg
            report.improvements += 1
            if report.best_cost is None or cost < report.best_cost:
                report.best_cost = cost
            self.offer(x, cost, f"{source}@{name}", optimal)
        elif kind == "bound":
            self.add_bound(msg[1], name)
        elif kind == "done":
            report.status = "finished"
        elif kind == "error":
            report.status, report.error, report.where = "failed", msg[1], msg[2]
            self.event(report.line())


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
    """One worker per core this process may use that is not already busy: on a saturated
    machine a second process only time-shares with the first (measured: the yardstick at
    load 13 on 2 cores scored 0.999 with two workers, 1.000 with one)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 1.5)))


def run_forked(jobs: list[tuple[str, Job]], collector: Collector, deadline: float) -> list[WorkerReport]:
    """Run every job in its own forked process until all finish, the collector holds a proven
    optimum, or ``deadline`` passes; returns one report per job."""
    ctx = mp.get_context("fork")
    running: dict = {}
    reports = []
    for name, job in jobs:
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker_main, args=(child, job), daemon=True, name=name)
        proc.start()
        child.close()
        rep = WorkerReport(name, "running")
        reports.append(rep)
        running[parent] = (proc, rep)
    while running and not collector.optimal:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for conn in mpc.wait(list(running), timeout=left):
            proc, rep = running[conn]
            try:
                while conn.poll() and time.monotonic() < deadline:
                    collector.handle(rep.name, rep, conn.recv())
            except (EOFError, OSError):
                proc.join(timeout=0.5)
                if rep.status == "running":
                    rep.status = "died"
                    rep.error = f"exited without a report (exit code {proc.exitcode})"
                    collector.event(rep.line())
                del running[conn]
                continue
            if rep.status != "running":
                del running[conn]
    stop_reading = time.monotonic() + 0.2
    for conn, (proc, rep) in running.items():
        try:      # improvements already in the pipe still count
            while conn.poll() and time.monotonic() < stop_reading:
                collector.handle(rep.name, rep, conn.recv())
        except (EOFError, OSError):
            pass
        if rep.status == "running":
            rep.status = "stopped" if collector.optimal else "late"
            if not collector.optimal:
                collector.event(rep.line() + ": still running at the deadline; its streamed "
                                "improvements are kept")
    for conn, (proc, rep) in running.items():
        if proc.is_alive():
            proc.kill()
        proc.join(timeout=1.0)
        conn.close()
    return reports


def run_inline(jobs: list[tuple[str, Job]], collector: Collector) -> list[WorkerReport]:
    """Run the jobs one after another in this process (each stops at its own deadline)."""
    reports = []
    for name, job in jobs:
        rep = WorkerReport(name, "running")
        reports.append(rep)
        if collector.optimal:
            rep.status = "skipped"
            continue
        try:
            job(collector.channel(name, rep))
            rep.status = "finished"
        except Exception as e:       # one failing job must not lose the others' answers
            rep.status, rep.error, rep.where = "failed", f"{type(e).__name__}: {e}", where_raised(e)
            collector.event(rep.line())
    return reports

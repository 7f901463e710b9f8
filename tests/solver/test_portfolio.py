"""Workers stream improvements as they find them; a failing or late worker is reported, not lost."""

import time

import numpy as np
import pytest

from _problems import random_problem
import importlib

from meshweave.passes.solver import solve
from meshweave.passes.solver.core import CoreModel
from meshweave.passes.solver.ilp import solve_ilp
from meshweave.passes.solver.portfolio import Collector, run_forked, run_inline

solve_mod = importlib.import_module("meshweave.passes.solver.solve")


def _failing(ch):
    raise ValueError("injected failure")


def _late(x, cost):
    def job(ch):
        ch.improved(x, cost, "late-plan")
        time.sleep(600)          # killed at the deadline
    return job


def test_forked_failing_and_late_workers_are_reported_and_the_streamed_plan_kept():
    events = []
    col = Collector(None, events.append, rel_gap=0.0)
    x = np.array([2, 0, 1])
    t = time.monotonic()
    reports = run_forked([("broken", _failing), ("slow", _late(x, 42.0))], col, t + 1.5)
    by_name = {r.name: r for r in reports}
    assert len(reports) == 2
    assert by_name["broken"].status == "failed"
    assert by_name["broken"].error == "ValueError: injected failure"
    assert by_name["broken"].where.startswith("test_portfolio.py:") and "_failing" in by_name["broken"].where
    assert by_name["slow"].status == "late" and by_name["slow"].improvements == 1
    assert col.x.tolist() == [2, 0, 1] and col.cost == 42.0
    assert any("worker broken failed: ValueError: injected failure" in e for e in events)
    assert any("worker slow late" in e for e in events)


def test_forked_worker_that_dies_silently_is_reported():
    import os

    def die(ch):
        os._exit(3)

    col = Collector(None, None, rel_gap=0.0)
    (rep,) = run_forked([("crash", die)], col, time.monotonic() + 5)
    assert rep.status == "died" and "exit code 3" in rep.error


def test_inline_failure_does_not_lose_other_jobs():
    col = Collector(None, None, rel_gap=0.0)
    good = lambda ch: ch.improved(np.array([1]), 7.0, "good")   # noqa: E731
    reports = run_inline([("broken", _failing), ("good", good)], col)
    assert [r.status for r in reports] == ["failed", "finished"]
    assert col.cost == 7.0


def test_proven_optimum_stops_the_other_workers():
    col = Collector(None, None, rel_gap=0.0)
    col.add_bound(10.0, "test")
    x = np.array([0])
    t = time.monotonic()
    reports = run_forked([("finds-it", _late(x, 10.0)), ("idle", lambda ch: time.sleep(600))], col,
                         t + 120)
    assert col.optimal and col.cost == 10.0
    assert {r.status for r in reports} == {"stopped"}


def test_solve_reports_injected_failing_and_late_workers(monkeypatch):
    """Through solve(): the plan a late worker streamed is the answer; both fates are reported."""
    p = random_problem(np.random.default_rng(7), 40, kmax=4, ties=10)
    want = solve(p, 20, method="ilp", workers=1)
    assert want.status == "optimal"

    def jobs(cm: CoreModel, **kw):
        res = solve_ilp(cm, 20)
        return [("broken", _failing), ("late", _late(res.x, cm.cost_of(res.x)))]

    monkeypatch.setattr(solve_mod, "plan_jobs", jobs)
    monkeypatch.setattr(solve_mod, "fork_is_safe", lambda: True)
    monkeypatch.setattr(solve_mod, "SIDE_SEARCH_MIN_COLUMNS", 0)
    lines = []
    sol = solve(p, 3.0, workers=2, progress=lambda t, c, pk, msg: lines.append(msg))
    assert sol.feasible and sol.cost == want.cost
    assert sol.status == "feasible"      # nothing proved it; the late worker never finished
    fates = {r.name: r for r in sol.workers}
    assert fates["broken"].status == "failed" and "ValueError: injected failure" in fates["broken"].error
    assert fates["late"].status == "late" and fates["late"].improvements == 1
    assert any(m.startswith("worker broken failed: ValueError: injected failure (at test_portfolio.py:")
               for m in lines)
    assert any(m.startswith("late-plan@late") for m in lines)


@pytest.mark.parametrize("workers", [1, 2])
def test_real_jobs_report_finished_or_stopped(workers):
    p = random_problem(np.random.default_rng(1), 400, kmax=8, ties=100, edges=2.5)
    sol = solve(p, 3.0, workers=workers, seed=1)
    assert sol.feasible and sol.workers
    assert all(r.status in ("finished", "stopped", "skipped", "late") for r in sol.workers), sol.workers
    assert not any(r.error for r in sol.workers)

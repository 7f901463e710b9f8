"""Pipeline schedules (runtime/schedules.py): dependencies, in-flight counts, bubbles, plots."""
import dataclasses

import pytest

from meshweave.runtime.schedules import (ScheduleError, Task, TaskDurations, TimedTask,
                                         check_schedule, make_schedule, plot_schedule)

UNIT = TaskDurations(forward=1.0, backward=1.0)
SIZES = [(1, 1), (1, 4), (2, 1), (2, 2), (3, 8), (4, 4), (4, 2), (5, 7), (8, 16)]


@pytest.mark.parametrize("kind", ["gpipe", "1f1b"])
@pytest.mark.parametrize("S,B", SIZES)
def test_dependencies_hold(kind, S, B):
    sched = make_schedule(kind, S, B)
    check_schedule(sched)
    for durations in (UNIT, TaskDurations(forward=tuple(range(1, S + 1)), backward=3.0, apply=0.5, transfer=0.25)):
        check_schedule(sched, sched.simulate(durations))
    assert [len(ts) for ts in sched.tasks] == [2 * B + 1] * S
    assert all(ts[-1] == Task("apply", s) for s, ts in enumerate(sched.tasks))


@pytest.mark.parametrize("S,B", SIZES)
def test_gpipe_bubble_formula(S, B):
    sched = make_schedule("gpipe", S, B, durations=UNIT)
    assert sched.makespan == 2 * (B + S - 1)
    assert sched.bubble_fraction == pytest.approx((S - 1) / (B + S - 1))
    assert sched.in_flight == (B,) * S


@pytest.mark.parametrize("S,B", SIZES)
def test_1f1b_in_flight_and_bubble(S, B):
    sched = make_schedule("1f1b", S, B, durations=UNIT)
    assert sched.in_flight == tuple(min(S - s, B) for s in range(S))
    # Same bubble as GPipe with equal forward and backward times, with far fewer activations held.
    assert sched.bubble_fraction == pytest.approx((S - 1) / (B + S - 1))
    # Default 1:2 forward/backward durations: (B + S - 1) * 3 clocks.
    assert make_schedule("1f1b", S, B).makespan == pytest.approx(3 * (B + S - 1))


def test_1f1b_order_on_a_small_pipeline():
    sched = make_schedule("1f1b", 3, 4)
    assert [str(t) for t in sched.tasks[0]] == ["F0.0", "F0.1", "F0.2", "B0.0", "F0.3", "B0.1", "B0.2", "B0.3",
                                                "apply0"]
    assert [str(t) for t in sched.tasks[2]] == ["F2.0", "B2.0", "F2.1", "B2.1", "F2.2", "B2.2", "F2.3", "B2.3",
                                                "apply2"]


@pytest.mark.parametrize("P,v,B", [(2, 2, 4), (4, 2, 8), (2, 3, 2), (4, 4, 16), (3, 2, 6)])
def test_interleaved(P, v, B):
    sched = make_schedule("interleaved_1f1b", P * v, B, num_meshes=P, durations=UNIT)
    check_schedule(sched)
    assert sched.num_meshes == P and sched.num_stages == P * v
    assert all(t.stage % P == p for p, ts in enumerate(sched.tasks) for t in ts)
    plain = make_schedule("1f1b", P, B, durations=TaskDurations(forward=float(v), backward=float(v)))
    # Each mesh does the same work as a 1F1B mesh running all v chunks back to back, with a smaller bubble.
    assert sched.bubble_fraction < plain.bubble_fraction
    assert sched.makespan < plain.makespan
    assert all(n <= min(B * v, (P - p - 1) * 2 + (v - 1) * P + 1) for p, n in enumerate(sched.in_flight))


def test_interleaved_errors():
    with pytest.raises(ScheduleError, match="multiple of the number of meshes"):
        make_schedule("interleaved_1f1b", 4, 3, num_meshes=2)
    with pytest.raises(ScheduleError, match="must divide num_stages"):
        make_schedule("interleaved_1f1b", 5, 4, num_meshes=2)


def test_checker_catches_broken_timelines():
    sched = make_schedule("1f1b", 3, 2)
    entries = list(sched.timeline.entries)
    j = next(i for i, e in enumerate(entries) if e.task == Task("forward", 1, 0))
    entries[j] = dataclasses.replace(entries[j], start=0.0, end=1.0)      # before F0.0 has finished
    bad = dataclasses.replace(sched.timeline, entries=tuple(entries))
    with pytest.raises(ScheduleError, match="F1.0 starts at 0 before F0.0"):
        check_schedule(sched, bad)
    k = next(i for i, e in enumerate(entries) if e.task == Task("apply", 2))
    entries = list(sched.timeline.entries)
    entries[k] = TimedTask(Task("apply", 2), 2, 0.0, 0.0)
    with pytest.raises(ScheduleError, match="apply2 starts at 0 before B2"):
        check_schedule(sched, dataclasses.replace(sched.timeline, entries=tuple(entries)))


def test_deadlocked_lists_are_rejected():
    good = make_schedule("1f1b", 2, 2)
    # Mesh 1 wants the backward of micro-batch 1 before running its forward: no order can satisfy that.
    swapped = (good.tasks[0], (Task("backward", 1, 1),) + tuple(t for t in good.tasks[1] if t != Task("backward", 1, 1)))
    with pytest.raises(ScheduleError, match="deadlock: .*mesh 1 waits at B1.1"):
        dataclasses.replace(good, tasks=swapped).simulate(UNIT)
    missing = (good.tasks[0][:-1], good.tasks[1])
    with pytest.raises(ScheduleError, match="missing"):
        dataclasses.replace(good, tasks=missing).simulate(UNIT)


@pytest.mark.parametrize("kind,S,B,match", [
    ("pipedream", 2, 2, "expected one of"),
    ("1f1b", 0, 2, "num_stages=0"),
    ("gpipe", 2, 0, "num_micro_batches=0"),
    ("1f1b", 2, 2, "num_meshes must be num_stages"),
])
def test_bad_requests(kind, S, B, match):
    with pytest.raises(ScheduleError, match=match):
        make_schedule(kind, S, B, num_meshes=3 if "num_meshes" in match else None)


def test_durations_per_stage():
    sched = make_schedule("gpipe", 2, 2, durations=TaskDurations(forward=(1.0, 3.0), backward=(2.0, 6.0)))
    # The slow stage sets the pace: F1.* back to back, then B1.* back to back.
    assert sched.makespan == pytest.approx(1 + 3 + 3 + 6 + 6 + 2)
    with pytest.raises(ScheduleError, match="has 3 entries for 2 stages"):
        make_schedule("gpipe", 2, 2, durations=TaskDurations(forward=(1.0, 1.0, 1.0)))


def test_plot_schedule(tmp_path):
    for kind, S, B, P in (("1f1b", 4, 8, None), ("interleaved_1f1b", 4, 4, 2)):
        path = plot_schedule(make_schedule(kind, S, B, num_meshes=P), str(tmp_path / f"{kind}.png"))
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000

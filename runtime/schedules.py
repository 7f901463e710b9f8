"""Pipeline schedules: which stage task each mesh runs, in what order, and how long that takes.

A schedule is a per-mesh ordered list of tasks — forward / backward of one micro-batch on one
stage, and one apply (the optimizer update) per stage. Kinds:
- "gpipe": every forward, then every backward; a stage holds all B micro-batches' activations.
- "1f1b" (default, PipeDream-flush): stage s runs min(S - s - 1, B) warm-up forwards, then
  alternates one forward and one backward, then drains; it holds at most min(S - s, B).
- "interleaved_1f1b" (Megatron-LM's virtual stages): num_stages virtual stages over fewer meshes,
  stage k on mesh k % num_meshes, so each mesh runs several chunks and the bubble shrinks by the
  number of chunks. Needs num_micro_batches to be a multiple of num_meshes.

The timeline runs each mesh's list in order, every task as soon as its inputs exist (forward
s,m after forward s-1,m; backward s,m after forward s,m and backward s+1,m; apply s after every
backward of s) — so the bubble fraction is derived from the lists, not assumed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

TaskKind = Literal["forward", "backward", "apply"]
ScheduleKind = Literal["1f1b", "gpipe", "interleaved_1f1b"]
SCHEDULE_KINDS = ("1f1b", "gpipe", "interleaved_1f1b")


class ScheduleError(ValueError):
    """A schedule request that cannot be built, or a schedule that breaks a dependency."""


@dataclass(frozen=True, order=True)
class Task:
    """forward / backward of `micro_batch` on `stage`, or the stage's apply (micro_batch None)."""

    kind: TaskKind
    stage: int
    micro_batch: int | None = None

    def __str__(self) -> str:
        return f"apply{self.stage}" if self.kind == "apply" else f"{self.kind[0].upper()}{self.stage}.{self.micro_batch}"


@dataclass(frozen=True)
class TaskDurations:
    """Seconds (or any unit) per task: one number for every stage, or one per stage.

    transfer is added to every dependency that crosses meshes.
    """

    forward: float | tuple[float, ...] = 1.0
    backward: float | tuple[float, ...] = 2.0
    apply: float | tuple[float, ...] = 0.0
    transfer: float = 0.0

    def of(self, task: Task) -> float:
        v = getattr(self, task.kind)
        return float(v if isinstance(v, (int, float)) else v[task.stage])


@dataclass(frozen=True)
class TimedTask:
    task: Task
    mesh: int
    start: float
    end: float


@dataclass(frozen=True)
class Timeline:
    """When each task runs. bubble_fraction = idle share of num_meshes x makespan."""

    entries: tuple[TimedTask, ...]
    makespan: float
    bubble_fraction: float
    durations: TaskDurations


@dataclass(frozen=True)
class Schedule:
    """Per-mesh ordered task lists (tasks[mesh]) and the timeline they produce.

    num_stages counts pipeline stages (virtual stages for interleaved 1F1B); stage k runs on
    mesh k % num_meshes, so for "gpipe" and "1f1b" mesh and stage coincide.
    """

    kind: str
    num_stages: int
    num_meshes: int
    num_micro_batches: int
    tasks: tuple[tuple[Task, ...], ...]
    timeline: Timeline = field(repr=False)

    def mesh_of(self, stage: int) -> int:
        return stage % self.num_meshes

    @property
    def makespan(self) -> float:
        return self.timeline.makespan

    @property
    def bubble_fraction(self) -> float:
        return self.timeline.bubble_fraction

    @property
    def in_flight(self) -> tuple[int, ...]:
        """Per mesh: the most micro-batch activations (over all its stages) held at once."""
        return tuple(_peak(ts, None) for ts in self.tasks)

    @property
    def stage_in_flight(self) -> tuple[int, ...]:
        """Per stage: the most of its micro-batches between forward and backward at once."""
        return tuple(_peak(self.tasks[self.mesh_of(s)], s) for s in range(self.num_stages))

    def simulate(self, durations: TaskDurations) -> Timeline:
        """The timeline of these task lists under other durations (e.g. predicted stage latencies)."""
        return simulate(self.tasks, self.num_meshes, durations)


def _peak(tasks: Sequence[Task], stage: int | None) -> int:
    held = peak = 0
    for t in tasks:
        if stage is not None and t.stage != stage:
            continue
        held += 1 if t.kind == "forward" else -1 if t.kind == "backward" else 0
        peak = max(peak, held)
    return peak


def make_schedule(kind: ScheduleKind, num_stages: int, num_micro_batches: int, *,
                  num_meshes: int | None = None, durations: TaskDurations | None = None) -> Schedule:
    """Build a schedule; num_meshes only for "interleaved_1f1b" (default num_stages // 2)."""
    for name, v in (("num_stages", num_stages), ("num_micro_batches", num_micro_batches)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ScheduleError(f"{name}={v!r}: expected a positive integer")
    S, B = num_stages, num_micro_batches
    if kind == "interleaved_1f1b":
        P = num_meshes if num_meshes is not None else max(1, S // 2)
        if not isinstance(P, int) or P < 1 or S % P:
            raise ScheduleError(f"interleaved_1f1b: num_meshes={P!r} must divide num_stages={S} (each mesh runs "
                                "num_stages / num_meshes chunks)")
        if B % P:
            raise ScheduleError(f"interleaved_1f1b needs num_micro_batches ({B}) to be a multiple of the number of "
                                f"meshes ({P}); use {B + (-B) % P} micro-batches or the 1f1b schedule")
        lists = [_interleaved(r, P, S // P, B) for r in range(P)]
    elif kind in ("1f1b", "gpipe"):
        if num_meshes not in (None, S):
            raise ScheduleError(f"{kind}: one stage per mesh, so num_meshes must be num_stages ({S}), not {num_meshes}")
        P = S
        lists = [(_gpipe if kind == "gpipe" else _one_f_one_b)(s, S, B) for s in range(S)]
    else:
        raise ScheduleError(f"pipeline schedule {kind!r}: expected one of {SCHEDULE_KINDS}")
    tasks = tuple(tuple(ts) for ts in lists)
    durations = durations or TaskDurations()
    _check_durations(durations, S)
    return Schedule(kind, S, P, B, tasks, simulate(tasks, P, durations))


def _gpipe(s: int, S: int, B: int) -> list[Task]:
    return ([Task("forward", s, m) for m in range(B)] + [Task("backward", s, m) for m in range(B)]
            + [Task("apply", s)])


def _one_f_one_b(s: int, S: int, B: int) -> list[Task]:
    warm = min(S - s - 1, B)
    out = [Task("forward", s, m) for m in range(warm)]
    for j in range(B - warm):
        out += [Task("forward", s, warm + j), Task("backward", s, j)]
    out += [Task("backward", s, m) for m in range(B - warm, B)]
    return out + [Task("apply", s)]


def _interleaved(r: int, P: int, v: int, B: int) -> list[Task]:
    """Mesh r of P with v chunks: chunk c is stage c * P + r. Micro-batches go in groups of P."""
    total = B * v

    def step(i: int, backward: bool) -> Task:
        chunk = (i // P) % v
        if backward:
            chunk = v - 1 - chunk
        m = (i // (P * v)) * P + i % P
        return Task("backward" if backward else "forward", chunk * P + r, m)

    warm = min((P - r - 1) * 2 + (v - 1) * P, total)
    out = [step(i, False) for i in range(warm)]
    for j in range(total - warm):
        out += [step(warm + j, False), step(j, True)]
    out += [step(i, True) for i in range(total - warm, total)]
    return out + [Task("apply", c * P + r) for c in range(v)]


def _check_durations(d: TaskDurations, S: int) -> None:
    for name in ("forward", "backward", "apply"):
        v = getattr(d, name)
        vals = [v] if isinstance(v, (int, float)) else list(v)
        if not isinstance(v, (int, float)) and len(vals) != S:
            raise ScheduleError(f"TaskDurations.{name} has {len(vals)} entries for {S} stages")
        if any(not (x >= 0) for x in vals):
            raise ScheduleError(f"TaskDurations.{name}={v!r}: durations must be >= 0")
    if not d.transfer >= 0:
        raise ScheduleError(f"TaskDurations.transfer={d.transfer!r}: must be >= 0")


def dependencies(task: Task, num_stages: int, num_micro_batches: int) -> list[Task]:
    """The tasks whose results `task` needs."""
    s, m = task.stage, task.micro_batch
    if task.kind == "forward":
        return [Task("forward", s - 1, m)] if s > 0 else []
    if task.kind == "backward":
        return [Task("forward", s, m)] + ([Task("backward", s + 1, m)] if s + 1 < num_stages else [])
    return [Task("backward", s, mb) for mb in range(num_micro_batches)]


def simulate(tasks: Sequence[Sequence[Task]], num_meshes: int, durations: TaskDurations) -> Timeline:
    """Run each mesh's list in order, every task as early as its inputs allow."""
    S = 1 + max(t.stage for ts in tasks for t in ts)
    B = 1 + max(t.micro_batch for ts in tasks for t in ts if t.micro_batch is not None)
    _check_task_lists(tasks, num_meshes, S, B)
    end: dict[Task, float] = {}
    mesh_of: dict[Task, int] = {t: p for p, ts in enumerate(tasks) for t in ts}
    pos, free, entries = [0] * num_meshes, [0.0] * num_meshes, []
    remaining = sum(len(ts) for ts in tasks)
    while remaining:
        progressed = False
        for p in range(num_meshes):
            while pos[p] < len(tasks[p]):
                t = tasks[p][pos[p]]
                deps = dependencies(t, S, B)
                if any(d not in end for d in deps):
                    break
                start = max([free[p]] + [end[d] + (durations.transfer if mesh_of[d] != p else 0.0) for d in deps])
                end[t] = free[p] = start + durations.of(t)
                entries.append(TimedTask(t, p, start, end[t]))
                pos[p] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = ", ".join(f"mesh {p} waits at {tasks[p][pos[p]]}" for p in range(num_meshes) if pos[p] < len(tasks[p]))
            raise ScheduleError(f"the task lists deadlock: {stuck}")
    makespan = max((e.end for e in entries), default=0.0)
    busy = sum(e.end - e.start for e in entries)
    bubble = 0.0 if makespan == 0 else 1.0 - busy / (num_meshes * makespan)
    return Timeline(tuple(sorted(entries, key=lambda e: (e.start, e.mesh))), makespan, bubble, durations)


def _check_task_lists(tasks, num_meshes, S, B) -> None:
    if len(tasks) != num_meshes:
        raise ScheduleError(f"{len(tasks)} task lists for {num_meshes} meshes")
    want = {Task(k, s, m) for s in range(S) for m in range(B) for k in ("forward", "backward")}
    want |= {Task("apply", s) for s in range(S)}
    seen: set[Task] = set()
    for p, ts in enumerate(tasks):
        for t in ts:
            if t in seen:
                raise ScheduleError(f"{t} appears twice")
            if t.stage % num_meshes != p:
                raise ScheduleError(f"{t} is on mesh {p}, but stage {t.stage} runs on mesh {t.stage % num_meshes}")
            seen.add(t)
    if seen != want:
        missing = sorted(want - seen)[:4]
        extra = sorted(seen - want)[:4]
        raise ScheduleError(f"the task lists must hold every forward/backward of {S} stages x {B} micro-batches and "
                            f"one apply per stage: missing {[str(t) for t in missing]}, unexpected {[str(t) for t in extra]}")


def check_schedule(schedule: Schedule, timeline: Timeline | None = None) -> None:
    """Raise ScheduleError unless the timeline keeps every dependency and each mesh's list order.

    Independent of `simulate`: it only reads the timeline's start and end times.
    """
    tl = timeline or schedule.timeline
    _check_task_lists(schedule.tasks, schedule.num_meshes, schedule.num_stages, schedule.num_micro_batches)
    at = {e.task: e for e in tl.entries}
    if len(at) != len(tl.entries) or set(at) != {t for ts in schedule.tasks for t in ts}:
        raise ScheduleError("the timeline does not list every task of the schedule exactly once")
    eps = 1e-9
    for p, ts in enumerate(schedule.tasks):
        for a, b in zip(ts, ts[1:]):
            if at[b].start < at[a].end - eps:
                raise ScheduleError(f"mesh {p}: {b} starts at {at[b].start:g} before {a} (earlier in its list) ends "
                                    f"at {at[a].end:g}")
        for t in ts:
            if at[t].mesh != p:
                raise ScheduleError(f"{t} is timed on mesh {at[t].mesh} but listed on mesh {p}")
            for d in dependencies(t, schedule.num_stages, schedule.num_micro_batches):
                if at[t].start < at[d].end - eps:
                    raise ScheduleError(f"{t} starts at {at[t].start:g} before {d}, which it needs, ends at {at[d].end:g}")


_COLORS = {"forward": "#4c78a8", "backward": "#f58518", "apply": "#54a24b"}


def plot_schedule(schedule: Schedule, path: str, timeline: Timeline | None = None, title: str | None = None) -> str:
    """Write the timeline as a PNG: one row per mesh, a labelled block per task. Returns path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    tl = timeline or schedule.timeline
    P = schedule.num_meshes
    fig = Figure(figsize=(max(6.0, min(24.0, 0.35 * len(tl.entries) / max(P, 1) + 3)), 0.6 * P + 1.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    chunks = schedule.num_stages // P
    for e in tl.entries:
        width = e.end - e.start
        y = P - 1 - e.mesh
        ax.broken_barh([(e.start, width)], (y + 0.1, 0.8), facecolors=_COLORS[e.task.kind],
                       edgecolors="white", linewidth=0.5)
        if width > 0:
            label = "A" if e.task.kind == "apply" else str(e.task.micro_batch)
            if chunks > 1 and e.task.kind != "apply":
                label += f"/{e.task.stage // P}"
            ax.text(e.start + width / 2, y + 0.5, label, ha="center", va="center", fontsize=7, color="white")
    ax.set_yticks([P - 1 - p + 0.5 for p in range(P)], [f"mesh {p}" for p in range(P)])
    ax.set_xlim(0, tl.makespan or 1)
    ax.set_ylim(0, P)
    ax.set_xlabel("time")
    ax.set_title(title or f"{schedule.kind}: {schedule.num_stages} stages, {schedule.num_micro_batches} micro-batches, "
                          f"bubble {tl.bubble_fraction:.1%}", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=k) for k, c in _COLORS.items()], loc="upper center",
              bbox_to_anchor=(0.5, -0.35 if P < 3 else -0.15), ncol=3, fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    return path

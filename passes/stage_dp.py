"""Stage construction: which layers form each pipeline stage, and on which sub-mesh it runs.

Alpa's inter-operator DP (OSDI'22, §5.2), plus what Alpa leaves out: the cross-mesh transfer
time between consecutive stages is part of the objective. Pure Python + numpy; the costs come
from callbacks, so the same solver serves the real intra-op planner and synthetic tests.

Problem. `num_layers` layers in order; a cluster of `num_hosts` x `devices_per_host` devices;
`num_micro_batches` = B. A plan cuts the layers into contiguous stages, gives each stage a
sub-mesh (1 x 2^k devices inside one host, or n whole hosts) and one of the logical shapes the
cost callback offers for it, such that the sub-meshes tile the cluster exactly. Its cost is

    sum(stage latencies) + (B - 1) * max(stage latency) + sum(transfer between consecutive stages)

(the first two terms are Alpa's pipeline latency; a stage latency is one micro-batch's forward +
backward on its sub-mesh). A stage's memory is `memory_bytes + in_flight * activation bytes`,
where 1F1B keeps min(B, S - s) micro-batches in flight on stage s of S and GPipe keeps B; it must
not exceed `memory_capacity` (bytes per device).

Algorithm. For a bound t on the slowest stage, a DP over (first layer, stages left, devices
left, sub-mesh of the first stage) gives the least `sum(latencies) + sum(transfers)` using only
stage candidates with latency <= t: DP(t). The optimum is min over candidate latencies t of
DP(t) + (B - 1) * t. Instead of Alpa's sweep over every t, a best-first branch and bound over the
sorted candidates evaluates DP only where `DP(t_hi) + (B - 1) * t_lo` (a lower bound for the whole
interval [t_lo, t_hi], since DP is non-increasing in t) can still beat the best plan found —
exact up to a relative 1e-9. The "stages left" dimension only matters while memory feasibility
depends on it; beyond that point all stage counts share one state, so without a memory limit
(or under GPipe) the DP has no stage dimension at all.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence

import numpy as np

ScheduleName = Literal["1f1b", "gpipe"]
_SCHEDULES = ("1f1b", "gpipe")
_REL_TOL = 1e-9


class StageOptionError(ValueError):
    """A stage option or stage problem that cannot be planned; the message says what to change."""


@dataclass(frozen=True, order=True)
class Submesh:
    """A physical sub-mesh shape: `num_hosts` x `devices_per_host` (1 x k inside one host)."""

    num_hosts: int
    devices_per_host: int

    @property
    def num_devices(self) -> int:
        return self.num_hosts * self.devices_per_host

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_hosts, self.devices_per_host)

    def __str__(self) -> str:
        return f"{self.num_hosts}x{self.devices_per_host}"


@dataclass(frozen=True)
class StageCandidate:
    """One way to run layers [start, end) on a sub-mesh, as priced by the intra-op planner.

    latency: seconds of one micro-batch's forward + backward. memory_bytes: per device, held
    regardless of micro-batches (parameters, gradients, optimizer state, workspace).
    activation_bytes_per_micro_batch: per device, kept from a forward until its backward.
    options: the planner's settings for this candidate (e.g. auto-sharding options), passed through.
    remat: the backward recomputes the forward (passes/rematerialize.py); its latency and memory
    are priced so, and the plan runs it so when the DP picks this candidate.
    """

    logical_shape: tuple[int, ...]
    latency: float
    memory_bytes: float
    activation_bytes_per_micro_batch: float
    options: Mapping[str, object] = field(default_factory=dict, compare=False)
    remat: bool = False


@dataclass(frozen=True)
class StageChoice:
    """One stage of a plan: layers [start, end), where it runs, and its predicted cost.

    latency / memory are None when the plan was made without a cost callback; memory counts
    `in_flight` micro-batches of activations under the schedule. remat: the chosen candidate
    recomputes the forward in the backward (StageCandidate.remat).
    """

    layers: tuple[int, int]
    submesh: Submesh
    logical_shape: tuple[int, ...]
    latency: float | None
    memory: float | None
    in_flight: int
    device_ids: tuple[int, ...]
    options: Mapping[str, object] = field(default_factory=dict, compare=False)
    remat: bool = False

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return tuple(range(*self.layers))


@dataclass(frozen=True)
class SolveStats:
    """How the DP went: wall time, callback calls, and how many bounds t were evaluated."""

    seconds: float
    stage_cost_calls: int
    transfer_cost_calls: int
    latency_candidates: int
    dp_evaluations: int
    stage_buckets: int


@dataclass(frozen=True)
class StageSolution:
    """A pipeline plan. objective = sum_latency + (B - 1) * max_latency + transfer_time."""

    stages: tuple[StageChoice, ...]
    num_micro_batches: int
    schedule: str
    objective: float | None
    sum_latency: float | None
    max_latency: float | None
    transfer_time: float | None
    stats: SolveStats | None = None

    @property
    def forward_stage_layer_ids(self) -> list[list[int]]:
        return [list(s.layer_ids) for s in self.stages]

    @property
    def submesh_physical_shapes(self) -> list[tuple[int, int]]:
        return [s.submesh.shape for s in self.stages]

    @property
    def submesh_logical_shapes(self) -> list[tuple[int, ...]]:
        return [s.logical_shape for s in self.stages]


StageCostFn = Callable[[int, int, Submesh], Sequence[StageCandidate]]
TransferCostFn = Callable[[int, Submesh, Submesh], float]


class StageCostCache:
    """Calls `fn(start, end, submesh)` once per distinct argument triple (the planner is costly)."""

    def __init__(self, fn: StageCostFn):
        self.fn = fn
        self.table: dict[tuple[int, int, Submesh], tuple[StageCandidate, ...]] = {}
        self.calls = 0

    def __call__(self, start: int, end: int, submesh: Submesh) -> tuple[StageCandidate, ...]:
        key = (start, end, submesh)
        if key not in self.table:
            self.calls += 1
            self.table[key] = _check_candidates(self.fn(start, end, submesh), start, end, submesh)
        return self.table[key]


# ---------------------------------------------------------------------------------------------
# Sub-meshes, logical shapes, placement


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def submesh_choices(num_hosts: int, devices_per_host: int,
                    space: Literal["power_of_two", "all"] = "power_of_two") -> tuple[Submesh, ...]:
    """Alpa's physical sub-mesh shapes: 1 x 2^k inside a host, then whole hosts.

    Sub-host shapes are offered only when devices_per_host is a power of two (otherwise they
    may not pack into hosts). Whole hosts: n = 2, 4, 8, ... ("power_of_two") or every n ("all").
    """
    _check_cluster(num_hosts, devices_per_host)
    if space not in ("power_of_two", "all"):
        raise StageOptionError(f"submesh space {space!r}: expected 'power_of_two' or 'all'")
    shapes = []
    if _is_power_of_two(devices_per_host):
        k = 1
        while k < devices_per_host:
            shapes.append(Submesh(1, k))
            k *= 2
    shapes.append(Submesh(1, devices_per_host))
    n = 2
    while n <= num_hosts:
        shapes.append(Submesh(n, devices_per_host))
        n = n + 1 if space == "all" else n * 2
    return tuple(shapes)


def logical_shape_choices(submesh: Submesh,
                          space: Literal["single_node_model_parallel", "all", "same_as_physical",
                                         "data_parallel_only", "model_parallel_only"] = "single_node_model_parallel",
                          batch_size: int | None = None) -> tuple[tuple[int, int], ...]:
    """(data, model) logical shapes of a sub-mesh, as in Alpa's logical-shape spaces.

    "single_node_model_parallel": model-parallel degree mp divides the device count and stays
    inside one host; "all": any divisor. With batch_size, the data-parallel degree must divide it.
    """
    n = submesh.num_devices
    if space == "same_as_physical":
        return (submesh.shape,)
    if space == "data_parallel_only":
        return ((n, 1),)
    if space == "model_parallel_only":
        return ((1, n),)
    if space not in ("single_node_model_parallel", "all"):
        raise StageOptionError(f"logical shape space {space!r}: expected 'single_node_model_parallel', "
                               "'all', 'same_as_physical', 'data_parallel_only' or 'model_parallel_only'")
    limit = n if space == "all" else submesh.devices_per_host
    out = [(n // mp, mp) for mp in range(1, n + 1)
           if n % mp == 0 and mp <= limit and (batch_size is None or batch_size % (n // mp) == 0)]
    return tuple(out)


def place_submeshes(submeshes: Sequence[Submesh], num_hosts: int, devices_per_host: int) -> tuple[tuple[int, ...], ...]:
    """Global device ids (host * devices_per_host + local index) of each sub-mesh, in order.

    Whole-host sub-meshes take consecutive free hosts; 1 x k ones take k free devices of one
    host. Stage order is tried first (stage 0 on the lowest ids); if that leaves a gap,
    largest-first, which always packs power-of-two shapes that add up to the cluster.
    """
    for s in submeshes:
        _check_submesh(s, num_hosts, devices_per_host)
    total = sum(s.num_devices for s in submeshes)
    if total != num_hosts * devices_per_host:
        raise StageOptionError(
            f"the sub-meshes {[str(s) for s in submeshes]} use {total} devices but the cluster has "
            f"{num_hosts * devices_per_host} ({num_hosts} hosts x {devices_per_host}); sub-meshes must tile "
            "the cluster exactly")
    orders = [list(range(len(submeshes))),
              sorted(range(len(submeshes)), key=lambda j: -submeshes[j].num_devices)]
    for order in orders:
        placed = _first_fit(submeshes, order, num_hosts, devices_per_host)
        if placed is not None:
            return placed
    raise StageOptionError(
        f"the sub-meshes {[str(s) for s in submeshes]} add up to the cluster but cannot be packed into "
        f"{num_hosts} hosts of {devices_per_host} devices; use 1 x 2^k shapes inside a host or whole hosts")


def _first_fit(submeshes, order, num_hosts, devices_per_host):
    free = [list(range(h * devices_per_host, (h + 1) * devices_per_host)) for h in range(num_hosts)]
    placed: list[tuple[int, ...] | None] = [None] * len(submeshes)
    for j in order:
        s = submeshes[j]
        if s.num_hosts > 1 or s.devices_per_host == devices_per_host:
            run = _free_hosts(free, s.num_hosts, devices_per_host)
            if run is None:
                return None
            placed[j] = tuple(d for h in run for d in free[h])
            for h in run:
                free[h] = []
        else:
            host = next((h for h in range(num_hosts) if len(free[h]) >= s.devices_per_host), None)
            if host is None:
                return None
            placed[j] = tuple(free[host][:s.devices_per_host])
            free[host] = free[host][s.devices_per_host:]
    return tuple(placed)  # type: ignore[arg-type]


def _free_hosts(free, n, devices_per_host):
    whole = [h for h in range(len(free)) if len(free[h]) == devices_per_host]
    for a in range(len(whole) - n + 1):
        if whole[a + n - 1] - whole[a] == n - 1:
            return whole[a:a + n]
    return whole[:n] if len(whole) >= n else None


def _check_cluster(num_hosts: int, devices_per_host: int) -> None:
    for name, v in (("num_hosts", num_hosts), ("devices_per_host", devices_per_host)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise StageOptionError(f"{name}={v!r}: expected a positive integer")


def _check_submesh(s: Submesh, num_hosts: int, devices_per_host: int) -> None:
    ok = (s.num_hosts == 1 and 1 <= s.devices_per_host <= devices_per_host) or \
         (1 <= s.num_hosts <= num_hosts and s.devices_per_host == devices_per_host)
    if not ok:
        raise StageOptionError(
            f"sub-mesh {s.shape} does not fit a cluster of {num_hosts} hosts x {devices_per_host} devices: use "
            f"(1, k) with k <= {devices_per_host} inside one host, or (n, {devices_per_host}) with n <= {num_hosts}")


def _check_candidates(cands, start, end, submesh) -> tuple[StageCandidate, ...]:
    out = []
    for c in cands:
        where = f"stage_cost({start}, {end}, {submesh})"
        if not isinstance(c, StageCandidate):
            raise StageOptionError(f"{where} returned {type(c).__name__}; expected StageCandidate objects")
        if math.prod(c.logical_shape) != submesh.num_devices:
            raise StageOptionError(f"{where}: logical shape {c.logical_shape} has {math.prod(c.logical_shape)} "
                                   f"devices, the sub-mesh {submesh.num_devices}")
        for name in ("latency", "memory_bytes", "activation_bytes_per_micro_batch"):
            v = getattr(c, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise StageOptionError(f"{where}: {name}={v!r}; expected a finite number >= 0 (return no "
                                       "candidate for a stage that cannot run)")
        out.append(c)
    return tuple(out)


def in_flight(schedule: str, stage: int, num_stages: int, num_micro_batches: int) -> int:
    """Micro-batches whose activations a stage holds at its peak: 1F1B min(B, S - s), GPipe B."""
    if schedule == "gpipe":
        return num_micro_batches
    return min(num_micro_batches, num_stages - stage)


def pipeline_objective(latencies: Sequence[float], transfers: Sequence[float], num_micro_batches: int) -> float:
    """sum(latencies) + (B - 1) * max(latencies) + sum(transfers)."""
    return sum(latencies) + (num_micro_batches - 1) * max(latencies) + sum(transfers)


# ---------------------------------------------------------------------------------------------
# The DP


@dataclass
class _Tables:
    """Stage candidates as dense arrays [start, end, submesh, candidate], sorted by latency."""

    lat: np.ndarray          # inf where absent
    fixed: np.ndarray        # memory_bytes
    act: np.ndarray          # activation bytes per micro-batch
    cands: dict              # (i, k, m) -> tuple of candidates in the sorted order
    transfer: np.ndarray     # [boundary layer, submesh before, submesh after]


def solve_stages(num_layers: int, num_hosts: int, devices_per_host: int, num_micro_batches: int,
                 stage_cost: StageCostFn, *, transfer_cost: TransferCostFn | None = None,
                 memory_capacity: float | None = None, schedule: ScheduleName = "1f1b",
                 submeshes: Sequence[Submesh] | None = None) -> StageSolution:
    """The plan with the least pipeline time (see the module docstring); exact.

    stage_cost(start, end, submesh) lists the candidates for layers [start, end) on a sub-mesh
    (one per logical shape; none if it cannot run there); it is called once per triple.
    transfer_cost(boundary, before, after): seconds to move one micro-batch's values across the
    cut before layer `boundary` (forward and backward together) from a stage on sub-mesh `before`
    to one on `after`; None means free. submeshes defaults to `submesh_choices(...)`; a custom
    list may hold whole hosts and, when devices_per_host is a power of two, 1 x 2^k shapes.
    """
    t0 = time.perf_counter()
    _check_common(num_layers, num_hosts, devices_per_host, num_micro_batches, schedule)
    if memory_capacity is not None and not memory_capacity > 0:
        raise StageOptionError(f"memory_capacity={memory_capacity!r}: expected bytes per device > 0, or None")
    subs = tuple(submeshes) if submeshes is not None else submesh_choices(num_hosts, devices_per_host)
    if not subs:
        raise StageOptionError("no sub-mesh shapes to choose from")
    for s in subs:
        _check_submesh(s, num_hosts, devices_per_host)
        if s.num_hosts == 1 and s.devices_per_host < devices_per_host and not (
                _is_power_of_two(s.devices_per_host) and _is_power_of_two(devices_per_host)):
            raise StageOptionError(
                f"sub-mesh {s}: the DP counts devices, which is exact only when sub-host shapes are 1 x 2^k in hosts "
                f"of 2^n devices (they always pack); use whole hosts, or such shapes")
    cost = stage_cost if isinstance(stage_cost, StageCostCache) else StageCostCache(stage_cost)
    calls_before = cost.calls
    tables, transfer_calls = _build_tables(num_layers, subs, cost, transfer_cost)
    dp = _StageDP(tables, subs, num_layers, num_hosts * devices_per_host, num_micro_batches,
                  memory_capacity, schedule)

    feasible_lat = tables.lat[dp.memok[0]]
    cand = np.unique(feasible_lat[np.isfinite(feasible_lat)])
    if cand.size == 0:
        raise StageOptionError(_no_plan_message(num_layers, num_hosts, devices_per_host, memory_capacity))
    top = dp.run(float(cand[-1]))
    if top is None:
        raise StageOptionError(_no_plan_message(num_layers, num_hosts, devices_per_host, memory_capacity))
    best_obj, best_plan = top[1], top[2]
    evaluations = 1
    b1 = num_micro_batches - 1
    heap = [(top[0] + b1 * float(cand[0]), 0, cand.size - 1, top[0])]
    while heap:
        bound, lo, hi, dp_hi = heapq.heappop(heap)
        if bound >= best_obj * (1 - _REL_TOL) or lo == hi:
            continue
        mid = (lo + hi) // 2
        res = dp.run(float(cand[mid]))
        evaluations += 1
        heapq.heappush(heap, (dp_hi + b1 * float(cand[mid + 1]), mid + 1, hi, dp_hi))
        if res is None:
            continue
        if res[1] < best_obj:
            best_obj, best_plan = res[1], res[2]
        heapq.heappush(heap, (res[0] + b1 * float(cand[lo]), lo, mid, res[0]))

    stats = SolveStats(seconds=time.perf_counter() - t0, stage_cost_calls=cost.calls - calls_before,
                       transfer_cost_calls=transfer_calls, latency_candidates=int(cand.size),
                       dp_evaluations=evaluations, stage_buckets=dp.num_buckets)
    return _solution(best_plan, tables, subs, num_layers, num_hosts, devices_per_host, num_micro_batches,
                     schedule, stats)


def _no_plan_message(num_layers, num_hosts, devices_per_host, memory_capacity) -> str:
    msg = (f"no pipeline plan for {num_layers} layers on {num_hosts} hosts x {devices_per_host} devices: "
           "no sequence of stages tiles the cluster with candidates that the cost callback offers")
    if memory_capacity is not None:
        msg += f" and that fit memory_capacity={memory_capacity:.4g} bytes per device (raise it, use more " \
               "micro-batches with smaller size, the 1f1b schedule, or rematerialization: PipeshardParallel(remat='auto'))"
    return msg


def _build_tables(num_layers, subs, cost, transfer_cost) -> tuple[_Tables, int]:
    L, M = num_layers, len(subs)
    cells = {}
    width = 1
    for i in range(L):
        for k in range(i + 1, L + 1):
            for m, s in enumerate(subs):
                cs = sorted(cost(i, k, s), key=lambda c: (c.latency, c.memory_bytes + c.activation_bytes_per_micro_batch))
                if cs:
                    cells[(i, k, m)] = tuple(cs)
                    width = max(width, len(cs))
    lat = np.full((L + 1, L + 1, M, width), np.inf)
    fixed = np.zeros_like(lat)
    act = np.zeros_like(lat)
    for (i, k, m), cs in cells.items():
        for c, cand in enumerate(cs):
            lat[i, k, m, c] = cand.latency
            fixed[i, k, m, c] = cand.memory_bytes
            act[i, k, m, c] = cand.activation_bytes_per_micro_batch
    transfer = np.zeros((L + 1, M, M))
    calls = 0
    if transfer_cost is not None:
        for b in range(1, L):
            for a, sa in enumerate(subs):
                for c, sc in enumerate(subs):
                    v = transfer_cost(b, sa, sc)
                    calls += 1
                    if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                        raise StageOptionError(f"transfer_cost({b}, {sa}, {sc}) = {v!r}; expected seconds >= 0")
                    transfer[b, a, c] = v
    return _Tables(lat, fixed, act, cells, transfer), calls


class _StageDP:
    """DP(t) for one bound t on the stage latency; see the module docstring.

    State f[b, i, d, m]: least sum(latency) + sum(transfer) over plans of layers [i, L) on d devices
    whose first stage uses sub-mesh m, with `stages left` in bucket b. Buckets 0..NB-2 are exact
    stage counts 1..NB-1; bucket NB-1 holds every count >= NB (memory feasibility no longer
    depends on the count there).
    """

    def __init__(self, tables: _Tables, subs, L, D, B, capacity, schedule):
        self.t, self.subs, self.L, self.D, self.B = tables, subs, L, D, B
        self.sizes = np.array([s.num_devices for s in subs])
        max_stages = min(L, D)
        if capacity is None:
            nb = 1
            self.memok = np.isfinite(tables.lat)[None]
        elif schedule == "gpipe":
            nb = 1
            self.memok = (tables.fixed + B * tables.act <= capacity)[None]
        else:
            # The largest in-flight count each candidate can afford; feasibility changes with the
            # stage count s only at s = afford + 1 for candidates with 1 <= afford < min(B, S).
            with np.errstate(divide="ignore", invalid="ignore"):
                afford = np.floor((capacity - tables.fixed) / tables.act)
            afford = np.where(tables.act == 0, np.where(tables.fixed <= capacity, np.inf, -1), afford)
            afford = np.where(np.isfinite(tables.lat), afford, -1)
            changing = afford[(afford >= 1) & (afford < min(B, max_stages))]
            nb = int(changing.max()) + 1 if changing.size else 1
            counts = np.minimum(np.arange(1, nb + 1), B)
            self.memok = afford[None] >= counts[:, None, None, None, None]
        self.num_buckets = nb
        # Next-state bucket choices for a stage that is not the last: exact count s -> s - 1; the
        # open bucket (>= NB) -> NB - 1 (exact) or itself.
        self.next_buckets = [[b - 1] if b < nb - 1 else ([nb - 2, nb - 1] if nb >= 2 else [0])
                             for b in range(nb)]
        self.next_buckets[0] = [] if nb > 1 else [0]

    def run(self, t_max: float):
        """(DP(t_max), true objective of its plan, plan) or None when nothing fits."""
        tab, L, D, NB, M = self.t, self.L, self.D, self.num_buckets, len(self.subs)
        allowed = self.memok & (tab.lat <= t_max)
        masked = np.where(allowed, tab.lat[None], np.inf)            # [b, i, k, m, c]
        best_c = masked.argmin(axis=-1)
        best = np.take_along_axis(masked, best_c[..., None], axis=-1)[..., 0]   # [b, i, k, m]

        inf = np.inf
        f = np.full((NB, L + 1, D + 1, M), inf)
        arg_k = np.full((NB, L + 1, D + 1, M), -1, dtype=np.int64)
        # gnext[b, k, d, m]: best continuation at layer k for a plan whose stage before k uses
        # sub-mesh m and bucket b, with d devices counted *including* that stage's sub-mesh.
        gnext = np.full((NB, L + 1, D + 1, M), inf)
        arg_next_b = np.zeros((NB, L + 1, D + 1, M), dtype=np.int64)
        arg_next_m = np.zeros((NB, L + 1, D + 1, M), dtype=np.int64)
        d_idx = np.arange(D + 1)
        end_mask = d_idx[:, None] == self.sizes[None, :]               # [d, m]: last stage uses all d
        for i in range(L - 1, -1, -1):
            # Last stage: layers [i, L), only in the bucket that holds a single stage.
            cand = np.full((NB, D + 1, M), inf)
            cand[0] = np.where(end_mask, best[0, i, L][None, :], inf)
            kk = np.full((NB, D + 1, M), L, dtype=np.int64)
            if i + 1 < L:
                tot = best[:, i, i + 1:L, None, :] + gnext[:, i + 1:L]   # [b, k, d, m]
                k_arg = tot.argmin(axis=1)
                k_val = np.take_along_axis(tot, k_arg[:, None], axis=1)[:, 0]
                better = k_val < cand
                cand = np.where(better, k_val, cand)
                kk = np.where(better, k_arg + i + 1, kk)
            f[:, i], arg_k[:, i] = cand, kk
            if i == 0:
                break
            # Continuations entering layer i: g[b, d, m_prev] = min over m of transfer + f.
            g_all = tab.transfer[i][None, None, :, :] + f[:, i][:, :, None, :]   # [b, d, m_prev, m]
            g_m = g_all.argmin(axis=-1)
            g = np.take_along_axis(g_all, g_m[..., None], axis=-1)[..., 0]       # [b, d, m_prev]
            # Shift by the previous stage's size: d counts that stage's devices too.
            shifted = np.full((NB, D + 1, M), inf)
            shifted_m = np.zeros((NB, D + 1, M), dtype=np.int64)
            for m, sz in enumerate(self.sizes):
                shifted[:, sz:, m] = g[:, :D + 1 - sz, m]
                shifted_m[:, sz:, m] = g_m[:, :D + 1 - sz, m]
            for b in range(NB):
                for nb in self.next_buckets[b]:
                    better = shifted[nb] < gnext[b, i]
                    gnext[b, i] = np.where(better, shifted[nb], gnext[b, i])
                    arg_next_b[b, i] = np.where(better, nb, arg_next_b[b, i])
                    arg_next_m[b, i] = np.where(better, shifted_m[nb], arg_next_m[b, i])

        top = f[:, 0, D, :]
        if not np.isfinite(top).any():
            return None
        b, m = np.unravel_index(int(top.argmin()), top.shape)
        value = float(top[b, m])
        plan, i, d = [], 0, D
        while True:
            k = int(arg_k[b, i, d, m])
            plan.append((i, k, int(m), int(best_c[b, i, k, m])))
            if k == L:
                break
            b, m, d = int(arg_next_b[b, k, d, m]), int(arg_next_m[b, k, d, m]), d - int(self.sizes[m])
            i = k
        lats = [float(tab.lat[i, k, m, c]) for i, k, m, c in plan]
        trans = [float(tab.transfer[plan[j + 1][0], plan[j][2], plan[j + 1][2]]) for j in range(len(plan) - 1)]
        return value, pipeline_objective(lats, trans, self.B), plan


def _solution(plan, tables, subs, L, num_hosts, devices_per_host, B, schedule, stats) -> StageSolution:
    submeshes = [subs[m] for _, _, m, _ in plan]
    placed = place_submeshes(submeshes, num_hosts, devices_per_host)
    S = len(plan)
    stages, lats, trans = [], [], []
    for j, (i, k, m, c) in enumerate(plan):
        cand = tables.cands[(i, k, m)][c]
        n = in_flight(schedule, j, S, B)
        stages.append(StageChoice(layers=(i, k), submesh=subs[m], logical_shape=tuple(cand.logical_shape),
                                  latency=cand.latency, memory=cand.memory_bytes + n * cand.activation_bytes_per_micro_batch,
                                  in_flight=n, device_ids=placed[j], options=cand.options, remat=cand.remat))
        lats.append(cand.latency)
        if j + 1 < S:
            trans.append(float(tables.transfer[k, m, plan[j + 1][2]]))
    return StageSolution(stages=tuple(stages), num_micro_batches=B, schedule=schedule,
                         objective=pipeline_objective(lats, trans, B), sum_latency=sum(lats),
                         max_latency=max(lats), transfer_time=sum(trans), stats=stats)


# ---------------------------------------------------------------------------------------------
# Uniform and manual stages


def _evaluate(layer_ranges, submeshes, logical_shapes, options, num_hosts, devices_per_host, B, schedule,
              stage_cost, transfer_cost, memory_capacity) -> StageSolution:
    """A StageSolution for a fixed cut and sub-meshes; costs filled in when stage_cost is given."""
    placed = place_submeshes(submeshes, num_hosts, devices_per_host)
    S = len(layer_ranges)
    cost = None if stage_cost is None else (
        stage_cost if isinstance(stage_cost, StageCostCache) else StageCostCache(stage_cost))
    stages, lats = [], []
    for j, ((i, k), sub) in enumerate(zip(layer_ranges, submeshes)):
        n = in_flight(schedule, j, S, B)
        shape, opts, lat, mem = logical_shapes[j], options[j], None, None
        if cost is not None:
            cands = cost(i, k, sub)
            fits = [c for c in cands if memory_capacity is None
                    or c.memory_bytes + n * c.activation_bytes_per_micro_batch <= memory_capacity]
            if shape is not None:
                fits = [c for c in fits if tuple(c.logical_shape) == tuple(shape)]
            if not fits:
                what = f"logical shape {tuple(shape)}" if shape is not None else "any logical shape"
                raise StageOptionError(
                    f"stage {j} (layers [{i}, {k}) on sub-mesh {sub}): the cost model offers no candidate with "
                    f"{what}" + ("" if memory_capacity is None else
                                 f" that fits memory_capacity={memory_capacity:.4g} bytes per device with {n} "
                                 "micro-batches in flight") + "; change the stage's layers, sub-mesh or logical shape")
            best = min(fits, key=lambda c: (c.latency, c.memory_bytes))
            shape, lat = tuple(best.logical_shape), best.latency
            mem = best.memory_bytes + n * best.activation_bytes_per_micro_batch
            opts = {**best.options, **(opts or {})}
            lats.append(lat)
        stages.append(StageChoice(layers=(i, k), submesh=sub, logical_shape=tuple(shape if shape is not None else sub.shape),
                                  latency=lat, memory=mem, in_flight=n, device_ids=placed[j], options=opts or {},
                                  remat=best.remat if cost is not None else False))
    if cost is None:
        return StageSolution(tuple(stages), B, schedule, None, None, None, None)
    trans = [0.0 if transfer_cost is None else float(transfer_cost(layer_ranges[j + 1][0], submeshes[j], submeshes[j + 1]))
             for j in range(S - 1)]
    return StageSolution(tuple(stages), B, schedule, pipeline_objective(lats, trans, B), sum(lats), max(lats), sum(trans))


def _check_common(num_layers, num_hosts, devices_per_host, num_micro_batches, schedule):
    _check_cluster(num_hosts, devices_per_host)
    if not isinstance(num_layers, int) or num_layers < 1:
        raise StageOptionError(f"num_layers={num_layers!r}: expected a positive integer")
    if not isinstance(num_micro_batches, int) or num_micro_batches < 1:
        raise StageOptionError(f"num_micro_batches={num_micro_batches!r}: expected a positive integer")
    if schedule not in _SCHEDULES:
        raise StageOptionError(f"schedule={schedule!r}: expected one of {_SCHEDULES}")


def _check_stage_count(num_stages, num_layers, num_devices):
    if num_stages > num_layers:
        raise StageOptionError(f"{num_stages} stages but only {num_layers} layers: every stage needs at least one "
                               "layer; use fewer stages or more layers (AutoLayerOption(layer_num=...))")
    if num_stages > num_devices:
        raise StageOptionError(f"{num_stages} stages but only {num_devices} devices: every stage needs its own "
                               "device; use fewer stages")


def uniform_stages(num_layers: int, num_hosts: int, devices_per_host: int, num_micro_batches: int = 1, *,
                   num_stages: int | None = None, submesh: Submesh | tuple[int, int] | None = None,
                   logical_shape: tuple[int, ...] | None = None, stage_cost: StageCostFn | None = None,
                   transfer_cost: TransferCostFn | None = None, memory_capacity: float | None = None,
                   schedule: ScheduleName = "1f1b") -> StageSolution:
    """Equal layer counts on equal sub-meshes (UniformStageOption).

    num_stages defaults to the cluster size over the sub-mesh size when a sub-mesh is given, else
    to num_layers. Layer counts differ by at most one (the first stages take the extra layers).
    The logical shape is the given one, else the fastest candidate of stage_cost, else the
    physical shape.
    """
    _check_common(num_layers, num_hosts, devices_per_host, num_micro_batches, schedule)
    D = num_hosts * devices_per_host
    if submesh is not None:
        submesh = submesh if isinstance(submesh, Submesh) else Submesh(*submesh)
        _check_submesh(submesh, num_hosts, devices_per_host)
        if D % submesh.num_devices:
            raise StageOptionError(f"sub-mesh {submesh} ({submesh.num_devices} devices) does not divide the "
                                   f"cluster's {D} devices")
        if num_stages is None:
            num_stages = D // submesh.num_devices
    if num_stages is None:
        num_stages = num_layers
    if not isinstance(num_stages, int) or num_stages < 1:
        raise StageOptionError(f"num_stages={num_stages!r}: expected a positive integer")
    _check_stage_count(num_stages, num_layers, D)
    if submesh is None:
        per = D // num_stages
        if D % num_stages:
            raise StageOptionError(f"{D} devices cannot be split into {num_stages} equal sub-meshes; choose "
                                   f"num_stages dividing {D}")
        submesh = Submesh(1, per) if per <= devices_per_host else Submesh(per // devices_per_host, devices_per_host)
        if submesh.num_devices != per:
            raise StageOptionError(f"{num_stages} equal sub-meshes of {per} devices do not fit hosts of "
                                   f"{devices_per_host} devices; choose num_stages so that each sub-mesh is part of "
                                   "one host or whole hosts")
        _check_submesh(submesh, num_hosts, devices_per_host)
    elif num_stages * submesh.num_devices != D:
        raise StageOptionError(f"{num_stages} stages on sub-mesh {submesh} use {num_stages * submesh.num_devices} "
                               f"devices, the cluster has {D}; sub-meshes must tile the cluster exactly")
    if logical_shape is not None and math.prod(logical_shape) != submesh.num_devices:
        raise StageOptionError(f"logical shape {tuple(logical_shape)} has {math.prod(logical_shape)} devices, "
                               f"the sub-mesh {submesh} has {submesh.num_devices}")
    q, r = divmod(num_layers, num_stages)
    bounds = np.cumsum([0] + [q + (1 if j < r else 0) for j in range(num_stages)])
    ranges = [(int(bounds[j]), int(bounds[j + 1])) for j in range(num_stages)]
    return _evaluate(ranges, [submesh] * num_stages, [logical_shape] * num_stages, [None] * num_stages,
                     num_hosts, devices_per_host, num_micro_batches, schedule, stage_cost, transfer_cost,
                     memory_capacity)


def validate_manual_stages(num_layers: int, num_hosts: int, devices_per_host: int,
                           forward_stage_layer_ids: Sequence[Sequence[int]],
                           submesh_physical_shapes: Sequence[tuple[int, int]],
                           submesh_logical_shapes: Sequence[tuple[int, ...]] | None = None,
                           submesh_autosharding_option_dicts: Sequence[Mapping[str, object]] | None = None, *,
                           num_micro_batches: int = 1, schedule: ScheduleName = "1f1b",
                           stage_cost: StageCostFn | None = None, transfer_cost: TransferCostFn | None = None,
                           memory_capacity: float | None = None) -> StageSolution:
    """Check a ManualStageOption against the layers and the cluster; return it as a plan.

    Each stage lists consecutive layer ids; together they cover 0..num_layers-1 in order. The
    physical shapes must tile the cluster; a logical shape must have as many devices as its
    physical shape (default: the physical shape). With stage_cost, latencies and memory are
    filled in (and memory_capacity enforced).
    """
    _check_common(num_layers, num_hosts, devices_per_host, num_micro_batches, schedule)
    S = len(forward_stage_layer_ids)
    if S == 0:
        raise StageOptionError("forward_stage_layer_ids is empty: give the layer ids of every stage")
    lists = {"submesh_physical_shapes": submesh_physical_shapes, "submesh_logical_shapes": submesh_logical_shapes,
             "submesh_autosharding_option_dicts": submesh_autosharding_option_dicts}
    for name, seq in lists.items():
        if seq is not None and len(seq) != S:
            raise StageOptionError(f"{name} has {len(seq)} entries but forward_stage_layer_ids has {S} stages; "
                                   "give one entry per stage")
    _check_stage_count(S, num_layers, num_hosts * devices_per_host)
    ranges, expect = [], 0
    for j, ids in enumerate(forward_stage_layer_ids):
        ids = list(ids)
        if not ids:
            raise StageOptionError(f"stage {j} of forward_stage_layer_ids has no layers; every stage needs one")
        if ids != list(range(expect, expect + len(ids))):
            raise StageOptionError(
                f"forward_stage_layer_ids[{j}] = {ids}: stages must take consecutive layers in order, starting "
                f"at layer {expect} (e.g. {list(range(expect, min(expect + len(ids), num_layers)))})")
        ranges.append((expect, expect + len(ids)))
        expect += len(ids)
    if expect != num_layers:
        raise StageOptionError(f"forward_stage_layer_ids covers layers 0..{expect - 1} but there are {num_layers} "
                               f"layers (0..{num_layers - 1}); assign every layer to a stage")
    subs = []
    for j, shape in enumerate(submesh_physical_shapes):
        if (len(tuple(shape)) != 2 or not all(isinstance(v, int) and v >= 1 for v in shape)):
            raise StageOptionError(f"submesh_physical_shapes[{j}] = {shape!r}: expected (hosts, devices per host)")
        subs.append(Submesh(*shape))
    logical = []
    for j in range(S):
        shape = None if submesh_logical_shapes is None else submesh_logical_shapes[j]
        if shape is not None and math.prod(shape) != subs[j].num_devices:
            raise StageOptionError(f"submesh_logical_shapes[{j}] = {tuple(shape)} has {math.prod(shape)} devices, "
                                   f"its physical shape {subs[j].shape} has {subs[j].num_devices}")
        logical.append(None if shape is None else tuple(shape))
    if stage_cost is None:
        logical = [s if s is not None else subs[j].shape for j, s in enumerate(logical)]
    opts = [None] * S if submesh_autosharding_option_dicts is None else [dict(o or {}) for o in submesh_autosharding_option_dicts]
    return _evaluate(ranges, subs, logical, opts, num_hosts, devices_per_host, num_micro_batches, schedule,
                     stage_cost, transfer_cost, memory_capacity)

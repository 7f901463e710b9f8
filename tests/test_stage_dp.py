"""Stage construction DP (passes/stage_dp.py): exact against brute force, and its options' errors."""
import math
import random

import pytest

from meshweave.passes.stage_dp import (StageCandidate, StageCostCache, StageOptionError, Submesh,
                                       logical_shape_choices, place_submeshes, solve_stages,
                                       submesh_choices, uniform_stages, validate_manual_stages)


def random_table(rng, L, subs, max_cands=3, p_missing=0.1, with_memory=False):
    """{(i, k, submesh): [StageCandidate]} with random latencies (a few exact ties on purpose)."""
    table = {}
    scaling = rng.uniform(0.0, 0.9)      # how well a stage speeds up with more devices
    for i in range(L):
        for k in range(i + 1, L + 1):
            for s in subs:
                shapes = list(logical_shape_choices(s, "all"))
                rng.shuffle(shapes)
                n = 0 if rng.random() < p_missing else rng.randint(1, min(max_cands, len(shapes)))
                table[(i, k, s)] = [
                    StageCandidate(shape, latency=round(rng.uniform(0.1, 1.0) * (k - i) / s.num_devices ** scaling
                                                 + rng.uniform(0, 0.2), 2),
                                   memory_bytes=rng.uniform(0, 6) if with_memory else 0.0,
                                   activation_bytes_per_micro_batch=rng.uniform(0, 3) if with_memory else 0.0)
                    for shape in shapes[:n]]
    return table


def brute_force(L, D, B, subs, table, transfer, capacity, schedule):
    """The least objective over every cut, sub-mesh sequence and candidate choice (None: no plan)."""
    best = None

    def stage_sequences(i, d):
        if i == L:
            if d == 0:
                yield []
            return
        for k in range(i + 1, L + 1):
            for s in subs:
                if s.num_devices <= d:
                    for rest in stage_sequences(k, d - s.num_devices):
                        yield [(i, k, s)] + rest

    for seq in stage_sequences(0, D):
        S = len(seq)
        options = []
        for j, key in enumerate(seq):
            held = B if schedule == "gpipe" else min(B, S - j)
            fits = [c for c in table[key] if capacity is None
                    or c.memory_bytes + held * c.activation_bytes_per_micro_batch <= capacity]
            options.append(fits)
        if any(not o for o in options):
            continue
        trans = sum(transfer(seq[j + 1][0], seq[j][2], seq[j + 1][2]) for j in range(S - 1))

        def walk(j, total, mx):
            nonlocal best
            if j == S:
                obj = total + (B - 1) * mx + trans
                best = obj if best is None or obj < best else best
                return
            for c in options[j]:
                walk(j + 1, total + c.latency, max(mx, c.latency))

        walk(0, 0.0, 0.0)
    return best


CLUSTERS = [(1, 8), (2, 4), (4, 2), (1, 4), (2, 2)]
# (seed, layers, hosts, devices per host, micro-batches, memory limit?, schedule), drawn at random.
CASES = [(seed, r.choice([1, 3, 5, 6, 7, 8, 8, 8]), *r.choice(CLUSTERS), r.choice([1, 2, 4, 8, 32]), r.random() < 0.5,
          r.choice(["1f1b", "1f1b", "gpipe"])) for seed, r in ((s, random.Random(1000 + s)) for s in range(30))]


@pytest.mark.parametrize("seed,L,H,M,B,memory,schedule", CASES)
def test_dp_equals_brute_force(seed, L, H, M, B, memory, schedule):
    rng = random.Random(seed)
    subs = submesh_choices(H, M)
    table = random_table(rng, L, subs, with_memory=memory)
    # Transfers depend on the cut and both sub-meshes (cheaper inside a host, say).
    tcost = {(b, a, c): round(rng.uniform(0, 0.2), 3) for b in range(1, L) for a in subs for c in subs}
    transfer = lambda b, a, c: tcost[(b, a, c)]  # noqa: E731
    capacity = 9.0 if memory else None
    expected = brute_force(L, H * M, B, subs, table, transfer, capacity, schedule)
    stage_cost = lambda i, k, s: table[(i, k, s)]  # noqa: E731
    if expected is None:
        with pytest.raises(StageOptionError, match="no pipeline plan"):
            solve_stages(L, H, M, B, stage_cost, transfer_cost=transfer, memory_capacity=capacity, schedule=schedule)
        return
    sol = solve_stages(L, H, M, B, stage_cost, transfer_cost=transfer, memory_capacity=capacity, schedule=schedule)
    assert sol.objective == pytest.approx(expected, rel=1e-9)
    # The reported plan is self-consistent: contiguous layers, tiled devices, costs from the table.
    assert [s.layers[0] for s in sol.stages] == [0] + [s.layers[1] for s in sol.stages[:-1]]
    assert sol.stages[-1].layers[1] == L
    assert sorted(d for s in sol.stages for d in s.device_ids) == list(range(H * M))
    lats = [s.latency for s in sol.stages]
    trans = sum(transfer(sol.stages[j + 1].layers[0], sol.stages[j].submesh, sol.stages[j + 1].submesh)
                for j in range(len(sol.stages) - 1))
    assert sol.objective == pytest.approx(sum(lats) + (B - 1) * max(lats) + trans, rel=1e-12)
    for j, s in enumerate(sol.stages):
        assert any(c.latency == s.latency and c.logical_shape == s.logical_shape
                   for c in table[(s.layers[0], s.layers[1], s.submesh)])
        if capacity is not None:
            assert s.memory <= capacity
    assert sol.stats.stage_cost_calls == len(table)


def test_stage_cost_called_once_per_triple():
    calls = []

    def cost(i, k, s):
        calls.append((i, k, s))
        return [StageCandidate((1, s.num_devices), (k - i) / s.num_devices, 0, 0)]

    cache = StageCostCache(cost)
    solve_stages(6, 1, 8, 4, cache)
    n = len(calls)
    assert n == len(set(calls)) == 6 * 7 // 2 * len(submesh_choices(1, 8))
    solve_stages(6, 1, 8, 8, cache)          # a second solve with the same cache costs nothing new
    assert len(calls) == n


def linear_cost(layer_work, memory=None, act=None, overhead=0.0, comm=0.0):
    """Latency = work / devices * (1 + comm * log2(devices)) + overhead; optional per-layer memory
    and activations (split over the devices)."""
    def cost(i, k, s):
        n = s.num_devices
        work = sum(layer_work[i:k])
        mem = 0.0 if memory is None else sum(memory[i:k]) / n
        a = 0.0 if act is None else sum(act[i:k]) / n
        return [StageCandidate((1, n), work / n * (1 + comm * math.log2(n)) + overhead, mem, a)]
    return cost


def test_balanced_layers_get_equal_stages():
    sol = solve_stages(8, 1, 8, 32, linear_cost([1.0] * 8, comm=0.3))
    sizes = {s.layers[1] - s.layers[0] for s in sol.stages}
    devices = {s.submesh.num_devices for s in sol.stages}
    assert len(sizes) == 1 and len(devices) == 1 and len(sol.stages) > 1


def test_imbalanced_layers_get_unequal_stages():
    # Layer 0 is 4x heavier: the balanced pipeline gives it more devices or fewer layers.
    sol = solve_stages(8, 1, 8, 32, linear_cost([4.0] + [1.0] * 7, comm=0.3))
    shapes = [(s.layers[1] - s.layers[0], s.submesh.num_devices) for s in sol.stages]
    assert len(set(shapes)) > 1, shapes
    assert max(s.latency for s in sol.stages) < 4.0     # layer 0 alone on one device would take 4


def test_memory_limit_moves_the_cut():
    # Two devices, four equal layers; layer 0 holds big parameters. Without a limit the cut is in
    # the middle; with one, stage 0 (which also keeps 2 micro-batches in flight under 1F1B) must
    # take fewer layers.
    work = [1.0] * 4
    memory = [6.0, 1.0, 1.0, 1.0]
    act = [1.0] * 4
    free = solve_stages(4, 1, 2, 8, linear_cost(work, memory, act), submeshes=[Submesh(1, 1)])
    assert [s.layers for s in free.stages] == [(0, 2), (2, 4)]
    tight = solve_stages(4, 1, 2, 8, linear_cost(work, memory, act), submeshes=[Submesh(1, 1)],
                         memory_capacity=8.5)
    assert [s.layers for s in tight.stages] == [(0, 1), (1, 4)]
    assert [s.in_flight for s in tight.stages] == [2, 1]
    assert tight.stages[0].memory == pytest.approx(6.0 + 2 * 1.0)
    assert all(s.memory <= 8.5 for s in tight.stages)
    with pytest.raises(StageOptionError, match="memory_capacity"):
        solve_stages(4, 1, 2, 8, linear_cost(work, memory, act), submeshes=[Submesh(1, 1)], memory_capacity=7.5)


def test_transfer_cost_moves_the_cut():
    # Equal layers; crossing after layer 1 is expensive, after layer 2 free: the cut avoids layer 2's
    # expensive boundary even though that unbalances the stages.
    cost = linear_cost([1.0] * 4)
    transfer = lambda b, a, c: {1: 0.0, 2: 10.0, 3: 0.0}[b]  # noqa: E731
    plain = solve_stages(4, 1, 2, 4, cost, submeshes=[Submesh(1, 1)])
    assert [s.layers for s in plain.stages] == [(0, 2), (2, 4)]
    moved = solve_stages(4, 1, 2, 4, cost, submeshes=[Submesh(1, 1)], transfer_cost=transfer)
    assert [s.layers for s in moved.stages] in ([(0, 1), (1, 4)], [(0, 3), (3, 4)])
    assert moved.transfer_time == 0.0


def test_gpipe_holds_all_micro_batches():
    sol = solve_stages(4, 1, 2, 4, linear_cost([1.0] * 4, [0.0] * 4, [1.0] * 4), submeshes=[Submesh(1, 1)],
                       schedule="gpipe")
    assert [s.in_flight for s in sol.stages] == [4, 4]


def test_plan_converts_to_manual_option():
    sol = solve_stages(8, 2, 4, 8, linear_cost([1.0] * 8, overhead=0.01))
    again = validate_manual_stages(8, 2, 4, sol.forward_stage_layer_ids, sol.submesh_physical_shapes,
                                   sol.submesh_logical_shapes, num_micro_batches=8,
                                   stage_cost=linear_cost([1.0] * 8, overhead=0.01))
    assert again.objective == pytest.approx(sol.objective)
    assert [s.device_ids for s in again.stages] == [s.device_ids for s in sol.stages]


def test_submesh_choices():
    assert submesh_choices(8, 8) == tuple(Submesh(*s) for s in [(1, 1), (1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (8, 8)])
    assert submesh_choices(3, 4, "all")[-2:] == (Submesh(2, 4), Submesh(3, 4))
    assert submesh_choices(2, 6) == (Submesh(1, 6), Submesh(2, 6))   # no sub-host shapes: 6 is no power of two
    assert logical_shape_choices(Submesh(2, 4)) == ((8, 1), (4, 2), (2, 4))
    assert logical_shape_choices(Submesh(2, 4), batch_size=4) == ((4, 2), (2, 4))


def test_placement_tiles_hosts():
    # Stage order when it packs: stage 0 on the lowest ids, whole hosts taken whole.
    placed = place_submeshes([Submesh(1, 2), Submesh(2, 4), Submesh(1, 2)], 3, 4)
    assert placed == ((0, 1), (4, 5, 6, 7, 8, 9, 10, 11), (2, 3))
    with pytest.raises(StageOptionError, match="use 10 devices but the cluster has 12"):
        place_submeshes([Submesh(1, 2), Submesh(2, 4)], 3, 4)


def test_uniform_stages():
    sol = uniform_stages(8, 2, 4, 4, num_stages=4)
    assert [s.layers for s in sol.stages] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert {s.submesh for s in sol.stages} == {Submesh(1, 2)}
    assert sol.objective is None and sol.stages[0].logical_shape == (1, 2)
    costed = uniform_stages(5, 1, 8, 4, submesh=(1, 4), stage_cost=linear_cost([1.0] * 5))
    assert [s.layers for s in costed.stages] == [(0, 3), (3, 5)]
    assert costed.objective == pytest.approx(3 / 4 + 2 / 4 + 3 * 3 / 4)
    with pytest.raises(StageOptionError, match="cannot be split into 3 equal"):
        uniform_stages(6, 1, 8, num_stages=3)
    with pytest.raises(StageOptionError, match="9 stages but only 8 devices"):
        uniform_stages(9, 1, 8)
    with pytest.raises(StageOptionError, match="4 stages but only 2 layers"):
        uniform_stages(2, 1, 8, num_stages=4)


@pytest.mark.parametrize("ids,phys,logical,match", [
    ([[0, 1], [2, 3]], [(1, 4), (1, 2)], None, "use 6 devices but the cluster has 8"),
    ([[0, 1], [2, 3]], [(1, 4), (1, 4), (1, 4)], None, "has 3 entries but forward_stage_layer_ids has 2"),
    ([[0, 2], [1, 3]], [(1, 4), (1, 4)], None, "consecutive layers"),
    ([[0, 1], [2]], [(1, 4), (1, 4)], None, "there are 4 layers"),
    ([[0, 1], []], [(1, 4), (1, 4)], None, "has no layers"),
    ([[0], [1], [2], [3]], [(1, 2)] * 4, [(2, 1), (1, 2), (2, 2), (1, 2)], r"\(2, 2\) has 4 devices"),
    ([[0, 1], [2, 3]], [(1, 8), (3, 4)], None, "does not fit a cluster"),
    ([[0], [1], [2], [3], [4]], [(1, 1)] * 5, None, "5 stages but only 4 layers"),
])
def test_manual_stage_errors(ids, phys, logical, match):
    with pytest.raises(StageOptionError, match=match):
        validate_manual_stages(4, 2, 4, ids, phys, logical)


def test_manual_stages_place_and_cost():
    sol = validate_manual_stages(4, 2, 4, [[0], [1, 2, 3]], [(1, 4), (1, 4)], [(2, 2), (4, 1)],
                                 [{"force_batch_dim_to_mesh_dim": 0}, {}])
    assert [s.device_ids for s in sol.stages] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert sol.stages[0].options == {"force_batch_dim_to_mesh_dim": 0}
    assert sol.stages[1].logical_shape == (4, 1)
    with pytest.raises(StageOptionError, match="no candidate with logical shape"):
        validate_manual_stages(4, 2, 4, [[0], [1, 2, 3]], [(1, 4), (1, 4)], [(2, 2), (4, 1)],
                               stage_cost=linear_cost([1.0] * 4))


def test_bad_problems():
    cost = linear_cost([1.0] * 4)
    with pytest.raises(StageOptionError, match="num_micro_batches=0"):
        solve_stages(4, 1, 8, 0, cost)
    with pytest.raises(StageOptionError, match="schedule='interleaved'"):
        solve_stages(4, 1, 8, 4, cost, schedule="interleaved")
    with pytest.raises(StageOptionError, match="logical shape"):
        solve_stages(4, 1, 8, 4, lambda i, k, s: [StageCandidate((3,), 1.0, 0, 0)])
    with pytest.raises(StageOptionError, match="latency=nan"):
        solve_stages(4, 1, 8, 4, lambda i, k, s: [StageCandidate((1, s.num_devices), math.nan, 0, 0)])
    # One layer cannot fill 8 devices with a single-device-only cost model.
    only_one = lambda i, k, s: [StageCandidate((1, 1), 1.0, 0, 0)] if s.num_devices == 1 else []  # noqa: E731
    with pytest.raises(StageOptionError, match="no pipeline plan"):
        solve_stages(4, 1, 8, 4, only_one)


def test_custom_submeshes_must_pack_by_device_count():
    with pytest.raises(StageOptionError, match="1 x 2\\^k"):
        solve_stages(4, 1, 8, 4, linear_cost([1.0] * 4), submeshes=[Submesh(1, 3), Submesh(1, 8)])
    with pytest.raises(StageOptionError, match="does not fit a cluster"):
        solve_stages(4, 1, 8, 4, linear_cost([1.0] * 4), submeshes=[Submesh(2, 8)])


@pytest.mark.parametrize("seed,L,B,schedule", [(0, 12, 8, "1f1b"), (1, 16, 32, "1f1b"), (2, 12, 4, "gpipe")])
def test_branch_and_bound_equals_full_sweep(seed, L, B, schedule):
    # Past brute-force sizes: the pruned search over the max-latency bound finds the same optimum
    # as evaluating the DP at every candidate bound (Alpa's sweep).
    import numpy as np

    from meshweave.passes.stage_dp import _build_tables, _StageDP

    rng = random.Random(seed)
    subs = submesh_choices(2, 4)
    table = random_table(rng, L, subs, with_memory=True)
    cost = StageCostCache(lambda i, k, s: table[(i, k, s)])
    transfer = lambda b, a, c: 0.01 * ((b * 7 + a.num_devices + 3 * c.num_devices) % 5)  # noqa: E731
    sol = solve_stages(L, 2, 4, B, cost, transfer_cost=transfer, memory_capacity=12.0, schedule=schedule)
    tables, _ = _build_tables(L, subs, cost, transfer)
    dp = _StageDP(tables, subs, L, 8, B, 12.0, schedule)
    lat = tables.lat[dp.memok[0]]
    runs = [dp.run(float(t)) for t in np.unique(lat[np.isfinite(lat)])]
    assert sol.objective == pytest.approx(min(r[1] for r in runs if r is not None), rel=1e-9)
    assert sol.stats.dp_evaluations < len(runs)

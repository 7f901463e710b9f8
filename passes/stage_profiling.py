"""Pricing stage candidates for the auto stage DP with the intra-op planner.

Each layer's forward and backward ops are outlined on a copy of the module (one stage per
layer) and auto-sharded on every logical shape of every candidate sub-mesh; a candidate's
latency is the planner's communication time (α-β of the cluster, `planning.ClusterSpec`) plus
its FLOPs at the device's rate. Layers whose fragments print identically (identical blocks
up to parameters) share one solve. A range of layers costs the sum of its layers (intra-stage
resharding between layers is not priced: an approximation, documented in docs/architecture.md);
the stages a DP run chooses are then re-priced as they compile, as one stage (one ILP per stage
fragment), and the DP re-run until its choice holds only re-priced stages: a stage's ILP may pick
other layouts than its layers' (a block kept replicated to feed a replicated LM head), so its time
and memory, the capacity check included, are the compiled stage's.
Transfers between stages cost the bytes crossing the cut over the inter-stage link, forward
and backward.

Weight gradients are reduced once per step, as the runtime does (passes/partial_gradients.py):
on each solved backward fragment the partial-gradients pass finds the gradients that stay partial
sums; their all-reduce leaves the per-micro-batch latency and is charged once per step, spread
over the micro-batches (latency + once / B: in the pipeline objective that is about one reduction
of the slowest stage, which the apply-grad phase adds). Memory adds the gradient accumulators
each device holds, in the layouts the backward fragment leaves them.
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec
from meshweave.dialects.sharding import default_axis_names
from meshweave.passes.cost_model import conv_flops
from meshweave.passes.stage_construction import StageConstructionResult, StageSpec
from meshweave.runtime.program import MeshDesc


def _conv_flops(line: str) -> float:
    """`cost_model.conv_flops` of one printed convolution."""
    spec = re.search(r"\]x\[([^\]]*)\]->", line)
    types = re.findall(r"tensor<([\dx]+)x[a-z]+\d*>", line)
    if not spec or len(types) < 3:
        return 0.0
    rhs = [int(x) for x in types[1].split("x")]
    out = [int(x) for x in types[-1].split("x")]
    o = [d.strip() for d in spec.group(1).split(",")].index("o")
    dilate = re.search(r"lhs_dilate = \[([\d, ]*)\]", line)
    return conv_flops(rhs, out, o, [int(x) for x in dilate.group(1).split(",")] if dilate else ())


def _flops(module) -> float:
    """Matmul and convolution FLOPs (the compute term; elementwise ops are not counted)."""
    total = 0.0
    for line in str(module).splitlines():
        if "stablehlo.convolution" in line:
            total += _conv_flops(line)
            continue
        if "stablehlo.dot_general" not in line:
            continue
        m = re.search(r"contracting_dims = \[([\d, ]*)\] x", line)
        types = re.findall(r"tensor<([\dx]+)x[a-z]+\d*>", line)
        if not m or len(types) < 3:
            continue
        lhs = [int(x) for x in types[0].split("x")]
        out = [int(x) for x in types[-1].split("x")]
        contracted = math.prod(lhs[int(d)] for d in m.group(1).split(",") if d.strip())
        total += 2.0 * math.prod(out) * contracted
    return total


def _tensor_bytes(t) -> int:
    rt = ir.RankedTensorType(t)
    width = getattr(rt.element_type, "width", 32)
    return math.prod(rt.shape) * max(width // 8, 1)


def auto_stages(module, state, num_layers: int, num_hosts: int, devices_per_host: int, device_ids=None):
    from meshweave.methods import _auto_sharding_pipeline
    from meshweave.passes.auto_sharding import MemoryBudgetError
    from meshweave.passes.pipeline import Pipeline, PipelineState, module_text
    from meshweave.passes.stage_dp import StageCandidate, logical_shape_choices, solve_stages
    from meshweave.passes.stage_outlining import outline
    from meshweave.planning import ClusterSpec

    t0 = time.perf_counter()
    method = state.options.get("method")
    opt = method.default_auto_sharding_option if method is not None else None
    k = state.options.get("micro_batches", 1)
    schedule = getattr(method, "pipeline_schedule", "1f1b")
    remat = getattr(method, "effective_remat", False)       # True / False / "auto" (the DP chooses per stage)
    cluster = state.options.get("cluster") or ClusterSpec(num_hosts, devices_per_host)
    priced_cluster = state.options.get("cluster") is not None
    copy = parse_module(module_text(module))
    per_layer = outline(copy, list(range(num_layers)), [f"layer{i}" for i in range(num_layers)])
    funcs = mw.funcs(copy)
    texts: dict[int, list[str]] = {i: [] for i in range(num_layers)}
    act_bytes = [0] * num_layers
    param_bytes = [0] * num_layers
    cross_bytes = [0] * (num_layers + 1)
    seen_params: set[tuple[int, int]] = set()
    roles: dict[str, tuple[list[int], list[int]]] = {}   # forward fragment text -> (parameter args, activations)
    state_bytes = [0] * num_layers                        # parameters + optimizer state read by apply-grad
    from meshweave.passes.partial_gradients import partial_candidates

    candidates = partial_candidates(per_layer)            # backward fragment -> outputs that may stay partial
    accumulated: dict[str, set[int]] = {}                 # backward fragment -> its gradient outputs
    for f in per_layer.fragments:
        for src in f.inputs:
            if f.phase == "apply" and src.accumulated and src.fragment is not None:
                accumulated.setdefault(src.fragment, set()).add(src.index)
    grad_roles: dict[str, tuple[list[int], list[int]]] = {}   # backward text -> (may stay partial, accumulated)
    priced: dict[str, tuple] = {}                              # fragment text -> held_values(...)
    boundary_args: dict[str, list[int]] = {}   # forward text -> its activation inputs (what a remat layer keeps)
    for f in per_layer.fragments:
        fn = funcs[f.name]
        text = _fragment_text(fn)
        ftype = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value)
        if f.phase != "apply":
            texts[f.stage].append(text)
            priced[text] = held_values(per_layer.fragments, f)
            if f.phase == "backward":
                grad_roles[text] = (candidates.get(f.name, []), sorted(accumulated.get(f.name, ())))
            if f.phase == "forward":
                backward = next((g for g in per_layer.fragments if g.stage == f.stage and g.phase == "backward"), None)
                acts = sorted({s.index for s in (backward.inputs if backward else ()) if s.fragment == f.name})
                params = [j for j, src in enumerate(f.inputs) if src.arg is not None and not src.batch_dependent]
                roles[text] = (params, acts)
                boundary_args[text] = [j for j, src in enumerate(f.inputs) if src.fragment is not None]
        else:
            state_bytes[f.stage] += sum(_tensor_bytes(t) for src, t in zip(f.inputs, ftype.inputs)
                                        if src.arg is not None and not src.batch_dependent)
        for src, t in zip(f.inputs, ftype.inputs):
            if src.arg is not None and not src.batch_dependent:
                # Each parameter once per layer (the forward and backward both read it; the
                # optimizer state read by apply-grad is the "4x" below).
                if f.phase == "forward" and (f.stage, src.arg) not in seen_params:
                    seen_params.add((f.stage, src.arg))
                    param_bytes[f.stage] += _tensor_bytes(t)
            elif src.fragment is not None and f.phase == "backward" and src.fragment.endswith("forward"):
                act_bytes[f.stage] += _tensor_bytes(t)
            elif src.fragment is not None and f.phase == "forward":
                producer = int(src.fragment[1:].split("_")[0])
                for b in range(producer + 1, f.stage + 1):
                    cross_bytes[b] += _tensor_bytes(t)
    solves: dict[tuple[str, tuple, int], float | None] = {}
    held: dict[tuple[str, tuple, int], tuple[float, float]] = {}   # per device, in the chosen layouts
    acc_held: dict[tuple[str, tuple, int], float] = {}             # gradient accumulators per device
    boundary_held: dict[tuple[str, tuple, int], float] = {}        # a forward's activation inputs per device
    solve_seconds = [0.0]
    from meshweave.passes.solver.cache import SolveCache

    cache = state.options.get("solve_cache") or SolveCache()
    total_params = sum(param_bytes)
    # Bytes apply-grad holds per parameter byte (parameter, optimizer state), over the whole model so
    # that every layer of a stage, and the stage's own fragment when compiled, use one scale.
    held_ratio = (sum(state_bytes) + total_params) / total_params if total_params else 1.0
    memory = getattr(opt, "memory_budget_per_device", None) or cluster.device_memory
    num_devices = num_hosts * devices_per_host

    def sub_cluster(logical):
        import dataclasses

        n = math.prod(logical)
        hosts, per_host = max(1, n // cluster.devices_per_host), min(n, cluster.devices_per_host)
        return dataclasses.replace(cluster, num_hosts=hosts, devices_per_host=per_host, mesh_shape=tuple(logical))

    prices: dict[tuple, tuple] = {}

    options_memo: dict[tuple, dict] = {}

    def level_options(logical, level: int) -> dict:
        """The auto-sharding settings of a candidate: the sub-cluster's α-β (what it is priced with,
        and so compiled with) and, for memory-lean levels, the memory price. One dict per (shape,
        level), shared by its candidates (read only)."""
        if (logical, level) not in options_memo:
            options_memo[(logical, level)] = _level_options(logical, level)
        return options_memo[(logical, level)]

    def _level_options(logical, level: int) -> dict:
        sub = sub_cluster(logical)
        _, alpha, beta = sub.logical_mesh()
        o = {"alpha": alpha, "beta": beta, "time_limit": min(opt.time_limit, 5.0), "memory_price": None,
             # The ILP prices compute itself, with a cluster's rate (mw.plan); with none (a pipeline
             # compiled on plain devices) the stages compile with the method's options, which price
             # no compute, so the DP must not either or its choice would not be what runs.
             "device_flops": sub.device_flops if priced_cluster else None}
        if level:
            o["memory_price"] = prices[logical][level - 1]
        return o

    def solve_fragment(text: str, logical, level: int, grads, values):
        """One forward/backward fragment auto-sharded as a candidate's settings compile it:
        (latency, the solved module, its GradientPricing or None). `grads`: (results that may stay
        partial, accumulated results) of a backward fragment; `values`: `held_values` (priced)."""
        import dataclasses

        spec = MeshSpec.from_shape(logical)
        o = dataclasses.replace(opt, **level_options(logical, level))
        m = parse_module(text)
        st = PipelineState(mesh=spec, options={"solve_cache": cache})
        Pipeline(_auto_sharding_pipeline(o, len(logical), gradient_results=grads[0] if grads else (),
                                         micro_batches=k, priced=values)).run(m, st, record_ir=False)
        report = _auto_report(st)
        lat = float(report.get("objective", 0.0)) + (
            0.0 if report.get("compute_priced") else _flops(m) / math.prod(logical) / sub_cluster(logical).device_flops)
        g = None
        if grads is not None:
            g = _gradients_once_per_step(m, st, spec, *grads)
            lat += g.latency_adjustment(k)
        return lat, m, g

    def layer_cost(layer: int, logical: tuple[int, ...], level: int = 0) -> float:
        total = 0.0
        for text in texts[layer]:
            key = (text, logical, level)
            if key not in solves:
                spec = MeshSpec.from_shape(logical)
                t_solve = time.perf_counter()
                try:
                    solves[key], m, g = solve_fragment(text, logical, level, grad_roles.get(text), priced.get(text))
                except MemoryBudgetError:
                    solves[key] = None          # this layer does not fit this sub-mesh's budget
                    solve_seconds[0] += time.perf_counter() - t_solve
                    raise
                if g is not None:
                    acc_held[key] = g.accumulator_bytes
                if text in roles:
                    held[key] = _held_bytes(m, spec, *roles[text])
                    boundary_held[key] = _held_bytes(m, spec, boundary_args[text], [])[0]
                solve_seconds[0] += time.perf_counter() - t_solve
            if solves[key] is None:
                raise MemoryBudgetError("layer does not fit", None)
            total += solves[key]
        return total

    def layer_accumulators(layer: int, logical, level: int = 0) -> float:
        """Gradient accumulator bytes per device of a layer (its backward fragment's layouts)."""
        return sum(acc_held.get((t, logical, level), 0.0) for t in texts[layer] if t in grad_roles)

    def layer_held(layer: int, logical, n: int, level: int = 0) -> tuple[float, float]:
        """(fixed bytes, activation bytes) per device of a layer, in the planner's layouts: the
        planner's layout of the parameters scales everything apply-grad holds per parameter (the
        parameter, its gradient, the optimizer state); plus the gradient accumulators."""
        fwd = [t for t in texts[layer] if t in roles]
        if not fwd:
            params_dev, acts_dev = param_bytes[layer] / n, act_bytes[layer] / n
        else:
            layer_cost(layer, logical, level)
            params_dev, acts_dev = held[(fwd[0], logical, level)]
        ratio = (state_bytes[layer] + param_bytes[layer]) / param_bytes[layer] if param_bytes[layer] else 0.0
        return params_dev * ratio + layer_accumulators(layer, logical, level), acts_dev

    def in_flight_guess(logical) -> int:
        """Micro-batches a stage on this shape would hold at most if every stage were this size."""
        return max(1, min(k, num_layers, num_devices // math.prod(logical)))

    def lean_levels(logical) -> int:
        """How many memory-lean levels to offer on a logical shape: none on one device (nothing to
        shard), or when the fastest layouts hold a stage's share of the model there (its share of
        the devices, the most micro-batches in flight) within LEAN_TRIGGER of the memory; else
        LEAN_PRICE_FACTORS, priced relative to the fastest plans' time per held byte on this shape."""
        if logical in prices:
            return len(prices[logical])
        prices[logical] = ()
        if memory is None or math.prod(logical) == 1 or not LEAN_PRICE_FACTORS:
            return 0
        try:
            lat = sum(layer_cost(i, logical) for i in range(num_layers))
        except MemoryBudgetError:
            return 0                            # some layer has no plan under the ILP's budget here
        fixed = act = 0.0
        for i in range(num_layers):
            f_, a_ = layer_held(i, logical, math.prod(logical))
            fixed, act = fixed + f_, act + a_
        share = math.prod(logical) / num_devices
        if share * (fixed + in_flight_guess(logical) * act) <= LEAN_TRIGGER * memory or fixed + act <= 0 or lat <= 0:
            return 0
        from meshweave.methods import MemoryPrice

        # Time per held byte of the fastest plans, but no less than moving a byte over the sub-mesh's
        # fastest link: a plan whose time is mostly compute (a small model, no collective) would
        # otherwise price memory below the cost of any layout that holds less, and lean = fastest.
        _, _, beta = sub_cluster(logical).logical_mesh()
        unit = max(lat / (fixed + in_flight_guess(logical) * act), min(beta))
        prices[logical] = tuple(MemoryPrice(f * unit, held_ratio, float(in_flight_guess(logical)))
                                for f in LEAN_PRICE_FACTORS)
        return len(prices[logical])

    sums: dict[tuple, _RangeSums] = {}

    def range_sums(logical, n: int, level: int) -> _RangeSums:
        """Every layer's latency and held bytes on one logical shape and level, as prefix sums: the
        DP asks for every layer range (O(L^2) ranges per sub-mesh), each now O(1), not a sum over its layers."""
        key = (logical, n, level)
        if key not in sums:
            r = _RangeSums()
            for i in range(num_layers):
                try:
                    lat = layer_cost(i, logical, level)
                    fixed, act = layer_held(i, logical, n, level)
                    fwd = [t for t in texts[i] if t in roles]
                    again = solves[(fwd[0], logical, level)] if fwd else 0.0
                    boundary = boundary_held[(fwd[0], logical, level)] if fwd else 0.0
                    bad = 0
                except MemoryBudgetError:
                    lat = fixed = act = again = boundary = 0.0
                    bad = 1                         # no plan of this layer fits here
                r.append(lat, fixed, act, again, boundary, bad)
            sums[key] = r
        return sums[key]

    cost_memo: dict[tuple, list] = {}      # (start, end, submesh, lean) -> candidates; the DP re-runs (settled)

    def stage_cost(start, end, submesh, lean=True):
        key = (start, end, submesh, lean)
        if key not in cost_memo:
            cost_memo[key] = _stage_cost(start, end, submesh, lean)
        return cost_memo[key]

    def _stage_cost(start, end, submesh, lean):
        out = []
        for logical in logical_shape_choices(submesh):
            logical = tuple(x for x in logical if x > 1) or (1,)
            n = submesh.num_devices
            found = []
            for level in range(1 + (lean_levels(logical) if lean else 0)):
                r = range_sums(logical, n, level)
                if r.bad[end] - r.bad[start]:
                    continue                        # no plan of some layer fits: not a candidate
                lat, mem, act = r.total(r.lat, start, end), r.total(r.fixed, start, end), r.total(r.act, start, end)
                if remat is not True:
                    joint = as_compiled.get(compiled_key(start, end, logical, level), False)
                    if joint is None:
                        continue                    # the stage as one fragment does not fit the budget
                    found.append(joint or StageCandidate(logical, lat, mem, act, level_options(logical, level)))
                if remat:
                    found.append(_remat_candidate(start, end, logical, lat, mem, level, r))
            out += _pareto(found)
        return out

    def _remat_candidate(start, end, logical, lat, mem, level, r: "_RangeSums") -> StageCandidate:
        """The stage with every layer rematerialized: its backward runs each layer's forward again
        (the forward fragment's ILP objective + FLOPs once more); between forward and backward it
        keeps only each layer's activation inputs, per micro-batch in flight; the largest layer's
        residuals live again, for one micro-batch at a time, while that layer's backward runs."""
        again, boundary = r.total(r.again, start, end), r.total(r.boundary, start, end)
        transient = max(r.layer_act[start:end], default=0.0)
        return StageCandidate(logical, lat + again, mem + transient, boundary, level_options(logical, level),
                              remat=True)

    as_compiled: dict[tuple, StageCandidate | None] = {}   # compiled_key(...) -> priced as one stage

    def compiled_key(start: int, end: int, logical, level: int) -> tuple:
        """Layer ranges whose layers have the same fragments (a model's identical blocks) compile to
        the same stage: one re-pricing serves them all."""
        return tuple(tuple(texts[i]) for i in range(start, end)), start == 0, end == num_layers, logical, level

    def stage_as_compiled(start: int, end: int, logical, level: int) -> StageCandidate | None:
        """Layers [start, end) outlined as one stage and auto-sharded as compilation does it (one
        ILP per forward/backward fragment of the stage, not one per layer): the latency and memory
        of the layouts the stage will run in. The layer sums miss the resharding between layers,
        which the stage's ILP avoids by other layouts (e.g. a block kept replicated to feed a
        replicated LM head), so they can hold more, or less, than the layers' sum."""
        cuts = sorted({start, end} - {0, num_layers})
        stage_of = [sum(c <= i for c in cuts) for i in range(num_layers)]
        whole = parse_module(module_text(module))
        out = outline(whole, stage_of, [f"s{j}" for j in range(len(cuts) + 1)])
        stage_funcs = mw.funcs(whole)
        t_solve = time.perf_counter()
        try:
            price = price_stage(out, stage_funcs, stage_of[start], MeshSpec.from_shape(logical),
                                lambda f, fn, values, grads: solve_fragment(_fragment_text(fn), logical, level,
                                                                            grads, values))
        except MemoryBudgetError:
            return None
        finally:
            solve_seconds[0] += time.perf_counter() - t_solve
        return StageCandidate(logical, price.latency, price.fixed_bytes, price.activation_bytes,
                              level_options(logical, level))

    def level_of(choice) -> int:
        price = choice.options.get("memory_price")
        return 0 if price is None else 1 + prices[tuple(choice.logical_shape)].index(price)

    def settled(solve):
        """`solve()` (a DP run) repeated until every chosen stage is priced as it compiles: the DP
        prices a stage as the sum of its layers; the chosen ones are re-priced as one stage and
        the DP re-run with those prices, until its choice is made of re-priced stages only (each
        round re-prices at least one new stage, so it ends). Remat stages keep the layer sums."""
        while True:
            sol = solve()
            fresh = [s for s in sol.stages if not s.remat and compiled_key(
                *s.layers, tuple(s.logical_shape), level_of(s)) not in as_compiled]
            if not fresh:
                return sol
            for s in fresh:
                key = compiled_key(*s.layers, tuple(s.logical_shape), level_of(s))
                if key not in as_compiled:
                    as_compiled[key] = stage_as_compiled(*s.layers, tuple(s.logical_shape), level_of(s))
                for c in [c for c in cost_memo if compiled_key(c[0], c[1], (), 0)[:3] == key[:3]]:
                    del cost_memo[c]                # these cells now hold the stage as compiled

    def transfer_cost(boundary, before, after):
        bw = cluster.inter_host_bandwidth if (before.num_hosts > 1 or after.num_hosts > 1) \
            else cluster.intra_host_bandwidth
        return 2.0 * cross_bytes[boundary] / k / bw

    schedule = schedule if schedule in ("1f1b", "gpipe") else "1f1b"
    sol = None
    if memory is not None:
        # The fastest candidates' best plan, memory ignored: when it fits, it is the optimum (a lean
        # candidate is never faster than the fastest one of its cell), and no lean solve is needed.
        fastest = settled(lambda: solve_stages(num_layers, num_hosts, devices_per_host, k,
                                               lambda i, j, sub: stage_cost(i, j, sub, lean=False),
                                               transfer_cost=transfer_cost, memory_capacity=None, schedule=schedule))
        if all(st.memory is not None and st.memory <= memory for st in fastest.stages):
            sol = fastest
    if sol is None:
        sol = settled(lambda: solve_stages(num_layers, num_hosts, devices_per_host, k, stage_cost,
                                           transfer_cost=transfer_cost, memory_capacity=memory, schedule=schedule))
    ids = list(device_ids) if device_ids is not None else list(range(num_hosts * devices_per_host))
    stages = []
    for i, s in enumerate(sol.stages):     # the DP packs sub-meshes into hosts (first fit), not in stage order
        logical = tuple(s.logical_shape)
        mesh = MeshDesc(f"mesh{i}", logical, default_axis_names(len(logical)), tuple(ids[d] for d in s.device_ids))
        # Only the memory price is carried into compilation: compiling auto stages with the priced
        # α-β too (as benchmarks/stage_programs.py does) deadlocked a collective on CPU in
        # tests/test_remat.py::test_the_remat_the_dp_chooses_is_what_runs (not isolated yet).
        carried = {"memory_price": s.options["memory_price"]} if s.options.get("memory_price") else {}
        stages.append(StageSpec(i, s.layers, s.submesh.shape, mesh, carried, s.latency, s.memory, remat=s.remat))
    return StageConstructionResult("auto", num_layers, stages, objective=sol.objective,
                                   seconds=time.perf_counter() - t0, candidates=len(solves),
                                   solve_seconds=solve_seconds[0], layer_param_bytes=list(param_bytes),
                                   layer_activation_bytes=list(act_bytes), micro_batches=k)


@dataclass(frozen=True)
class StagePrice:
    """One stage priced from its outlined fragments, in the layouts their ILPs chose."""

    latency: float            # one micro-batch's forward + backward; weight-gradient reductions amortized
    fixed_bytes: float        # per device: parameters x (parameter + optimizer state) / parameter, accumulators
    activation_bytes: float   # per device, per micro-batch in flight: forward results the backward reads

    def memory(self, in_flight: int) -> float:
        return self.fixed_bytes + in_flight * self.activation_bytes


def price_stage(outlined, funcs, stage: int, spec, solve) -> StagePrice:
    """Price stage `stage` of a stage-outlining result the way the stage DP prices the stages it
    chooses (and so the way a hand-given stage is priced: one model for both): each forward and
    backward fragment auto-sharded by `solve(f, fn, held_values, grads)` -> (latency, solved
    module, GradientPricing or None), with `grads` = (results that may stay partial, accumulated
    results) for a backward fragment; parameter and activation bytes read from the solved layouts
    on `spec`; apply-grad's parameters and optimizer state scaled by the parameters' layout.
    MemoryBudgetError from `solve` propagates (the stage does not fit a budget)."""
    from meshweave.passes.partial_gradients import partial_candidates

    maybe_partial = partial_candidates(outlined)
    lat = params_dev = params_full = state_full = acc = acts = 0.0
    for f in outlined.fragments:
        if f.stage != stage:
            continue
        fn = funcs[f.name]
        types = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value).inputs
        if f.phase == "apply":
            state_full += sum(_tensor_bytes(t) for src, t in zip(f.inputs, types)
                              if src.arg is not None and not src.batch_dependent)
            continue
        values = held_values(outlined.fragments, f)
        grads = (maybe_partial.get(f.name, []), list(values[2])) if f.phase == "backward" else None
        t, m, g = solve(f, fn, values, grads)
        lat += t
        if g is not None:
            acc += g.accumulator_bytes
        if f.phase == "forward":
            p, a = _held_bytes(m, spec, values[0], values[1])
            params_dev, acts = params_dev + p, acts + a
            params_full += sum(_tensor_bytes(types[j]) for j in values[0])
    ratio = (state_full + params_full) / params_full if params_full else 0.0
    return StagePrice(lat, params_dev * ratio + acc, acts)


class _RangeSums:
    """Prefix sums over the layers of one (logical shape, level): a stage's totals in O(1)."""

    def __init__(self):
        self.lat, self.fixed, self.act, self.again, self.boundary, self.bad = [0.0], [0.0], [0.0], [0.0], [0.0], [0]
        self.layer_act: list[float] = []

    def append(self, lat, fixed, act, again, boundary, bad) -> None:
        for acc, v in ((self.lat, lat), (self.fixed, fixed), (self.act, act), (self.again, again),
                       (self.boundary, boundary), (self.bad, bad)):
            acc.append(acc[-1] + v)
        self.layer_act.append(act)

    @staticmethod
    def total(prefix, start: int, end: int) -> float:
        return prefix[end] - prefix[start]


LEAN_PRICE_FACTORS = (0.2, 5.0)
"""Memory-lean candidates per logical shape (when the fastest layouts may not fit): the ILP re-solved
with held bytes priced at factor x (the fastest plans' time / their held bytes on that shape)."""
LEAN_TRIGGER = 0.5
"""Offer lean candidates on a shape when the fastest layouts of its proportional share of the model
take more than this fraction of the device memory (stages are not balanced exactly)."""


def _fragment_text(fn) -> str:
    """A fragment as a module of its own, @main; its name and stage number dropped so that
    identical blocks print (and are solved) alike."""
    text = re.sub(r"^func\.func private @\S+\(", "func.func @main(", str(fn.operation), count=1)
    text = re.sub(r'mw\.mesh = "[^"]*"', 'mw.mesh = "layer"', text, count=1)
    text = re.sub(r"mw\.stage = \d+ : i64", "mw.stage = 0 : i64", text, count=1)
    return "module {\n" + text + "\n}"


def _pareto(cands):
    """The candidates no other one beats on both latency and memory (per micro-batch in flight too)."""
    out = []
    for c in sorted(cands, key=lambda c: (c.latency, c.memory_bytes, c.activation_bytes_per_micro_batch)):
        if all(c.memory_bytes < o.memory_bytes * (1 - 1e-6) or
               c.activation_bytes_per_micro_batch < o.activation_bytes_per_micro_batch * (1 - 1e-6) for o in out):
            out.append(c)
    return out


def held_values(fragments, f) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """What fragment `f` holds for its stage, as (parameter arguments, activation results read by the
    stage's backward, gradient results apply-grad accumulates): the values a MemoryPrice prices.
    The stage DP prices per-layer fragments and the compiler the stage's fragments with it alike."""
    if f.phase == "apply":
        return (), (), ()
    params = tuple(j for j, src in enumerate(f.inputs) if src.arg is not None and not src.batch_dependent)
    if f.phase == "forward":
        acts = sorted({src.index for g in fragments if g.stage == f.stage and g.phase == "backward"
                       for src in g.inputs if src.fragment == f.name})
        return params, tuple(acts), ()
    accs = sorted({src.index for g in fragments if g.phase == "apply"
                   for src in g.inputs if src.accumulated and src.fragment == f.name})
    return params, (), tuple(accs)


@dataclass(frozen=True)
class GradientPricing:
    """What a backward fragment's weight gradients cost, in the cluster's time units."""

    marked: float             # all-reduce of the sums the ILP priced once per step (full cost)
    saved: float              # of those, what partial-gradients proved partial (their per-run all-reduce)
    once: float               # the proven gradients' all-reduce, once per step
    accumulator_bytes: float  # gradient accumulators per device

    def latency_adjustment(self, micro_batches: int) -> float:
        """Correction to the ILP objective (which charged `marked / micro_batches`): proven gradients
        pay `once / micro_batches`; sums not proven partial pay their all-reduce in full, every run."""
        k = micro_batches
        unproven = max(self.marked - self.saved, 0.0)
        return unproven * (1.0 - 1.0 / k) - self.saved / k + self.once / k


def _gradients_once_per_step(module, state, spec, may_stay_partial, accumulated) -> GradientPricing:
    """On a solved backward fragment: the gradient reductions (see GradientPricing) and accumulators."""
    from meshweave.passes.pipeline import Pipeline
    from meshweave.plugin.compile import result_shardings

    saved = once = 0.0
    solved = state.results["auto-sharding"]
    marked = solved.graph.lmesh.to_user_units(solved.graph.marked_gradient_cost(solved.choice))
    if may_stay_partial:
        Pipeline("partial-gradients{results=" + ",".join(map(str, may_stay_partial)) + "}").run(
            module, state, record_ir=False)
        lm = state.logical_mesh
        partial = state.results["partial-gradients"].partial
        # With XLA's combiner priced, gradients summed over the same axes are one all-reduce.
        ops: dict = {}
        for k, p in enumerate(partial):
            ops.setdefault(p.sharding.unreduced if solved.graph.combiner is not None else k, []).append(p)
        for ps in ops.values():
            axes = ps[0].sharding.unreduced
            saved += lm.to_user_units(lm.plan_cost([("all-reduce", axes, sum(p.root_bytes for p in ps))]))
            once += lm.to_user_units(lm.plan_cost([("all-reduce", axes, sum(p.bytes for p in ps))]))
    main = mw.main_func(module)
    types = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value).results
    layouts = result_shardings(module)
    acc = sum(_tensor_bytes(types[j]) / (math.prod(spec.axis_size(a) for a in layouts[j].used_axes())
                                         if layouts[j] is not None else 1) for j in accumulated)
    return GradientPricing(marked, saved, once, acc)


def _held_bytes(module, spec, param_args, act_results) -> tuple[float, float]:
    """Per-device bytes of the given arguments and results under the shardings the ILP chose."""
    from meshweave.plugin.compile import arg_shardings, result_shardings

    main = mw.main_func(module)
    ftype = ir.FunctionType(ir.TypeAttr(main.attributes["function_type"]).value)

    def per_device(t, ts) -> float:
        split = math.prod(spec.axis_size(a) for d in ts.dims for a in d) if ts is not None else 1
        return _tensor_bytes(t) / split

    args, results = arg_shardings(module), result_shardings(module)
    return (sum(per_device(ftype.inputs[j], args[j]) for j in param_args),
            sum(per_device(ftype.results[j], results[j]) for j in act_results))


def _auto_report(state) -> dict:
    r = state.results.get("auto-sharding")
    return {"objective": r.objective if r is not None else 0.0,
            "compute_priced": bool(r is not None and r.compute_priced)}

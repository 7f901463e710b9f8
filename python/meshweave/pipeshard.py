"""Compiling a PipeshardParallel step: trace at micro-batch size, cut into stages, shard and compile
each fragment on its sub-mesh, emit the per-mesh instruction lists, run them.

    trace (markers: layers, loss, grad) -> inline-calls, cse, layer-clustering, stage-construction,
    rematerialize, stage-outlining -> per fragment: install-mesh + auto-sharding on its sub-mesh, XLA compile
    -> insert-transfers (mpmd form of @main, for dumps) -> schedule -> Program -> executor
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.dialects.sharding import MeshSpec, TensorSharding
from meshweave.markers import pipeline_tracing
from meshweave.passes.partial_gradients import expect_partial_args, partial_candidates
from meshweave.passes.pipeline import PassResult, Pipeline, PipelineState, module_text
from meshweave.passes.stage_profiling import held_values
from meshweave.plugin.compile import arg_shardings, named_sharding, result_shardings
from meshweave.plugin.jax_adapter import replace_lowered_module
from meshweave.plugin.lowering import trace
from meshweave.runtime.pipeline_emitter import FragmentIO, emit, value_name
from meshweave.runtime.program import FragmentDesc, InputBinding, OutputBinding, Program, TensorSig, key_for


class PipeshardError(ValueError):
    """The step cannot be pipelined as asked; the message says what to change."""


@dataclass
class CompiledFragment:
    desc: FragmentDesc
    compiled: object              # jax.stages.Compiled
    records: list                 # pass records of the fragment's own pipeline
    state: PipelineState
    predicted: dict | None = None  # {kind: {count, bytes}} this program should hold (fragment_prediction)


def fragment_prediction(predicted: dict, left_partial=(), reduced_here=(), gradient_ops=None) -> dict:
    """The collectives a fragment's program holds: its ILP's prediction, less the all-reduces of the
    weight-gradient sums partial-gradients left partial (`left_partial`: PartialGradients), plus one
    all-reduce per partial input it sums (`reduced_here`: per-device bytes) -- once per step in
    apply-grad, where the ILP of the backward fragment priced its share.

    With XLA's combiner priced, the ILP lists gradient sums as combined ops (`gradient_ops`: their
    bytes, from `gradient_combined_ops`): the partial sums' bytes leave those ops, and the ops
    themselves leave the count only when every gradient byte stayed partial (which sum sits in which
    op is not tracked, so a partly proven set keeps its ops)."""
    out = {k: dict(v) for k, v in predicted.items()}
    ar = out.setdefault("all-reduce", {"count": 0, "bytes": 0})
    left = [b for pg in left_partial for b in pg.root_sums]
    ar["bytes"] -= int(round(sum(left)))
    if gradient_ops is None:
        ar["count"] -= len(left)
    elif left and sum(left) >= sum(gradient_ops) - 0.5 * len(gradient_ops):
        ar["count"] -= len(gradient_ops)
    ar["count"] += len(reduced_here)
    ar["bytes"] += int(round(sum(reduced_here)))
    if ar["count"] <= 0:
        del out["all-reduce"]
    return dict(sorted(out.items()))


def gradient_combined_ops(auto) -> list[float] | None:
    """Bytes of the combined all-reduce ops the ILP predicted for pipeline gradient sums (share < 1);
    None when the combiner was not priced."""
    from meshweave.passes.combined_all_reduces import merge_predicted

    graph = auto.graph
    if getattr(graph, "combiner", None) is None:
        return None
    grads = [c for c in graph.combined if c.share < 1.0]
    return [b for _, _, b, _ in merge_predicted(graph.groups, auto.choice, grads, graph.combiner)[1]]


def _micro_batch_call(call, k: int):
    """The call with every batch leaf at micro-batch size (abstract), for tracing one micro-batch."""
    if k == 1:
        return call
    roles = call.leaf_roles()
    sizes = {x.shape[0] for x, r in zip(call.leaves, roles) if r[1] and len(getattr(x, "shape", ())) >= 1}
    if not sizes:
        raise PipeshardError(f"num_micro_batches={k} but no batch argument (batch_argnums="
                             f"{call.spec.batch_argnums}) carries arrays; name the batch argument with batch_argnums")
    for b in sorted(sizes):
        if b % k:
            raise PipeshardError(f"batch size {b} is not divisible by num_micro_batches={k}; use a batch size that "
                                 f"is a multiple of {k} or another micro-batch count")
    leaves = [jax.ShapeDtypeStruct((x.shape[0] // k,) + tuple(x.shape[1:]), x.dtype)
              if r[1] and len(getattr(x, "shape", ())) >= 1 else x for x, r in zip(call.leaves, roles)]
    return dataclasses.replace(call, leaves=leaves)


_DTYPES = {"f32": "float32", "f64": "float64", "bf16": "bfloat16", "f16": "float16", "i32": "int32", "i64": "int64",
           "i8": "int8", "i16": "int16", "ui8": "uint8", "ui32": "uint32", "ui64": "uint64", "i1": "bool"}


def _dtype(t):
    et = str(ir.RankedTensorType(t).element_type)
    if et not in _DTYPES:
        raise PipeshardError(f"fragment value of element type {et} is not supported by the pipeline runtime")
    return jnp.dtype(_DTYPES[et])


def _sdy_text(dims, mesh: str, unreduced=()) -> str:
    return TensorSharding(tuple(tuple(d) for d in dims), mesh, tuple(unreduced)).to_text()


def _spec_text(dims, unreduced=()) -> str:
    parts = ["None" if not d else repr(d[0]) if len(d) == 1 else repr(tuple(d)) for d in dims]
    if unreduced:
        parts.append(f"unreduced={set(unreduced)!r}")
    return "PartitionSpec(" + ", ".join(parts) + ")"


def _sig(ts, aval) -> TensorSig:
    dims = tuple(tuple(d) for d in ts.dims) if ts is not None else tuple(() for _ in aval.shape)
    return TensorSig(tuple(int(s) for s in aval.shape), str(aval.dtype), dims, ts.unreduced if ts is not None else ())


def _fragment_module(module, name: str, arg_names: list[str], keeps: dict[int, int],
                     batch_args: frozenset = frozenset(), pins=None) -> str:
    """The private fragment function as a standalone module with a public @main (arguments in
    `batch_args` carry the micro-batch on dimension 0, for force_batch_dim_to_mesh_dim; `pins`: a
    hand-written TensorSharding or None per argument, kept by the auto-sharding ILP)."""
    fn = mw.funcs(module)[name]
    text = str(fn.operation)
    text = re.sub(r"^func\.func private @" + re.escape(name) + r"\(", "func.func @main(", text, count=1)
    m = parse_module("module @" + name + " {\n" + text + "\n}")
    main = mw.main_func(m)
    with m.context:
        attrs = mw.arg_attr_dicts(main)
        for i, (d, n, pin) in enumerate(zip(attrs, arg_names, pins or [None] * len(arg_names))):
            d[mw.ARG_PATH] = mw.string_attr(n)
            if i in batch_args:
                d[mw.BATCH_DIM] = mw.i64_attr(0)
            if pin is not None:
                d[mw.PINNED_SHARDING] = pin.to_attr()
        mw.set_arg_attr_dicts(main, attrs)
        res = mw.result_attr_dicts(main)
        for r, a in keeps.items():
            res[r][mw.KEEPS_ARG] = mw.i64_attr(a)
        mw.set_result_attr_dicts(main, res)
    return module_text(m)


def _compile(module, mesh: Mesh, in_avals, out_avals):
    in_sh = [named_sharding(ts, mesh) for ts in arg_shardings(module)]
    res = result_shardings(module)
    out_sh = [named_sharding(ts, mesh) for ts in res] if all(r is not None for r in res) else None

    def placeholder(*xs):
        return tuple(jnp.zeros(a.shape, a.dtype) for a in out_avals)

    lowered = jax.jit(placeholder, keep_unused=True, in_shardings=tuple(in_sh)).lower(
        *[jax.ShapeDtypeStruct(a.shape, a.dtype) for a in in_avals])
    return replace_lowered_module(lowered, module, in_sh, out_sh).compile()


def _with_transfer_layouts(instructions, descs):
    """Give every SEND the producer's layout and every RECV the first reader's layout (the receiver
    reshards on arrival, once)."""
    import dataclasses

    produced, read = {}, {}
    for mesh, lst in instructions.items():
        for ins in lst:
            if ins.op == "run":
                d = descs[ins.fragment]
                for k, sg in zip(ins.outputs, d.outputs):
                    produced[(mesh, k)] = sg
                    produced[(mesh, "acc:" + k.split("#")[0])] = sg
                for k, sg in zip(ins.inputs, d.inputs):
                    read.setdefault((mesh, k), sg)
    out = {}
    for mesh, lst in instructions.items():
        new = []
        for ins in lst:
            if ins.op == "send":
                ins = dataclasses.replace(ins, sig=produced.get((mesh, ins.inputs[0])))
            elif ins.op == "recv":
                ins = dataclasses.replace(ins, sig=read.get((mesh, ins.outputs[0])))
            new.append(ins)
        out[mesh] = new
    return out


def _manual_pins(method, micro_call, stage) -> list:
    """PipeshardParallel.manual_sharding resolved on a stage's logical mesh (at micro-batch size):
    a TensorSharding or None per flat argument of the step."""
    from meshweave import manual_sharding as ms

    return ms.resolve_inputs(method.manual_sharding, micro_call, MeshSpec.from_shape(stage.mesh.shape,
                                                                                     stage.mesh.axis_names))


def _insert_transfers(module, state, compiled):
    """Record each fragment's layouts on its function, then run insert-transfers (recorded like any pass)."""
    import time

    from meshweave.passes.insert_transfers import SHARDING
    from meshweave.passes.pipeline import PassRecord
    from meshweave.passes.registry import create_pass

    funcs = mw.funcs(module)
    with module.context:
        for name, c in compiled.items():
            fn = funcs[name]
            for getter, setter, sigs in ((mw.arg_attr_dicts, mw.set_arg_attr_dicts, c.desc.inputs),
                                         (mw.result_attr_dicts, mw.set_result_attr_dicts, c.desc.outputs)):
                dicts = getter(fn)
                for d, sg in zip(dicts, sigs):
                    d[SHARDING] = mw.string_attr(str([list(x) for x in sg.sharding]))
                setter(fn, dicts)
    p = create_pass("insert-transfers")
    t0 = time.perf_counter()
    p.run(module, state)
    state.records.append(PassRecord(len(state.records), p.name, p.spec(), time.perf_counter() - t0,
                                    module_text(module)))
    return state.results[p.name]


def _forced_batch_axes(opt, spec: MeshSpec, stage: int) -> tuple[str, ...]:
    """The axis force_batch_dim_to_mesh_dim names on a stage's logical mesh (none when unset)."""
    k = opt.force_batch_dim_to_mesh_dim
    if k is None:
        return ()
    if not 0 <= k < len(spec.axis_names):
        raise PipeshardError(f"force_batch_dim_to_mesh_dim={k} but stage {stage}'s logical mesh {spec} has "
                             f"{len(spec.axis_names)} axis(es); use an axis index below that, or give the stage a "
                             "logical shape with more axes (submesh_logical_shapes / submesh_logical_shape)")
    return (spec.axis_names[k],)


@dataclass(frozen=True)
class MicroBatchTry:
    """One micro-batch count the search planned: its predicted step time (None: no plan fits memory)."""

    micro_batches: int
    step_time: float | None
    seconds: float
    error: str = ""


def micro_batch_counts(call, option) -> tuple[int, ...]:
    """The counts a PipeshardParallel(num_micro_batches=option) search may try, ascending: a tuple's
    counts (each must divide the global batch), or for "auto" every divisor of it (a batch of 1520
    = 2^4 x 5 x 19 has only 1-16 among the powers of two, all too few micro-batches to fit memory;
    its fitting counts were 38 and up)."""
    sizes = {x.shape[0] for x, r in zip(call.leaves, call.leaf_roles()) if r[1] and len(getattr(x, "shape", ())) >= 1}
    if len(sizes) != 1:
        raise PipeshardError(f"num_micro_batches={option!r} searches micro-batch counts of the batch, but the batch "
                             f"arguments (batch_argnums={call.spec.batch_argnums}) have batch sizes {sorted(sizes)}; "
                             "give one batch size on dimension 0, or a fixed num_micro_batches")
    batch = sizes.pop()
    if option == "auto":
        return tuple(k for k in range(1, batch + 1) if batch % k == 0)
    bad = [k for k in option if batch % k]
    if bad:
        raise PipeshardError(f"num_micro_batches={option!r}: {bad} do not divide the global batch of {batch}; "
                             f"choose counts among its divisors")
    return tuple(sorted(set(option)))


def search_micro_batches(counts, plan_at, walk: bool):
    """The count whose plan has the least predicted step time among those that fit, as
    (count, its plan, tries). `plan_at(k)` returns (plan, step time) or raises NoPlanFits.

    walk=False plans every count. walk=True (for "auto") starts in the middle (if nothing fits
    there, at the fewest micro-batches above it that fit, found by bisection) and walks to the
    better neighbour until neither improves: step
    time over the count is bubble-dominated at few micro-batches and overhead-dominated at many,
    so the walk plans a few counts instead of all of them (a local optimum, if the curve is not
    unimodal)."""
    import time

    tried: dict[int, tuple] = {}

    def at(i):
        k = counts[i]
        if k not in tried:
            t0 = time.perf_counter()
            try:
                plan, step = plan_at(k)
                tried[k] = (plan, step, MicroBatchTry(k, step, time.perf_counter() - t0))
            except NoPlanFits as e:
                tried[k] = (None, None, MicroBatchTry(k, None, time.perf_counter() - t0, str(e)))
        return tried[k][1]

    if not walk:
        for i in range(len(counts)):
            at(i)
    else:
        def untraceable(j) -> bool:     # too many micro-batches: each is too small for the step
            at(j)
            return tried[counts[j]][2].error.startswith(NO_TRACE)

        i = len(counts) // 2
        while i > 0 and untraceable(i):
            i -= 1
        if at(i) is None:               # bisect for the fewest micro-batches above it that fit (more
            lo, hi = i + 1, len(counts) - 1     # micro-batches hold less activation memory)
            while lo < hi:
                mid = (lo + hi) // 2
                if at(mid) is not None:
                    hi = mid
                elif untraceable(mid):
                    hi = mid - 1
                else:
                    lo = mid + 1
            i = min(lo, len(counts) - 1)
        while at(i) is not None:
            better = [j for j in (i - 1, i + 1) if 0 <= j < len(counts) and at(j) is not None and at(j) < at(i)]
            if not better:
                break
            i = min(better, key=at)
    tries = [tried[k][2] for k in sorted(tried)]
    fitting = [(v[1], k) for k, v in tried.items() if v[1] is not None]
    if not fitting:
        raise NoPlanFits(f"no micro-batch count in {list(counts)} has a plan that fits (tried "
                         f"{[t.micro_batches for t in tries]}): " + tries[-1].error)
    step, k = min(fitting)
    return k, tried[k][0], tries


NO_TRACE = "the step does not trace at"


class NoPlanFits(PipeshardError):
    """The stage DP found no plan that fits memory at this micro-batch count."""


def _plan_or_no_fit(fun, call, method, cluster, searching: bool = False):
    """plan_pipeline at one count: (plan, step time), or NoPlanFits when nothing fits memory, or
    (searching) when the step does not trace at this micro-batch size (a MoE's dispatch groups
    need 2 samples: at one sample per micro-batch its reshape fails), so the search moves on."""
    from meshweave.passes.registry import PassError
    from meshweave.passes.stage_dp import StageOptionError
    from meshweave.plugin.arguments import ArgumentError

    try:
        result = plan_pipeline(fun, call, method, cluster)
    except ArgumentError as e:
        if searching and "could not trace" in str(e):
            raise NoPlanFits(f"{NO_TRACE} {method.num_micro_batches} micro-batches: {e}") from e
        raise
    except PassError as e:
        if isinstance(e.__cause__, StageOptionError) and "memory_capacity" in str(e):
            raise NoPlanFits(str(e)) from e
        raise
    return result, result.predicted_step_time


def _search_plan(fun, call, method, cluster):
    """plan_pipeline over the micro-batch counts `method` names: (count, its PlanResult with the tries attached)."""
    counts = micro_batch_counts(call, method.num_micro_batches)
    k, best, tries = search_micro_batches(
        counts, lambda k: _plan_or_no_fit(fun, call, dataclasses.replace(method, num_micro_batches=k), cluster,
                                          searching=len(counts) > 1),
        walk=method.num_micro_batches == "auto")
    best.micro_batch_search = tries
    best.timings = {**best.timings, "micro_batch_search": sum(t.seconds for t in tries)}
    return k, best


def compile_pipeshard(fun, call, method):
    """Compile `fun` for one bound call under a PipeshardParallel method."""
    from meshweave.methods import _auto_sharding_pipeline

    if method.searches_micro_batches:
        # The count is chosen by planning for the cluster the stage DP assumes here, then compiled.
        from meshweave.planning import ClusterSpec

        devices = list(np.asarray(method.devices, dtype=object).flat) if method.devices is not None else jax.devices()
        cluster = ClusterSpec(method.num_hosts, len(devices) // method.num_hosts)
        from dataclasses import replace

        k, _ = _search_plan(fun, call, method, cluster)
        method = replace(method, num_micro_batches=k)

    devices = list(np.asarray(method.devices, dtype=object).flat) if method.devices is not None else jax.devices()
    if len(devices) % method.num_hosts:
        raise PipeshardError(f"PipeshardParallel.num_hosts={method.num_hosts} does not divide the {len(devices)} devices")
    dph = len(devices) // method.num_hosts
    k = method.num_micro_batches
    micro_call = _micro_batch_call(call, k)
    import time

    clock = time.perf_counter
    timings = {"trace": 0.0, "passes": 0.0, "stage_construction": 0.0, "fragment_ilps": 0.0, "xla_compile": 0.0}
    t = clock()
    with pipeline_tracing(method.layer_option) as cfg:
        step = trace(fun, micro_call, mesh=None)
    if k > 1 and cfg["used"] == 0:
        raise PipeshardError(f"num_micro_batches={k} needs the step to compute gradients with meshweave.grad or "
                             "meshweave.value_and_grad (they mark where compute-grad ends and apply-grad starts)")
    module = step.module()
    if call.donate or call.donate_names:
        import warnings

        warnings.warn("PipeshardParallel does not donate buffers yet: donate_argnums/donate_argnames are "
                      "ignored (results are correct; the donated inputs stay allocated until the step ends)",
                      stacklevel=2)
    from meshweave.passes.solver.cache import SolveCache

    cache = SolveCache()          # identical layers / fragments are solved once
    state = PipelineState(mesh=MeshSpec.from_shape((len(devices),)),
                          options={"stage_option": method.stage_option, "device_ids": [d.id for d in devices],
                                   "auto_layer_clustering": cfg["clustering"], "method": method,
                                   "micro_batches": k, "solve_cache": cache})
    pipeline = Pipeline(f"inline-calls,cse,layer-clustering{{micro-batches={k}}},"
                        f"stage-construction{{num-hosts={method.num_hosts} devices-per-host={dph}}},rematerialize,"
                        "stage-outlining")
    timings["trace"] = clock() - t
    t = clock()
    pipeline.run(module, state, record_ir=True)
    timings["passes"] = clock() - t
    stages = state.results["stage-construction"]
    outlined = state.results["stage-outlining"]
    arg_paths = step.arg_paths
    flat_batch = [d is not None for d in step.batch_dims]
    batch_flat = {i for i, b in enumerate(flat_batch) if b}
    keeps_arg = step.keeps_arg
    by_id = {d.id: d for d in devices}
    mesh_of_stage = [s.mesh.name for s in stages.stages]
    meshes = {s.mesh.name: s.mesh for s in stages.stages}
    jmeshes = {n: Mesh(np.array([by_id[i] for i in m.device_ids]).reshape(m.shape), m.axis_names)
               for n, m in meshes.items()}
    funcs = mw.funcs(module)
    compiled: dict[str, CompiledFragment] = {}
    pins_of_stage: dict[int, list] = {}
    keep_partial = partial_candidates(outlined)
    partial_layouts = {}               # (backward fragment, output) -> its layout, left partial
    partial_bytes = {}                 # (backward fragment, output) -> its per-device bytes
    # Backward fragments first: apply-grad reads their partial gradients in the layouts they leave.
    for f in sorted(outlined.fragments, key=lambda f: f.phase == "apply"):
        fn = funcs[f.name]
        ftype = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value)
        names = [arg_paths[s.arg] if s.arg is not None else value_name(s) for s in f.inputs]
        keeps = {}
        for r, src in enumerate(outlined.results):
            if src.fragment == f.name and keeps_arg[r] is not None:
                for j, s in enumerate(f.inputs):
                    if s.arg == keeps_arg[r]:
                        keeps[src.index] = j
        stage = stages.stages[f.stage]
        if method.manual_sharding is not None and f.stage not in pins_of_stage:
            pins_of_stage[f.stage] = _manual_pins(method, micro_call, stage)
        pins = pins_of_stage.get(f.stage)
        pins = [pins[s.arg] if pins is not None and s.arg is not None else None for s in f.inputs]
        opt = method.default_auto_sharding_option
        if stage.auto_sharding:
            import dataclasses

            opt = dataclasses.replace(opt, **stage.auto_sharding)
        spec = MeshSpec.from_shape(stage.mesh.shape, stage.mesh.axis_names)
        batch_axes = _forced_batch_axes(opt, spec, f.stage)
        ftype_inputs = ir.FunctionType(ir.TypeAttr(fn.attributes["function_type"]).value).inputs
        batch_args = frozenset(j for j, s in enumerate(f.inputs) if batch_axes and s.batch_dependent
                               and len(ir.RankedTensorType(ftype_inputs[j]).shape) >= 1)
        reads_partial = {j: partial_layouts[(s.fragment, s.index)] for j, s in enumerate(f.inputs)
                         if (s.fragment, s.index) in partial_layouts}
        # Partial sums arrive in their producer's layout: the ILP plans from there (resharding them
        # is then priced), and XLA sums them where the fragment first reads them.
        pins = [TensorSharding(reads_partial[j].dims, reads_partial[j].mesh) if j in reads_partial else p
                for j, p in enumerate(pins)]
        text = _fragment_module(module, f.name, names, keeps, batch_args, pins)
        fmod = parse_module(text)
        fstate = PipelineState(mesh=spec, options={"solve_cache": cache})
        t = clock()
        Pipeline(_auto_sharding_pipeline(opt, len(spec.shape), batch_axes=batch_axes,
                                         gradient_results=keep_partial.get(f.name, ()), micro_batches=k,
                                         priced=held_values(outlined.fragments, f))).run(
            fmod, fstate, record_ir=True)
        if keep_partial.get(f.name):
            Pipeline("partial-gradients{results=" + ",".join(map(str, keep_partial[f.name])) + "}").run(
                fmod, fstate, record_ir=True)
            for pg in fstate.results["partial-gradients"].partial:
                partial_layouts[(f.name, pg.index)] = pg.sharding
                partial_bytes[(f.name, pg.index)] = pg.bytes
        if reads_partial:
            expect_partial_args(fmod, reads_partial)
        timings["fragment_ilps"] += clock() - t
        in_avals = [jax.core.ShapedArray(tuple(ir.RankedTensorType(t).shape), _dtype(t)) for t in ftype.inputs]
        out_avals = [jax.core.ShapedArray(tuple(ir.RankedTensorType(t).shape), _dtype(t)) for t in ftype.results]
        t = clock()
        exe = _compile(fmod, jmeshes[stage.mesh.name], in_avals, out_avals)
        timings["xla_compile"] += clock() - t
        in_sigs = tuple(_sig(ts, a) for ts, a in zip(arg_shardings(fmod), in_avals))
        out_sigs = tuple(_sig(ts, a) for ts, a in zip(result_shardings(fmod), out_avals))
        desc = FragmentDesc(f.name, f.mesh, f.phase, f.stage, module_text(fmod), in_sigs, out_sigs)
        auto = fstate.results.get("auto-sharding")
        predicted = None if auto is None else fragment_prediction(
            auto.predicted_collectives,
            getattr(fstate.results.get("partial-gradients"), "partial", ()),
            [partial_bytes[(s.fragment, s.index)] for s in f.inputs if (s.fragment, s.index) in partial_bytes],
            gradient_combined_ops(auto))
        compiled[f.name] = CompiledFragment(desc, exe, fstate.records, fstate, predicted)
    compiled = {f.name: compiled[f.name] for f in outlined.fragments}
    _insert_transfers(module, state, compiled)      # the mpmd form of @main, recorded for dumps and explain()
    # Inputs: each argument goes to every mesh whose fragments read it, in the first reader's layout.
    inputs, seen = [], set()
    for f in outlined.fragments:
        for j, s in enumerate(f.inputs):
            if s.arg is not None and (s.arg, f.mesh) not in seen:
                seen.add((s.arg, f.mesh))
                inputs.append(InputBinding(s.arg, f.mesh, f"arg{s.arg}", compiled[f.name].desc.inputs[j],
                                           k if s.arg in batch_flat else 1))
    outputs, keep = [], set()
    frag = {f.name: f for f in outlined.fragments}
    for r, src in enumerate(outlined.results):
        if src.arg is not None:
            b = next((b for b in inputs if b.index == src.arg), None)
            if b is None:
                raise PipeshardError(f"step result {step.result_paths[r]} returns argument {arg_paths[src.arg]} "
                                     "unchanged, but no stage reads it; return a value the step computes")
            outputs.append(OutputBinding(r, b.mesh, b.key, b.sig))
            continue
        f = frag[src.fragment]
        if f.phase == "apply":
            key = value_name(src)
        elif src.batch_dependent and k > 1:
            raise PipeshardError(f"step result {step.result_paths[r]} depends on the batch but is not an output of "
                                 "meshweave.value_and_grad; with num_micro_batches > 1 return per-example values "
                                 "through value_and_grad's aux output")
        else:
            key = key_for(value_name(src), 0)
        keep.add((f.mesh, key))
        outputs.append(OutputBinding(r, f.mesh, key, compiled[f.name].desc.outputs[src.index]))
    from meshweave.runtime.schedules import make_schedule

    schedule = make_schedule(method.pipeline_schedule, len(stages.stages), k)
    orders = {s: [(t.kind, t.micro_batch) for t in schedule.tasks[s]] for s in range(len(stages.stages))}
    ios = [FragmentIO(f.name, f.stage, f.phase, f.mesh, tuple(f.inputs), f.num_outputs) for f in outlined.fragments]
    instructions = emit(ios, orders, mesh_of_stage, {s for s in range(len(arg_paths)) if s in batch_flat}, k, keep)
    instructions = _with_transfer_layouts(instructions, {n: c.desc for n, c in compiled.items()})
    program = Program(tuple(meshes.values()), tuple(c.desc for c in compiled.values()),
                      {m: tuple(v) for m, v in instructions.items()}, tuple(inputs), tuple(outputs),
                      schedule=method.pipeline_schedule, num_micro_batches=k)
    timings["stage_construction"] = next(r.seconds for r in state.records if r.name == "stage-construction")
    timings["passes"] -= timings["stage_construction"]
    program.notes["timings"] = timings
    return program, compiled, state, step, pipeline, schedule, stages


def compile_pipeline_step(fun, call, method):
    """Compile and wrap as a meshweave Executable (plan, dump, explain, plot_schedule)."""
    from meshweave import fidelity
    from meshweave.cluster import current_backend
    from meshweave.dumping import dump_dir_from_env, write_dump
    from meshweave.executable import Executable
    from meshweave.parallel_plan import Plan, StagePlan, TensorPlacement
    from meshweave.plugin import hlo_stats
    from meshweave.runtime.executor import StepArtifacts

    program, compiled, state, step, pipeline, schedule, stages = compile_pipeshard(fun, call, method)
    executor = current_backend().executor(
        StepArtifacts(program, tuple(c.compiled for c in compiled.values()), step.lowered.out_tree))
    stage_plans = []
    for idx, (name, c) in enumerate(compiled.items()):
        mesh = program.mesh(c.desc.mesh)

        def places(sigs, prefix):
            return [TensorPlacement(f"{prefix}{i}", list(sg.shape), sg.dtype,
                                    _sdy_text(sg.sharding, mesh.name, sg.unreduced), _spec_text(sg.sharding, sg.unreduced))
                    for i, sg in enumerate(sigs)]

        text = c.compiled.as_text()
        sp = StagePlan(idx, list(mesh.shape), list(mesh.axis_names), list(mesh.device_ids),
                       places(c.desc.inputs, f"{name}.in"), places(c.desc.outputs, f"{name}.out"),
                       hlo_stats.summarize(hlo_stats.collectives(text)), {})
        if c.predicted is not None:      # the fragment's own ILP against its compiled HLO
            sp.fidelity = fidelity.compare(c.predicted, sp.collectives)
        stage_plans.append(sp)
    pipeline_info = {
        "fragments": [{"name": c.desc.name, "mesh": c.desc.mesh, "kind": c.desc.kind, "stage": c.desc.stage}
                      for c in compiled.values()],
        "stages": [{"index": s.index, "layers": list(s.layers), "mesh": s.mesh.name, "physical_shape":
                    list(s.physical_shape), "logical_shape": list(s.mesh.shape), "device_ids": list(s.mesh.device_ids),
                    "predicted_latency": s.latency, "remat": s.remat} for s in stages.stages],
        "instructions": {m: [i.describe() for i in ins] for m, ins in program.instructions.items()},
        "bubble_fraction": getattr(schedule, "bubble_fraction", None),
        "timings": program.notes.get("timings", {}),
    }
    plan = Plan(method=method.describe(), pass_pipeline=pipeline.spec(),
                logical_mesh={"shape": [len(program.meshes)], "axis_names": ["stage"], "alpha": None, "beta": None},
                stages=stage_plans, schedule=program.schedule, num_micro_batches=program.num_micro_batches)
    plan.pipeline = pipeline_info
    state.results["pipeline-schedule"] = ScheduleResult(schedule, program)
    exe = Executable(plan=plan, executor=executor, records=state.records, state=state, traced=step,
                     argument_spec=call.spec)
    exe.schedule = schedule
    exe.program = program
    exe.fragment_records = {name: c.records for name, c in compiled.items()}
    path = dump_dir_from_env()
    if path:
        write_dump(exe, path)
    return exe


@dataclass
class ScheduleResult(PassResult):
    """The pipeline schedule the runtime follows (explain() shows it per mesh)."""

    schedule: object
    program: Program

    def explain(self) -> str:
        s = self.schedule
        lines = [f"{s.kind}, {s.num_micro_batches} micro-batch(es), bubble fraction {s.bubble_fraction:.3f} "
                 "(1 forward : 2 backward time units)"]
        for m, tasks in enumerate(s.tasks):
            lines.append(f"  mesh{m}: " + " ".join(str(t) for t in tasks))
        n = sum(1 for lst in self.program.instructions.values() for i in lst if i.op == "send")
        lines.append(f"  {n} send(s) per step")
        return "\n".join(lines)


def plan_pipeline(fun, call, method, cluster):
    """Plan (no devices, no compile) a pipelined step for `cluster`: layers, stages and sub-meshes,
    and the predicted step time (the stage DP's objective when stage_option="auto")."""
    import time

    from meshweave.planning import PlanResult

    if method.searches_micro_batches:
        return _search_plan(fun, call, method, cluster)[1]
    k = method.num_micro_batches
    t0 = time.perf_counter()
    with pipeline_tracing(method.layer_option) as cfg:
        step = trace(fun, _micro_batch_call(call, k), mesh=None)
    t_trace = time.perf_counter() - t0
    if k > 1 and cfg["used"] == 0:
        raise PipeshardError(f"num_micro_batches={k} needs the step to compute gradients with meshweave.grad or "
                             "meshweave.value_and_grad (they mark where compute-grad ends and apply-grad starts)")
    module = step.module()
    state = PipelineState(mesh=MeshSpec.from_shape((cluster.num_devices,)),
                          options={"stage_option": method.stage_option, "method": method, "cluster": cluster,
                                   "auto_layer_clustering": cfg["clustering"], "micro_batches": k})
    auto = method.stage_option == "auto"
    pipeline = Pipeline(f"inline-calls,cse,layer-clustering{{micro-batches={k}}},stage-construction"
                        f"{{num-hosts={cluster.num_hosts} devices-per-host={cluster.devices_per_host}}}"
                        + ("" if auto else ",rematerialize,stage-outlining"))
    t1 = time.perf_counter()
    pipeline.run(module, state, record_ir=False)
    t_passes = time.perf_counter() - t1
    stages = state.results["stage-construction"]
    timings = {"trace": t_trace, "passes": t_passes - stages.seconds,
               "stage_ilps": stages.solve_seconds, "stage_dp": stages.seconds - stages.solve_seconds}
    if not auto:                 # stages given by hand: price them as the DP prices its candidates
        t2 = time.perf_counter()
        stages.objective = _price_given_stages(module, state, stages, method, _micro_batch_call(call, k), step, cluster)
        timings["stage_ilps"] = time.perf_counter() - t2
        capacity = getattr(method.default_auto_sharding_option, "memory_budget_per_device", None) \
            or cluster.device_memory
        for s in stages.stages:
            if capacity is not None and s.memory > capacity:
                state.warnings.append(
                    f"stage {s.index} (layers {s.layers[0]}..{s.layers[1] - 1}) needs {s.memory / 1e9:.3g} GB per "
                    f"device, over the {capacity / 1e9:.3g} GB capacity: use more micro-batches, rematerialization "
                    "(PipeshardParallel(remat=True)), more stages or larger sub-meshes")
    objective = float(stages.objective) if stages.objective is not None else float("nan")
    shape = (len(stages.stages),)
    return PlanResult(MeshSpec.from_shape(shape, ("stage",)), pipeline.spec(), objective, objective, 0.0,
                      warnings=list(state.warnings), stages=stages, layers=state.results["layer-clustering"],
                      timings=timings)


def _price_given_stages(module, state, stages, method, micro_call, step, cluster) -> float:
    """The pipeline time of hand-given stages in the stage DP's terms (`stage_profiling.price_stage`,
    as the DP prices the stages it chooses): each stage's forward and backward fragments
    auto-sharded on its logical mesh with the α-β of the part of `cluster` it occupies (hand-written
    pins kept, weight gradients reduced once per step), latency = ILP communication + FLOPs at the
    device rate, plus the forward/backward transfers between consecutive stages. Sets each stage's
    `latency` and `memory` (bytes per device, its micro-batches in flight included)."""
    import math

    from meshweave.methods import _auto_sharding_pipeline
    from meshweave.passes.solver.cache import SolveCache
    from meshweave.passes.stage_dp import in_flight, pipeline_objective
    from meshweave.passes.stage_profiling import _auto_report, _flops, _gradients_once_per_step, _tensor_bytes, \
        price_stage

    outlined = state.results["stage-outlining"]
    funcs = mw.funcs(module)
    phase_of = {f.name: (f.stage, f.phase) for f in outlined.fragments}
    cache, k = SolveCache(), method.num_micro_batches
    schedule = method.pipeline_schedule if method.pipeline_schedule in ("1f1b", "gpipe") else "1f1b"
    objective_stages = []
    for stage in stages.stages:
        logical = tuple(stage.mesh.shape)
        n = math.prod(logical)
        sub = dataclasses.replace(cluster, num_hosts=max(1, n // cluster.devices_per_host),
                                  devices_per_host=min(n, cluster.devices_per_host), mesh_shape=logical)
        _, alpha, beta = sub.logical_mesh()
        opt = dataclasses.replace(method.default_auto_sharding_option, alpha=alpha, beta=beta,
                                  device_flops=sub.device_flops, **(stage.auto_sharding or {}))
        pins = _manual_pins(method, micro_call, stage) if method.manual_sharding is not None else None
        spec = MeshSpec.from_shape(logical, stage.mesh.axis_names)

        def solve(f, fn, values, grads, opt=opt, pins=pins, spec=spec, n=n, sub=sub):
            names = [step.arg_paths[src.arg] if src.arg is not None else value_name(src) for src in f.inputs]
            fmod = parse_module(_fragment_module(module, f.name, names, {}, frozenset(),
                                                 [pins[src.arg] if pins is not None and src.arg is not None else None
                                                  for src in f.inputs]))
            fstate = PipelineState(mesh=spec, options={"solve_cache": cache})
            Pipeline(_auto_sharding_pipeline(opt, len(spec.shape), gradient_results=grads[0] if grads else (),
                                             micro_batches=k, priced=values)).run(fmod, fstate, record_ir=False)
            report = _auto_report(fstate)
            lat = float(report["objective"]) + (0.0 if report["compute_priced"] else _flops(fmod) / n / sub.device_flops)
            g = _gradients_once_per_step(fmod, fstate, spec, *grads) if grads is not None else None
            return lat + (g.latency_adjustment(k) if g is not None else 0.0), fmod, g

        price = price_stage(outlined, funcs, stage.index, spec, solve)
        stage.latency = price.latency
        stage.memory = price.memory(in_flight(schedule, stage.index, len(stages.stages), k))
        objective_stages.append(price.latency)
    crossing = [0] * len(stages.stages)              # bytes a stage's forward receives from earlier stages
    for f in outlined.fragments:
        if f.phase != "forward":
            continue
        types = ir.FunctionType(ir.TypeAttr(funcs[f.name].attributes["function_type"]).value).inputs
        for src, t in zip(f.inputs, types):
            if src.fragment is not None and phase_of[src.fragment] != (f.stage, "forward") \
                    and phase_of[src.fragment][1] == "forward":
                crossing[f.stage] += _tensor_bytes(t)
    transfers = []
    for before, after in zip(stages.stages, stages.stages[1:]):
        hosts = before.physical_shape[0] > 1 or after.physical_shape[0] > 1
        bw = cluster.inter_host_bandwidth if hosts else cluster.intra_host_bandwidth
        transfers.append(2.0 * crossing[after.index] / k / bw)      # as the stage DP prices a cut
    return pipeline_objective(objective_stages, transfers, k)


def compiled_stage_memory(program, outlined) -> list[float]:
    """Per stage of a compiled pipeline, bytes per device by the stage DP's account, read from the
    compiled fragments' layouts: forward parameter arguments x (parameter + optimizer state bytes
    apply-grad reads) / parameter bytes, plus gradient accumulators, plus the forward's activations
    for the backward x the micro-batches in flight. Equal to the DP's `StageSpec.memory` when the
    stage was compiled in the layouts the DP priced. `outlined`: the stage-outlining result
    (`exe.state.results["stage-outlining"]` of an Executable, with `exe.program`)."""
    import math

    from meshweave.passes.stage_dp import in_flight

    desc = {d.name: d for d in program.fragments}
    meshes = {m.name: dict(zip(m.axis_names, m.shape)) for m in program.meshes}

    def nbytes(sig, per_device=True):
        full = math.prod(sig.shape) * np.dtype(sig.dtype).itemsize
        if not per_device:
            return full
        return full / math.prod(axes[a] for d in sig.sharding for a in d)

    num_stages = max(f.stage for f in outlined.fragments) + 1
    out = []
    for s in range(num_stages):
        frags = [f for f in outlined.fragments if f.stage == s]
        params_dev = params_full = state_full = acc = acts = 0.0
        for f in frags:
            d = desc[f.name]
            axes = meshes[d.mesh]
            p_args, act_res, acc_res = held_values(outlined.fragments, f)
            if f.phase == "forward":
                params_dev += sum(nbytes(d.inputs[j]) for j in p_args)
                params_full += sum(nbytes(d.inputs[j], False) for j in p_args)
                acts += sum(nbytes(d.outputs[j]) for j in act_res)
            elif f.phase == "backward":
                acc += sum(nbytes(d.outputs[j]) for j in acc_res)
            else:
                state_full += sum(nbytes(sig, False) for src, sig in zip(f.inputs, d.inputs)
                                  if src.arg is not None and not src.batch_dependent)
        ratio = (state_full + params_full) / params_full if params_full else 0.0
        n = in_flight(program.schedule, s, num_stages, program.num_micro_batches)
        out.append(params_dev * ratio + acc + n * acts)
    return out

"""The compile driver shared by `parallelize` and `plan`: trace → pass pipeline → (XLA compile →
executable). Planning stops after the pipeline; compiling builds the plan, hands the step to
the selected runtime backend and writes the dump directory once."""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

from meshweave.dumping import dump_dir_from_env, write_dump
from meshweave.markers import AccumulationError, accumulate_gradients
from meshweave.passes.pipeline import Pipeline, PipelineState, module_text
from meshweave.passes.registry import PassError
from meshweave.plugin.arguments import BoundCall
from meshweave.plugin.lowering import TracedStep, trace


class ParallelizeError(RuntimeError):
    """Planning or compiling failed; the message names the pass or step and the problem."""


@dataclass
class PlannedStep:
    """A traced step after the method's pass pipeline (not yet compiled)."""

    traced: TracedStep
    module: object                  # the transformed ir.Module
    state: PipelineState
    pipeline: Pipeline
    spec: object                    # dialects.sharding.MeshSpec
    mesh: object | None             # jax Mesh (None when planning for a cluster that is not here)


def plan_step(fun, call: BoundCall, method, spec, mesh, *, record_ir: bool = True) -> PlannedStep:
    """Trace `fun` for `call` (accumulating gradients when the method asks) and run the passes."""
    check_batch_divides(method, call, spec)
    try:
        with _accumulation(method, call, spec) as acc:
            traced = trace(fun, call, mesh=mesh)
    except AccumulationError as e:
        raise ParallelizeError(f"gradient accumulation in {call.spec.fun_name}: {e}") from None
    if acc is not None and acc["used"] == 0:
        raise ParallelizeError(
            f"num_micro_batches={acc['k']} needs the step to compute gradients with meshweave.grad or "
            "meshweave.value_and_grad (jax.grad cannot be split into micro-batches by meshweave)")
    module = traced.module()
    manual = getattr(method, "manual_sharding", None)
    if manual is not None:
        _pin_manual_shardings(module, manual, call, traced, spec)
    state = PipelineState(mesh=spec)
    pipeline = Pipeline(method.pipeline_for(spec))
    try:
        pipeline.run(module, state, record_ir=record_ir)
    except PassError as e:
        raise ParallelizeError(f"planning {call.spec.fun_name} failed: {e}") from e
    _warn_if_replicated(module, call, spec, state)
    return PlannedStep(traced, module, state, pipeline, spec, mesh)


def compile_step(fun, call: BoundCall, method):
    """Plan, compile and wrap one call signature of `fun` as an Executable."""
    from meshweave.cluster import current_backend
    from meshweave.executable import Executable
    from meshweave.plan_builder import build_plan, io_shardings
    from meshweave.plugin.compile import compile_single_mesh
    from meshweave.runtime.executor import StepArtifacts
    from meshweave.runtime.single_mesh import single_mesh_program

    from meshweave.methods import PipeshardParallel

    if isinstance(method, PipeshardParallel):
        from meshweave.pipeshard import compile_pipeline_step

        return compile_pipeline_step(fun, call, method)
    mesh, spec = method.resolve_mesh()
    planned = plan_step(fun, call, method, spec, mesh)
    try:
        compiled = compile_single_mesh(planned.traced, planned.module, mesh)
    except Exception as e:
        raise ParallelizeError(f"XLA could not compile the planned module: {type(e).__name__}: {e}") from e
    plan = build_plan(method, planned, compiled)
    ins, outs = io_shardings(planned, compiled)
    program = single_mesh_program(planned_text(planned.state, planned.module), plan.stages[0], [t.dims for t in ins],
                                  [t.dims for t in outs], [i for i, d in enumerate(planned.traced.donated) if d])
    executor = current_backend().executor(StepArtifacts(program, (compiled,), planned.traced.lowered.out_tree))
    exe = Executable(plan=plan, executor=executor, records=planned.state.records, state=planned.state,
                     traced=planned.traced, argument_spec=call.spec)
    path = dump_dir_from_env()
    if path:
        write_dump(exe, path)
    return exe


def _pin_manual_shardings(module, manual, call: BoundCall, traced, spec) -> None:
    """Resolve ManualShardingOption against this call and write it on @main (mw.pinned_sharding)."""
    import jax

    from meshweave import manual_sharding as ms

    inputs = ms.resolve_inputs(manual, call, spec)
    out_avals = jax.tree.unflatten(traced.lowered.out_tree, list(traced.out_avals))
    outputs = ms.resolve_outputs(manual, jax.tree_util.tree_flatten_with_path(out_avals)[0], spec)
    ms.pin(module, inputs, outputs)


def check_batch_divides(method, call: BoundCall, spec) -> None:
    """Methods that force the batch onto mesh axes (ZeRO, force_batch_dim_to_mesh_dim) need the
    batch to divide their degree; otherwise the plan would quietly run replicated."""
    axes_of = getattr(method, "forced_batch_axes", None)
    axes = axes_of(spec) if axes_of is not None else ()
    if not axes:
        return
    degree = spec.axes_size(axes)
    for path, leaf in zip((r[0] for r in call.leaf_roles() if r[1]), call.batch_leaves()):
        shape = getattr(leaf, "shape", ())
        if len(shape) >= 1 and shape[0] % degree:
            raise ParallelizeError(
                f"{type(method).__name__}: {path} has batch size {shape[0]}, which is not divisible by the "
                f"data-parallel degree {degree} (mesh axes {', '.join(axes)}); use a batch size that is a multiple "
                f"of {degree} (pad a partial last batch, or drop it), or a mesh whose batch axes divide it")


def batch_size(call: BoundCall) -> int:
    sizes = {x.shape[0] for x in call.batch_leaves() if len(getattr(x, "shape", ())) >= 1}
    if len(sizes) != 1:
        raise ParallelizeError(
            f"num_micro_batches needs batch arguments (batch_argnums={call.spec.batch_argnums}, batch_argnames="
            f"{call.spec.batch_argnames}) whose array leaves share one batch size on dimension 0; found sizes "
            f"{sorted(sizes)}")
    return sizes.pop()


@contextlib.contextmanager
def _accumulation(method, call: BoundCall, spec):
    k = getattr(method, "num_micro_batches", None) or 1
    if k == 1:
        yield None
        return
    replicas = spec.axes_size(method.data_parallel_axes(spec))
    with accumulate_gradients(k, replicas, batch_size(call)) as cfg:
        yield cfg


def planned_text(state: PipelineState, module) -> str:
    """The module's text after the last pass (printed once, shared with its pass record)."""
    last = state.records[-1].ir_text if state.records else None
    return last if last else module_text(module)


def _warn_if_replicated(module, call: BoundCall, spec, state: PipelineState) -> None:
    """A plan on more than one device that shards no tensor at all (no argument, no op result)
    is a fallback to replication: say so (a warning, kept in the plan and shown by explain())."""
    if spec.num_devices == 1 or not call.leaves:
        return
    text = planned_text(state, module)
    if re.search(r'<@[\w.]+, \[[^\]]*\{"', text) is None:      # no dimension split on any mesh axis
        auto = state.results.get("auto-sharding")
        if auto is not None and getattr(auto, "compute_priced", False):
            state.warn(f"the plan is fully replicated over the {spec.num_devices}-device mesh {spec}: with compute "
                       "priced (device_flops) the ILP found running the whole step on every device cheaper than any "
                       "split, whose collectives would cost more than the compute they save; the step is too small "
                       "for this mesh: use fewer devices or a bigger batch")
            return
        sizes = sorted({x.shape[0] for x in call.batch_leaves() if len(getattr(x, "shape", ())) >= 1})
        state.warn(f"the plan is fully replicated over the {spec.num_devices}-device mesh {spec}: every device "
                   f"computes the whole step" + (f" (batch size(s) {sizes} could not be split)" if sizes else "")
                   + "; use a batch size the mesh axes divide, or fewer devices")

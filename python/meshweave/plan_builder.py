"""The `Plan` of a compiled single-mesh step: placements read from the planned module, compiled
collectives and memory from XLA, and the auto-sharding prediction checked against them."""
from __future__ import annotations

import jax

from meshweave import fidelity
from meshweave.dialects.sharding import TensorSharding
from meshweave.parallel_plan import Plan, StagePlan, TensorPlacement
from meshweave.plugin import hlo_stats
from meshweave.plugin.compile import arg_shardings, result_shardings


def placements(paths, avals, shardings) -> list[TensorPlacement]:
    out = []
    for path, aval, ts in zip(paths, avals, shardings):
        ts = ts or TensorSharding.replicated(len(aval.shape))
        out.append(TensorPlacement(path, list(aval.shape), str(aval.dtype), ts.to_text(), str(ts.partition_spec())))
    return out


def io_shardings(planned, compiled) -> tuple[list[TensorSharding], list[TensorSharding]]:
    """Per flat input and output: the layout the step runs with (outputs the passes left open
    are read back from XLA's executable)."""
    step, module = planned.traced, planned.module
    flat_out = jax.tree.leaves(compiled.output_shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    ins = [ts or TensorSharding.replicated(len(a.shape)) for ts, a in zip(arg_shardings(module), step.arg_avals)]
    outs = [ts if ts is not None else from_named(s, len(a.shape))
            for ts, s, a in zip(result_shardings(module), flat_out, step.out_avals)]
    return ins, outs


def build_plan(method, planned, compiled) -> Plan:
    """`planned`: the driver's PlannedStep; `compiled`: its jax executable."""
    step, module, state, spec, mesh = planned.traced, planned.module, planned.state, planned.spec, planned.mesh
    in_specs, out_specs = io_shardings(planned, compiled)
    text = compiled.as_text()
    try:
        mem = compiled.memory_analysis()
        memory = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                      "temp_size_in_bytes", "alias_size_in_bytes")}
    except Exception:  # some backends have no memory analysis
        memory = {}
    compiled_colls = hlo_stats.collectives(text)
    stage = StagePlan(0, list(spec.shape), list(spec.axis_names), [d.id for d in mesh.devices.flat],
                      placements(step.arg_paths, step.arg_avals, in_specs),
                      placements(step.result_paths, step.out_avals, out_specs),
                      hlo_stats.summarize(compiled_colls), memory)
    lm = state.logical_mesh
    logical = {"shape": list(spec.shape), "axis_names": list(spec.axis_names),
               "alpha": list(getattr(lm, "user_alpha", ())) or None, "beta": list(getattr(lm, "user_beta", ())) or None}
    auto = state.results.get("auto-sharding")
    plan = Plan(method=method.describe(), pass_pipeline=planned.pipeline.spec(), logical_mesh=logical,
                stages=[stage], num_micro_batches=getattr(method, "num_micro_batches", None) or 1,
                objective=auto.objective if auto else None,
                predicted_costs=dict(auto.predicted_costs) if auto else {},
                solver=dict(auto.solver) if auto else {}, warnings=list(state.warnings))
    if auto is not None:      # Shardy's view re-partitions the module: only when someone reads it
        stage.fidelity = lambda: fidelity.compare(auto.predicted_collectives, stage.collectives,
                                                  _shardy_view(state, spec, plan))
    return plan


def _shardy_view(state, spec, plan) -> dict:
    """Shardy's own partitioning of the planned module (a diagnostic: never fails a compile)."""
    from meshweave.passes.explicit_collectives import shardy_collectives

    try:
        return shardy_collectives(next(r.ir_text for r in reversed(state.records) if r.name == "auto-sharding"), spec)
    except Exception as e:
        message = f"plan fidelity: Shardy's explicit-collective view failed: {e}"
        state.warn(message)
        plan.warnings.append(message)
        return {}


def from_named(sharding, rank) -> TensorSharding:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return TensorSharding.replicated(rank)
    dims = []
    for i in range(rank):
        p = spec[i] if i < len(spec) else None
        dims.append(() if p is None else ((p,) if isinstance(p, str) else tuple(p)))
    return TensorSharding(tuple(dims))

"""A compiled, parallelized step: call it like the jitted function; inspect `plan`, `dump`, `explain`."""
from __future__ import annotations

from meshweave import fidelity
from meshweave.plugin import hlo_stats
from meshweave.plugin.arguments import ArgumentSpec, BoundCall, check_donation
from meshweave.runtime.executor import Executor


class Executable:
    def __init__(self, *, plan, records, state, traced, executor: Executor | None = None,
                 argument_spec: ArgumentSpec | None = None, runner=None):
        """`executor` (the runtime interface, with the `argument_spec` that flattens calls for it),
        or `runner`: a callable taking the step's own arguments (the pipeline's multi-mesh runner)."""
        if (executor is None) == (runner is None):
            raise ValueError("Executable needs exactly one of executor= and runner=")
        self.plan = plan
        self.executor = executor
        self.runner = runner
        self.pass_records = records
        self.state = state
        self.traced = traced
        self.argument_spec = argument_spec
        self._donated = tuple(i for i, d in enumerate(traced.donated) if d)

    def __call__(self, *args, **kwargs):
        if self.runner is not None:
            return self.runner(*args, **kwargs)
        return self.run(self.argument_spec.bind(args, kwargs))

    def run(self, call: BoundCall):
        """Execute on an already-bound call."""
        if self._donated:
            check_donation(call, self._donated)
        if self.runner is not None:
            return self.runner(*call.args, **call.kwargs)
        return self.executor.run(call.leaves)

    def run_leaves(self, leaves, bind):
        """Execute on the flat leaves of a call (`bind()` makes the BoundCall, only if needed)."""
        if self.runner is not None:
            return self.run(bind())
        if self._donated and len({id(x) for x in leaves}) < len(leaves):
            check_donation(bind(), self._donated)
        return self.executor.run(leaves)

    # ------------------------------------------------------------------ inspection
    def hlo_text(self, stage: int = 0) -> str:
        """Compiled, SPMD-partitioned HLO of a stage (per-device shapes)."""
        if self.runner is not None:
            return self.runner.compiled_text(stage)
        return self.executor.stage_text(stage)

    def collectives(self, stage: int = 0) -> list[hlo_stats.Collective]:
        return hlo_stats.collectives(self.hlo_text(stage))

    def ir_after(self, pass_name: str) -> str:
        """The MLIR text after the last run of `pass_name` in this executable's pipeline."""
        for r in reversed(self.pass_records):
            if r.name == pass_name and r.ir_text is not None:
                return r.ir_text
        raise KeyError(f"no recorded IR after pass '{pass_name}'; passes: {[r.name for r in self.pass_records]}")

    def dump(self, path: str) -> list[str]:
        """Write NN_<pass>.mlir, stage_<k>.hlo and plan.json (DESIGN.md's dump format) into `path`,
        and `sharding_problem.json` (the auto-sharding ILP in IOPDDL form, for meshweave-solve)."""
        from meshweave.dumping import write_dump

        return write_dump(self, path)

    def explain(self) -> str:
        """Human-readable report: plan (with its warnings), per-pass decisions and timings, fidelity."""
        lines = ["== meshweave plan ==", self.plan.summary(), "", "== passes =="]
        for r in self.pass_records[1:]:
            lines.append(f"  {r.index:02d} {r.spec:50s} {r.seconds * 1e3:8.1f} ms")
        for name, result in self.state.results.items():
            text = result.get("explain", "") if isinstance(result, dict) else getattr(result, "explain", lambda: "")()
            if text:
                lines += ["", f"== {name} ==", text]
        for stage in self.plan.stages:
            if stage.fidelity:
                lines += ["", f"== plan fidelity, stage {stage.index} (predicted vs compiled collectives) ==",
                          fidelity.report(stage.fidelity, self.collectives(stage.index))]
        return "\n".join(lines)

    def plot_schedule(self, path: str) -> str:
        """Write the pipeline timeline as a PNG (one row per mesh; forward / backward / apply-grad
        blocks per micro-batch). Only pipelined (PipeshardParallel) steps have one."""
        schedule = getattr(self, "schedule", None)
        if schedule is None:
            raise ValueError("this step is not pipelined (it runs as one stage); plot_schedule needs a "
                             "PipeshardParallel step")
        from meshweave.runtime.schedules import plot_schedule

        return plot_schedule(schedule, path, title=self.plan.method)

    def __repr__(self):
        return f"<meshweave.Executable {self.plan.method} on {len(self.plan.stages)} stage(s)>"

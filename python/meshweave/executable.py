"""A compiled, parallelized step: call it like the jitted function; inspect `plan`, `dump`, `explain`."""
from __future__ import annotations

import json
import os

import jax

from meshweave.plugin import hlo_stats
from meshweave.passes.pipeline import write_records
from meshweave.runtime.local import LocalStageRunner


class Executable:
    def __init__(self, *, plan, runner: LocalStageRunner, records, state, traced, extra_dumps=None):
        self.plan = plan
        self.runner = runner
        self.pass_records = records
        self.state = state
        self.traced = traced
        self._extra_dumps = extra_dumps or {}

    def __call__(self, *args, **kwargs):
        return self.runner(*args, **kwargs)

    # ------------------------------------------------------------------ inspection
    def hlo_text(self, stage: int = 0) -> str:
        """Compiled, SPMD-partitioned HLO of a stage (per-device shapes)."""
        return self.runner.compiled_text(stage)

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
        os.makedirs(path, exist_ok=True)
        write_records(self.pass_records, path)
        for k in range(len(self.plan.stages)):
            with open(os.path.join(path, f"stage_{k}.hlo"), "w") as f:
                f.write(self.hlo_text(k))
        with open(os.path.join(path, "plan.json"), "w") as f:
            f.write(self.plan.to_json())
        for name, writer in self._extra_dumps.items():
            writer(os.path.join(path, name))
        return sorted(os.listdir(path))

    def explain(self) -> str:
        """Human-readable report: plan, per-pass decisions and timings, compiled collectives."""
        lines = ["== meshweave plan ==", self.plan.summary(), "", "== passes =="]
        for r in self.pass_records[1:]:
            lines.append(f"  {r.index:02d} {r.spec:50s} {r.seconds * 1e3:8.1f} ms")
        for name, report in self.state.reports.items():
            text = report.get("explain") if isinstance(report, dict) else None
            if text:
                lines += ["", f"== {name} ==", text]
            elif isinstance(report, dict):
                lines += ["", f"== {name} ==", json.dumps({k: v for k, v in report.items() if k != "explain"},
                                                          default=str)]
        if self.state.warnings:
            lines += ["", "== warnings =="] + [f"  {w}" for w in self.state.warnings]
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

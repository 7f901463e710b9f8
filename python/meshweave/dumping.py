"""The dump directory (DESIGN.md's format): NN_<pass>.mlir, stage_<k>.hlo, plan.json and
sharding_problem.json. `MESHWEAVE_DUMP_DIR` is read here and nowhere else; the compile driver
writes each compiled step's dump once, after it is compiled."""
from __future__ import annotations

import os

from meshweave.passes.pipeline import write_records

DUMP_DIR_VARIABLE = "MESHWEAVE_DUMP_DIR"


def dump_dir_from_env() -> str | None:
    return os.environ.get(DUMP_DIR_VARIABLE) or None


def write_dump(exe, path: str) -> list[str]:
    """Write `exe`'s pass IR, compiled stages, plan and auto-sharding problem into `path`."""
    os.makedirs(path, exist_ok=True)
    write_records(exe.pass_records, path)
    for k in range(len(exe.plan.stages)):
        with open(os.path.join(path, f"stage_{k}.hlo"), "w") as f:
            f.write(exe.hlo_text(k))
    with open(os.path.join(path, "plan.json"), "w") as f:
        f.write(exe.plan.to_json())
    for name, records in getattr(exe, "fragment_records", {}).items():   # pipelined steps: per fragment
        write_records(records, os.path.join(path, "fragments", name))
    auto = exe.state.results.get("auto-sharding")
    if auto is not None:
        from meshweave.passes.solver.iopddl import write_iopddl

        write_iopddl(auto.problem, os.path.join(path, "sharding_problem.json"))
    return sorted(os.listdir(path))

"""Pipelines: parse `a,b{opt=1 other=x}`, run the passes in order, record and dump the IR after each.

The textual syntax is MLIR's: passes separated by top-level commas, options inside braces
separated by spaces. Dumps follow DESIGN.md: `00_input.mlir`, then `NN_<pass>.mlir` in order.
"""
from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field

from jaxlib.mlir import ir

from meshweave.passes.registry import Pass, PassError, PassOptionError, create_pass


class _PrintedOnRead:
    """`PassRecord.ir_text`: a string, None, or a module snapshot (a clone, ~20x cheaper than
    printing) that is printed on first read and then kept. Most compiles never read their
    per-pass IR; `dump`, `ir_after` and the diagnostics that do see the same text."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return None
        value = obj.__dict__.get("_ir")
        if value is not None and not isinstance(value, str):
            value = obj.__dict__["_ir"] = module_text(value)
        return value

    def __set__(self, obj, value):
        obj.__dict__["_ir"] = value


@dataclass
class PassRecord:
    index: int
    name: str
    spec: str
    seconds: float
    ir_text: str | None = _PrintedOnRead()     # give a str, None or an ir.Module / module clone


class PassResult:
    """What a pass produced (a dataclass defined next to its pass), kept in
    `PipelineState.results[pass name]` for the plan, `explain()` and tests."""

    def explain(self) -> str:
        """Human-readable account of the decision ("" when there is nothing to say)."""
        return ""


@dataclass
class PipelineState:
    """What passes share beyond the module: the mesh, settings, typed per-pass results, warnings."""

    mesh: object | None = None            # dialects.sharding.MeshSpec
    logical_mesh: object | None = None    # passes.cost_model.LogicalMesh (alpha/beta per axis)
    options: dict = field(default_factory=dict)   # settings passes read (none are written back here)
    results: dict[str, PassResult] = field(default_factory=dict)   # pass name -> its typed result
    warnings: list[str] = field(default_factory=list)
    records: list[PassRecord] = field(default_factory=list)

    @property
    def reports(self) -> dict[str, PassResult]:
        """The same mapping as `results` (the name passes of the pipeline builder use)."""
        return self.results

    def warn(self, message: str) -> None:
        import warnings

        self.warnings.append(message)
        warnings.warn(message, stacklevel=2)


def split_pipeline(text: str) -> list[tuple[str, str]]:
    """'a,b{x=1 y=2}' -> [('a', ''), ('b', 'x=1 y=2')]; commas inside braces belong to options."""
    items, depth, cur = [], 0, ""
    for ch in text.strip():
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassOptionError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise PassOptionError(f"unbalanced '{{' in pipeline {text!r}")
    items.append(cur)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            raise PassOptionError(f"empty pass name in pipeline {text!r}")
        if "{" in item:
            name, rest = item.split("{", 1)
            if not rest.endswith("}"):
                raise PassOptionError(f"text after '}}' in {item!r}")
            out.append((name.strip(), rest[:-1].strip()))
        else:
            out.append((item, ""))
    return out


def parse_options(raw: str) -> dict[str, str]:
    opts = {}
    for tok in raw.split():
        if "=" not in tok:
            raise PassOptionError(f"option {tok!r} is not of the form key=value")
        k, v = tok.split("=", 1)
        opts[k.strip()] = v.strip()
    return opts


def parse_pipeline(text: str) -> list[Pass]:
    from meshweave.passes.registry import UpstreamPass, get_pass

    passes = []
    for name, raw in split_pipeline(text):
        if issubclass(get_pass(name), UpstreamPass):
            passes.append(create_pass(name, raw))
        else:
            passes.append(create_pass(name, parse_options(raw)))
    return passes


def module_text(module: ir.Module, debug_info: bool = False) -> str:
    buf = io.StringIO()
    module.operation.print(file=buf, enable_debug_info=debug_info, large_elements_limit=64)
    return buf.getvalue()


class Pipeline:
    """An ordered list of passes; run() verifies the module after every pass."""

    def __init__(self, passes: list[Pass] | str):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)

    def spec(self) -> str:
        return ",".join(p.spec() for p in self.passes)

    def run(self, module: ir.Module, state: PipelineState | None = None, *, record_ir: bool = True,
            dump_dir: str | None = None, print_after_all=None) -> PipelineState:
        state = state or PipelineState()
        if record_ir or dump_dir:
            self._record(state, 0, "input", "input", 0.0, _snapshot(module), dump_dir)
        for i, p in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            try:
                p.run(module, state)
            except PassError:
                raise
            except Exception as e:
                raise PassError(p.name, f"{type(e).__name__}: {e}") from e
            if not module.operation.verify():
                raise PassError(p.name, "the module does not verify after this pass")
            dt = time.perf_counter() - t0
            self._record(state, i, p.name, p.spec(), dt, _snapshot(module) if record_ir or dump_dir else None,
                         dump_dir)
            if print_after_all is not None:
                text = state.records[-1].ir_text if record_ir or dump_dir else module_text(module)
                print(f"// -----// IR after {p.spec()} //----- //", file=print_after_all)
                print(text, file=print_after_all)
        return state

    @staticmethod
    def _record(state, index, name, spec, seconds, snapshot, dump_dir):
        record = PassRecord(index, name, spec, seconds, snapshot)
        state.records.append(record)
        if dump_dir and snapshot is not None:
            os.makedirs(dump_dir, exist_ok=True)
            with open(os.path.join(dump_dir, f"{index:02d}_{name}.mlir"), "w") as f:
                f.write(record.ir_text)


def _snapshot(module: ir.Module):
    """A copy of the module as it is now, printed only if its text is asked for."""
    return module.operation.clone()


def write_records(records: list[PassRecord], path: str) -> None:
    os.makedirs(path, exist_ok=True)
    for r in records:
        if r.ir_text is not None:
            with open(os.path.join(path, f"{r.index:02d}_{r.name}.mlir"), "w") as f:
                f.write(r.ir_text)

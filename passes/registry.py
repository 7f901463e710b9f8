"""Pass base class, typed options and the registry of passes by their stable names.

A pass is a small class with a `name` (what pipelines and `meshweave-opt` call it), a one-line
`summary`, typed `options`, and `run(module, state)`. Upstream MLIR passes (canonicalize, cse,
sdy-*) are registered through the same interface, so one pipeline mixes both.

The registry is lazy: `PASS_MODULES` maps each pass name to the module that defines it, and a
pass's module is imported the first time the name is asked for (as xDSL's `get_all_passes()`),
so building one pipeline imports only the passes it names. A new pass adds one line there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from jaxlib.mlir import ir
from jaxlib.mlir.passmanager import PassManager


class PassError(Exception):
    """A pass could not do its job; the message names the pass and the problem."""

    def __init__(self, pass_name: str, message: str):
        super().__init__(f"[{pass_name}] {message}")
        self.pass_name = pass_name


class PassOptionError(ValueError):
    """A pipeline named an unknown pass or gave a bad option value."""


def _parse_bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false)")


def _parse_int_list(text: str) -> tuple[int, ...]:
    t = text.strip()
    return tuple(int(x) for x in t.split(",") if x.strip()) if t else ()


def _parse_float_list(text: str) -> tuple[float, ...]:
    t = text.strip()
    return tuple(float(x) for x in t.split(",") if x.strip()) if t else ()


def _parse_shape(text: str) -> tuple[int, ...]:
    shape = tuple(int(x) for x in text.lower().split("x"))
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"{text!r} is not a mesh shape like 2x4")
    return shape


def _parse_str_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


PARSERS: dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "str": str, "bool": _parse_bool, "shape": _parse_shape,
    "int-list": _parse_int_list, "float-list": _parse_float_list, "str-list": _parse_str_list,
}


@dataclass(frozen=True)
class Option:
    """A typed pass option; `kind` is one of PARSERS' keys."""

    name: str
    kind: str
    default: Any
    help: str

    def parse(self, text: str):
        try:
            return PARSERS[self.kind](text)
        except (ValueError, KeyError) as e:
            raise PassOptionError(f"bad value {text!r} for option '{self.name}' ({self.kind}): {e}") from None

    def render(self, value) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, tuple):
            return ("x" if self.kind == "shape" else ",").join(str(v) for v in value)
        return str(value)


class Pass:
    """Base class: subclasses set name, summary, options and implement run()."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()

    def __init__(self, **values):
        known = {o.name: o for o in self.options}
        self.values = {o.name: o.default for o in self.options}
        for key, value in values.items():
            if key not in known:
                raise PassOptionError(
                    f"pass '{self.name}' has no option '{key}'"
                    + (f" (options: {', '.join(known)})" if known else " (it takes no options)"))
            self.values[key] = known[key].parse(value) if isinstance(value, str) else value

    def __getattr__(self, item):
        values = self.__dict__.get("values", {})
        key = item.replace("_", "-")
        if key in values:
            return values[key]
        raise AttributeError(item)

    def run(self, module: ir.Module, state) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def spec(self) -> str:
        """This pass and its non-default options in pipeline syntax."""
        changed = [f"{o.name}={o.render(self.values[o.name])}" for o in self.options
                   if self.values[o.name] != o.default]
        return self.name + ("{" + " ".join(changed) + "}" if changed else "")


class UpstreamPass(Pass):
    """An MLIR pass built into jaxlib, run through the MLIR PassManager."""

    anchor: ClassVar[str] = "builtin.module"
    raw_options: str = ""

    def __init__(self, raw_options: str = "", **values):
        if values:
            # Upstream options are passed through verbatim; MLIR validates them.
            raw_options = " ".join([raw_options] + [f"{k}={v}" for k, v in values.items()]).strip()
        super().__init__()
        self.raw_options = raw_options
        self._pipeline = self._textual()
        try:
            PassManager.parse(self._pipeline, context=_probe_context())
        except Exception as e:  # MLIR raises ValueError with its diagnostic
            raise PassOptionError(f"upstream pass '{self.name}' rejected options {{{raw_options}}}: {e}") from None

    def _textual(self) -> str:
        inner = self.name + ("{" + self.raw_options + "}" if self.raw_options else "")
        if self.anchor == "func.func":
            inner = f"func.func({inner})"
        return f"builtin.module({inner})"

    def run(self, module, state) -> None:
        PassManager.parse(self._pipeline, context=module.context).run(module.operation)

    def spec(self) -> str:
        return self.name + ("{" + self.raw_options + "}" if self.raw_options else "")


_PROBE: list[ir.Context] = []


def _probe_context() -> ir.Context:
    if not _PROBE:
        from meshweave.dialects.context import make_context

        _PROBE.append(make_context())
    return _PROBE[0]


REGISTRY: dict[str, type[Pass]] = {}      # loaded passes; see get_pass() for the lazy path

_UPSTREAM = "meshweave.passes.upstream"
PASS_MODULES: dict[str, str] = {
    "inline-calls": "meshweave.passes.inline_calls",
    "strip-markers": "meshweave.passes.strip_markers",
    "install-mesh": "meshweave.passes.install_mesh",
    "data-parallel": "meshweave.passes.data_parallel",
    "auto-sharding": "meshweave.passes.auto_sharding",
    "layer-clustering": "meshweave.passes.layer_clustering",
    "stage-construction": "meshweave.passes.stage_construction",
    "rematerialize": "meshweave.passes.rematerialize",
    "stage-outlining": "meshweave.passes.stage_outlining",
    "insert-transfers": "meshweave.passes.insert_transfers",
    "partial-gradients": "meshweave.passes.partial_gradients",
    **{name: _UPSTREAM for name in (
        "canonicalize", "cse", "symbol-dce", "sdy-propagation-pipeline", "sdy-export-pipeline",
        "sdy-import-pipeline", "sdy-basic-propagate", "sdy-aggressive-propagate", "sdy-close-shardings",
        "sdy-drop-sharding-and-mesh", "sdy-populate-op-sharding-rules", "sdy-insert-explicit-reshards",
        "sdy-reshard-to-collectives")},
}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: add a pass to the registry under its stable name."""
    if not cls.name or not cls.summary:
        raise TypeError(f"{cls.__name__} needs a name and a one-line summary")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise TypeError(f"pass name '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


def register_upstream(name: str, summary: str, anchor: str = "builtin.module") -> None:
    register(type(f"Upstream_{name}", (UpstreamPass,), {"name": name, "summary": summary, "anchor": anchor}))


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`, importing its module on first use."""
    cls = REGISTRY.get(name)
    if cls is None and name in PASS_MODULES:
        import importlib

        importlib.import_module(PASS_MODULES[name])
        cls = REGISTRY.get(name)
        if cls is None:
            raise TypeError(f"{PASS_MODULES[name]} is listed as defining pass '{name}' but does not register it")
    if cls is None:
        import difflib

        close = difflib.get_close_matches(name, PASS_MODULES, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; run `meshweave-opt --list-passes`"
        raise PassOptionError(f"unknown pass '{name}'{hint}")
    return cls


def create_pass(name: str, options: dict[str, str] | str | None = None) -> Pass:
    cls = get_pass(name)
    if issubclass(cls, UpstreamPass):
        raw = options if isinstance(options, str) else " ".join(f"{k}={v}" for k, v in (options or {}).items())
        return cls(raw)
    if isinstance(options, str):
        raise PassOptionError(f"options of pass '{name}' must be key=value pairs")
    return cls(**(options or {}))


def list_passes() -> list[type[Pass]]:
    """Every pass, loaded (and any registered outside PASS_MODULES, e.g. by a plugin)."""
    return [get_pass(k) for k in sorted(set(PASS_MODULES) | set(REGISTRY))]

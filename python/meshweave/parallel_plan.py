"""The parallel plan: what meshweave decided, in a form tools can read (`plan.json`)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


class _Deferred:
    """A dataclass field that may be given a zero-argument callable instead of its value: the
    callable runs on first read (a diagnostic every compile would otherwise pay for), and its
    result is kept. Reads, `asdict` and `plan.json` see only the value."""

    def __set_name__(self, owner, name):
        self._slot = "_deferred_" + name

    def __get__(self, obj, owner=None):
        if obj is None:
            return None                      # the dataclass default: no value yet
        value = obj.__dict__.get(self._slot)
        if callable(value):
            value = obj.__dict__[self._slot] = value()
        return [] if value is None else value

    def __set__(self, obj, value):
        obj.__dict__[self._slot] = value


@dataclass
class TensorPlacement:
    path: str            # pytree path, e.g. "state['params']['w1']"
    shape: list[int]
    dtype: str
    sharding: str        # sdy attribute text, e.g. #sdy.sharding<@mesh, [{"x"}, {}]>
    spec: str            # the same as a jax PartitionSpec


@dataclass
class StagePlan:
    index: int
    mesh_shape: list[int]
    axis_names: list[str]
    device_ids: list[int]
    inputs: list[TensorPlacement]
    outputs: list[TensorPlacement]
    collectives: dict = field(default_factory=dict)      # compiled HLO: {kind: {count, bytes}}
    memory: dict = field(default_factory=dict)           # compiled memory analysis, bytes per device
    fidelity: list = _Deferred()      # predicted vs compiled collectives, per kind (computed when first read)


@dataclass
class Plan:
    method: str
    pass_pipeline: str
    logical_mesh: dict                   # {shape, axis_names, alpha, beta}
    stages: list[StagePlan]
    schedule: str | None = None          # pipeline schedule; None for a single stage
    num_micro_batches: int = 1
    objective: float | None = None       # solver objective, when a solver ran
    predicted_costs: dict = field(default_factory=dict)
    solver: dict = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)         # layers, stages, fragments, instruction lists
    warnings: list = field(default_factory=list)   # what the passes warned about (fallbacks, limits)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def summary(self) -> str:
        lines = [f"method: {self.method}", f"pipeline: {self.pass_pipeline}"]
        lm = self.logical_mesh
        lines.append(f"logical mesh: {'x'.join(map(str, lm['shape']))} axes {tuple(lm['axis_names'])}")
        for s in self.stages:
            lines.append(f"stage {s.index}: mesh {'x'.join(map(str, s.mesh_shape))} on devices {s.device_ids}")
            sharded = [p for p in s.inputs if "\"" in p.sharding]
            lines.append(f"  inputs: {len(s.inputs)} ({len(sharded)} sharded, {len(s.inputs) - len(sharded)} replicated)")
            for p in sharded[:12]:
                lines.append(f"    {p.path:40s} {str(tuple(p.shape)):16s} {p.spec}")
            if len(sharded) > 12:
                lines.append(f"    ... {len(sharded) - 12} more")
            if s.collectives:
                coll = ", ".join(f"{k} x{v['count']} ({v['bytes']} B)" for k, v in s.collectives.items())
                lines.append(f"  compiled collectives: {coll}")
            else:
                lines.append("  compiled collectives: none")
        if self.objective is not None:
            lines.append(f"objective: {self.objective:.6g}")
        for w in self.warnings:
            lines.append(f"warning: {w}")
        return "\n".join(lines)

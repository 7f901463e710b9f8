"""The executor interface: what every runtime backend (local, Ray) implements for one step.

An executor owns one compiled step. `run(leaves)` takes the step's flat input leaves (the
order of `jax.tree.flatten((dynamic args, kwargs))`), places each one as the plan wants it
(moving an array only when its sharding differs), runs the stages in the schedule's order and
returns the outputs in the step's pytree. The compiler hands a backend a `StepArtifacts`:
jax executables for in-process backends and the plain-data `Program` for remote ones.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

from meshweave.runtime.program import Program


@dataclass(frozen=True)
class StepArtifacts:
    """Everything a backend may need to execute one compiled step."""

    program: Program            # meshes, fragments (StableHLO text), per-mesh instructions
    compiled: tuple             # jax.stages.Compiled per fragment, in program.fragments order (in-process)
    out_tree: Any               # the step's output pytree structure


@runtime_checkable
class Executor(Protocol):
    def place(self, leaves: Sequence) -> list:
        """The inputs laid out as the first stage expects them (moved only where they differ)."""

    def run(self, leaves: Sequence) -> Any:
        """Place, execute every stage per the schedule, and return the outputs as a pytree."""

    def stage_text(self, stage: int) -> str:
        """The compiled (partitioned) program of a stage, for inspection."""


@runtime_checkable
class Backend(Protocol):
    """Where steps run; selected by `meshweave.init(cluster=name)` (runtime/backends.py)."""

    name: str

    def executor(self, step: StepArtifacts) -> Executor:
        ...

    def shutdown(self) -> None:
        ...

"""In-process execution: every stage's mesh is a set of local devices."""
from __future__ import annotations

from typing import Sequence

import jax

from meshweave.runtime.executor import StepArtifacts
from meshweave.runtime.placement import misplaced, place


class LocalStageRunner:
    """Runs compiled stage executables in this process (stage meshes are subsets of local devices).

    Inputs whose sharding differs from what the executable was compiled for are moved with
    `runtime.placement.place` first (single-device arrays, another mesh or layout), so a call
    never fails because of where its arguments happen to live and placing one-device arrays
    compiles nothing; arrays already in place are passed through untouched. Only the inputs
    that arrived misplaced on the previous call are checked before the executable is called
    (all of them on the first call), which keeps a training loop's per-call cost flat.
    """

    def __init__(self, step: StepArtifacts):
        if len(step.compiled) != 1:
            raise NotImplementedError("multi-stage execution needs a pipeline schedule")
        self.step = step
        self.stages = list(step.compiled)
        self._call = self.stages[0]
        expected, expected_kwargs = self._call.input_shardings
        if expected_kwargs:
            raise ValueError("a stage must take flat positional inputs")
        self._expected = list(expected)
        self._seen_ok = [None] * len(self._expected)    # per input: a sharding object known to match
        self._watch = range(len(self._expected))          # inputs to check before the next call

    def stage_text(self, stage: int) -> str:
        return self.stages[stage].as_text()

    def place(self, leaves: Sequence) -> list:
        out = list(leaves)
        seen = self._seen_ok
        for i, (x, s) in enumerate(zip(out, self._expected)):
            sh = x.sharding if isinstance(x, jax.Array) else None
            if sh is seen[i] and sh is not None:
                continue            # the common case in a loop: the layout this input had last time
            if sh is not None and (sh == s or sh.is_equivalent_to(s, x.ndim)):
                seen[i] = sh
            else:
                out[i] = place(x, s)
        return out

    def _place_watched(self, leaves: Sequence) -> list:
        out, watch, expected = list(leaves), [], self._expected
        for i in self._watch:
            if misplaced(out[i], expected[i]):
                out[i] = place(out[i], expected[i])
                watch.append(i)
        self._watch = watch
        return out

    def run(self, leaves: Sequence):
        if self._watch:
            leaves = self._place_watched(leaves)
        try:
            # Inputs already where the plan wants them (a loop's steady state) go straight in:
            # the executable checks every argument's sharding before it runs anything.
            return self._call(*leaves)
        except ValueError:
            return self._call(*self.place(leaves))


class LocalBackend:
    """The default backend: one process, its local devices."""

    name = "local"

    def __init__(self, address: str | None = None):
        if address is not None:
            raise ValueError("init(cluster='local') takes no address")

    def executor(self, step: StepArtifacts):
        if len(step.compiled) == 1 and len(step.program.meshes) == 1:
            return LocalStageRunner(step)
        from meshweave.runtime.local_pipeline import LocalProgramExecutor

        return LocalProgramExecutor(step)

    def shutdown(self) -> None:
        """Nothing to release."""

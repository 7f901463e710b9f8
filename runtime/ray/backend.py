"""`Backend`: what `meshweave.init(cluster="ray", ...)` loads (runtime/backends.py, by name).

It starts or joins Ray once and turns each compiled step (its plain-data `Program` and output
pytree) into a `RayStepExecutor`; pytree outputs are `RemoteArray` handles held by workers.
"""
from __future__ import annotations

import jax

from meshweave.runtime.ray.cluster import shutdown, start
from meshweave.runtime.ray.executor import RayProgramExecutor


class RayStepExecutor:
    """One compiled step on Ray: flat input leaves in, the step's output pytree (of handles) out."""

    def __init__(self, program_executor: RayProgramExecutor, out_tree):
        self.program_executor = program_executor
        self.out_tree = out_tree

    def place(self, leaves):
        """Unchanged: inputs are placed by the workers (host values travel once per step;
        handles from an earlier step stay where they are)."""
        return list(leaves)

    def run(self, leaves):
        return jax.tree.unflatten(self.out_tree, self.program_executor(*leaves))

    def stage_text(self, stage: int) -> str:
        """The compiled, partitioned HLO of fragment `stage`, as its first worker built it."""
        return self.program_executor.compiled_text(self.program_executor.program.fragments[stage].name)

    def close(self) -> None:
        self.program_executor.close()


class Backend:
    """The Ray backend: `Backend(address=None|"auto"|"host:port", num_hosts=1, devices_per_host=8,
    step_timeout=300.0)`; further keywords go to `start` (object_store_memory, num_cpus)."""

    name = "ray"

    def __init__(self, address: str | None = None, num_hosts: int = 1, devices_per_host: int = 8,
                 step_timeout: float = 300.0, **start_options):
        from meshweave.runtime.ray import cluster

        self._owns_runtime = cluster._CLUSTER is None      # else: joined a runtime someone started
        self.cluster = start(address, num_hosts, devices_per_host, **start_options)
        self.step_timeout = step_timeout

    def executor(self, step) -> RayStepExecutor:
        """`step`: the compiler's StepArtifacts (uses its `program` and `out_tree`)."""
        return RayStepExecutor(RayProgramExecutor(step.program, step_timeout=self.step_timeout), step.out_tree)

    def shutdown(self) -> None:
        """Stop the Ray runtime if this backend started it (see `start` / `shutdown`)."""
        if self._owns_runtime:
            shutdown()

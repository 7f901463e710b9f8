"""Errors of the Ray runtime: each names the mesh, host and instruction involved."""
from __future__ import annotations


class RayRuntimeError(RuntimeError):
    """Base class of the Ray runtime's errors."""


class WorkerStepError(RayRuntimeError):
    """An instruction raised inside a mesh worker; the step was aborted on every worker."""


class WorkerDiedError(RayRuntimeError):
    """A mesh worker process died during a step; its mesh's buffers are lost.

    The executor that ran the step is closed; build a new one (after `start`) to continue.
    """


class StepTimeoutError(RayRuntimeError):
    """A step ran past its time limit (`RayProgramExecutor(step_timeout=...)`)."""


class StepAborted(RayRuntimeError):
    """Raised inside a worker whose step the driver aborted (another worker failed)."""

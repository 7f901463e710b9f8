"""The Ray backend: every mesh of a `Program` is served by `MeshWorker` actors, one per host.

    start(address=None | "auto" | "host:port", num_hosts=1, devices_per_host=8)
    ex = RayProgramExecutor(program); outs = ex(*flat_args)   # RemoteArray handles
    np.asarray(outs[0]); ex.close(); shutdown()

`start` with no address starts a private local Ray (loopback only, no usage stats, no
dashboard) and `shutdown` stops it; with an address it joins that cluster and `shutdown`
releases meshweave's actors and disconnects (the cluster keeps running). `Backend` is what
`meshweave.init(cluster="ray", address=..., num_hosts=..., devices_per_host=...)` loads.
"""
from meshweave.runtime.ray.backend import Backend, RayStepExecutor
from meshweave.runtime.ray.cluster import RayCluster, current, shutdown, start
from meshweave.runtime.ray.errors import (RayRuntimeError, StepTimeoutError, WorkerDiedError,
                                          WorkerStepError)
from meshweave.runtime.ray.executor import RayProgramExecutor, RemoteArray, RemoteSharding, StepStats

__all__ = ["Backend", "RayStepExecutor", "start", "shutdown", "current", "RayCluster", "RayProgramExecutor", "RemoteArray",
           "RemoteSharding", "StepStats", "RayRuntimeError", "WorkerStepError", "WorkerDiedError",
           "StepTimeoutError"]

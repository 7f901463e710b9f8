"""`init` / `shutdown`: choose where parallelized steps run (runtime/backends.py).

"local" (the default) runs every mesh in this process on its local devices. Other backends
("ray": meshes as Ray actors across hosts) load by name; one that is not available fails with
a clear error instead of silently running locally. The choice applies to steps compiled after
`init`.
"""
from __future__ import annotations

from meshweave.runtime.backends import BackendUnavailable, load_backend


class ClusterError(RuntimeError):
    pass


_active = None     # the backend `init` selected; None means local


def init(cluster: str = "local", address: str | None = None, **options) -> None:
    """Select the execution backend; calling it again replaces the previous one."""
    global _active
    try:
        backend = load_backend(cluster, address, **options)
    except BackendUnavailable as e:
        raise ClusterError(str(e)) from None
    if _active is not None:
        _active.shutdown()
    _active = backend


def current_backend():
    """The selected backend (local when `init` was not called)."""
    global _active
    if _active is None:
        _active = load_backend("local")
    return _active


def shutdown() -> None:
    """Release what `init` set up and return to the local backend."""
    global _active
    if _active is not None:
        _active.shutdown()
    _active = None

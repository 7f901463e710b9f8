"""`init` / `shutdown`: choose where parallelized steps run.

"local" (the default) runs every mesh in this process on its local devices; it needs no
setup, so `init("local")` only checks the request and `shutdown()` has nothing to release.
"ray" — meshes as Ray actors across hosts — is part of the pipeline runtime and not available
yet: asking for it fails with a clear error instead of silently running locally.
"""
from __future__ import annotations


class ClusterError(RuntimeError):
    pass


def init(cluster: str = "local", address: str | None = None) -> None:
    """Select the execution backend; idempotent."""
    if cluster not in ("local", "ray"):
        raise ValueError(f"init(cluster={cluster!r}): expected 'local' or 'ray'")
    if cluster == "ray":
        raise ClusterError("init(cluster='ray'): multi-host execution on Ray actors is not implemented yet; "
                           "use cluster='local' (every mesh runs in this process), or mw.plan(..., "
                           "cluster=mw.ClusterSpec(...)) to plan for a cluster that is not here")
    if address is not None:
        raise ValueError("init(cluster='local') takes no address")


def shutdown() -> None:
    """Release what `init` set up (nothing, for "local")."""

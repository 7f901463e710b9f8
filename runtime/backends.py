"""Backends by name: "local" (this process), "ray" (meshes as Ray actors, `meshweave.runtime.ray`).

A backend is loaded on first selection from `BACKENDS` ("module:attribute"), so a backend's
package is imported only by users who ask for it, and a new backend plugs in with one
`register_backend` call (or one line here) without touching the compiler. The attribute is a
class or factory called as `factory(address=..., **options)` that returns a `Backend`.
"""
from __future__ import annotations

import importlib

from meshweave.runtime.executor import Backend

BACKENDS: dict[str, str] = {
    "local": "meshweave.runtime.local:LocalBackend",
    "ray": "meshweave.runtime.ray:Backend",
}


class BackendUnavailable(RuntimeError):
    """The named backend cannot be loaded here; the message says why."""


def register_backend(name: str, target: str) -> None:
    """Make `init(cluster=name)` load `target` ("package.module:Factory")."""
    if ":" not in target:
        raise ValueError(f"backend target {target!r} must be 'module:attribute'")
    BACKENDS[name] = target


def load_backend(name: str, address: str | None = None, **options) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"init(cluster={name!r}): expected one of {', '.join(repr(b) for b in sorted(BACKENDS))}")
    module_name, attr = BACKENDS[name].split(":")
    try:
        module = importlib.import_module(module_name)
        factory = getattr(module, attr)
    except (ImportError, AttributeError) as e:
        raise BackendUnavailable(
            f"init(cluster={name!r}): the {name} backend ({BACKENDS[name]}) is not implemented yet or not "
            f"installed here ({type(e).__name__}: {e}); use cluster='local' (every mesh runs in this process), "
            f"or mw.plan(..., cluster=mw.ClusterSpec(...)) to plan for a cluster that is not here") from None
    return factory(address=address, **options)

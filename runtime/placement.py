"""Placing call inputs onto a plan's shardings without compiling anything.

`jax.device_put` of an array that lives on one device onto a multi-device sharding (and jax's
own resharding of such an argument when an executable is called with it) compiles a slicing
program per shape and sharding: on a first call, one XLA compile per distinct parameter shape.
A host buffer is instead cut into per-device shards and copied, with no compile; so a
one-device array on a CPU device goes to the mesh through the host, where its host view is free.
On an accelerator the route would cost a device-to-host copy on every call for inputs that
arrive that way (a batch produced on device 0 each step), more than jax's slicing program, which
compiles once per shape and is cached: there jax's own placement is kept.
"""
from __future__ import annotations

import jax
import numpy as np


def place(x, sharding):
    """`x` laid out as `sharding` (a new array unless it already is)."""
    if isinstance(x, jax.Array) and _host_route(x, sharding):
        return jax.device_put(np.asarray(x), sharding)
    return jax.device_put(x, sharding)


def misplaced(x, sharding) -> bool:
    """True for a jax array whose layout differs from `sharding` (host arrays are placed by the
    executable itself, without a compile)."""
    if not isinstance(x, jax.Array):
        return False
    sh = x.sharding
    return not (sh == sharding or sh.is_equivalent_to(sharding, x.ndim))


def _host_route(x, sharding) -> bool:
    devices = x.sharding.device_set
    return (len(devices) == 1 and next(iter(devices)).platform == "cpu" and len(sharding.device_set) > 1
            and x.is_fully_addressable
            and not jax.dtypes.issubdtype(x.dtype, jax.dtypes.extended))     # PRNG keys have no host view

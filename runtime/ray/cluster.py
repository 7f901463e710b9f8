"""Starting or joining Ray, and the pool of mesh workers (one actor per host of a device set).

Hosts are numbered 0..num_hosts-1 and own global device ids `h*devices_per_host ...`. On a
real cluster with at least `num_hosts` nodes, host h is pinned to the h-th node; on a single
node (tests, one workstation) the hosts are simulated there, each worker process with its own
CPU devices set through its environment.
"""
from __future__ import annotations

import atexit
import logging
import os
import re
import tempfile
import uuid
from collections import deque
import warnings
from dataclasses import dataclass, field

from meshweave.runtime.ray.errors import RayRuntimeError

# Ray must not phone home, must bind to loopback on a single machine, and needs no auth token
# for a local cluster; set before ray.init (its child processes inherit the environment).
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled"}
_WORKER_CONCURRENCY = 16


@dataclass
class WorkerGroup:
    """The workers of one device set (a mesh's devices), one per host it spans, by rank."""

    device_ids: tuple[int, ...]
    hosts: tuple[int, ...]
    workers: list
    pids: list[int]
    progress_paths: list[str | None]
    dead: bool = False
    # Handles the driver dropped; freed by the workers at the start of the group's next step
    # (or now, by an explicit RemoteArray.delete()), so dropping a handle costs no Ray call.
    pending_free: deque = field(default_factory=deque)

    def take_pending_free(self) -> list[str]:
        """The dropped handles so far (finalizers may append from any thread meanwhile)."""
        out = []
        while self.pending_free:
            out.append(self.pending_free.popleft())
        return out

    def placement(self, mesh_device_ids, devices_per_host: int) -> tuple[tuple[int, int], ...]:
        """(rank, local device index) of each mesh device, in the mesh's row-major order."""
        local = {h: sorted(d for d in self.device_ids if d // devices_per_host == h) for h in self.hosts}
        return tuple((self.hosts.index(d // devices_per_host), local[d // devices_per_host].index(d))
                     for d in mesh_device_ids)


@dataclass
class RayCluster:
    num_hosts: int
    devices_per_host: int
    initialized_ray: bool          # meshweave called ray.init (started a local Ray, or joined one)
    node_ids: list[str] | None
    epoch: int
    groups: dict[tuple[int, ...], WorkerGroup] = field(default_factory=dict)
    start_s: float = 0.0

    def group_for(self, device_ids, label: str) -> WorkerGroup:
        """The workers of this device set, created (and set up) on first use."""
        key = tuple(sorted(device_ids))
        g = self.groups.get(key)
        if g is not None and not g.dead:
            return g
        cap = self.num_hosts * self.devices_per_host
        bad = [d for d in key if not 0 <= d < cap]
        if bad:
            raise RayRuntimeError(f"mesh {label!r} uses device ids {bad}, outside this Ray cluster's "
                                  f"{self.num_hosts} host(s) x {self.devices_per_host} devices; "
                                  f"start it with more hosts/devices (meshweave.runtime.ray.start)")
        if g is not None:
            _remove_progress_files(g)
        g = _create_group(self, key, label)
        self.groups[key] = g
        return g


_CLUSTER: RayCluster | None = None
_EPOCH = 0


def current() -> RayCluster:
    if _CLUSTER is None:
        raise RayRuntimeError("Ray runtime is not started: call meshweave.init(cluster='ray', ...) "
                              "or meshweave.runtime.ray.start(...) first")
    return _CLUSTER


def start(address: str | None = None, num_hosts: int = 1, devices_per_host: int = 8, *,
          object_store_memory: int | None = 1 << 30, num_cpus: int | None = None) -> RayCluster:
    """Start a local Ray (address=None) or join one ("auto", "host:port"); idempotent for the
    same shape. Meshes get their workers lazily, when a program that uses them is loaded."""
    global _CLUSTER, _EPOCH
    import time

    if not isinstance(num_hosts, int) or num_hosts < 1:
        raise ValueError(f"num_hosts must be a positive int, got {num_hosts!r}")
    if not isinstance(devices_per_host, int) or devices_per_host < 1:
        raise ValueError(f"devices_per_host must be a positive int, got {devices_per_host!r}")
    if _CLUSTER is not None:
        if (_CLUSTER.num_hosts, _CLUSTER.devices_per_host) == (num_hosts, devices_per_host):
            return _CLUSTER
        raise RayRuntimeError(f"Ray runtime already started with {_CLUSTER.num_hosts} host(s) x "
                              f"{_CLUSTER.devices_per_host} devices; call shutdown() before starting "
                              f"it with {num_hosts} x {devices_per_host}")
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    t0 = time.perf_counter()
    initialized = False
    if not ray.is_initialized():
        common = dict(log_to_driver=False, logging_level=logging.WARNING)
        with warnings.catch_warnings():
            # Ray spawns its daemons with fork+exec (nothing of jax runs in the child); jax's
            # warning about os.fork in a multithreaded process does not apply to that.
            warnings.filterwarnings("ignore", message="os.fork\\(\\) was called", category=RuntimeWarning)
            if address is None:
                ray.init(address="local", include_dashboard=False, object_store_memory=object_store_memory,
                         num_cpus=num_cpus or max(8, 2 * num_hosts), **common)
            else:
                ray.init(address=address, **common)
        initialized = True
    nodes = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeID"])
    node_ids = None
    if len(nodes) >= num_hosts and len(nodes) > 1:
        node_ids = [n["NodeID"] for n in nodes[:num_hosts]]
    elif len(nodes) > 1:
        raise RayRuntimeError(f"the Ray cluster has {len(nodes)} nodes, fewer than num_hosts={num_hosts}; "
                              f"add nodes (ray start --address=...) or ask for fewer hosts")
    _EPOCH += 1
    if _EPOCH == 1:
        atexit.register(_remove_all_progress_files)     # a driver that never calls shutdown()
    _CLUSTER = RayCluster(num_hosts, devices_per_host, initialized, node_ids, _EPOCH,
                          start_s=time.perf_counter() - t0)
    return _CLUSTER


def shutdown() -> None:
    """Release every mesh worker; stop the local Ray `start` started, or disconnect from the
    cluster it joined (the cluster keeps running). A Ray the caller initialised is left alone."""
    global _CLUSTER
    import ray

    c, _CLUSTER = _CLUSTER, None
    if c is None:
        return
    for g in c.groups.values():
        for w in g.workers:
            try:
                ray.kill(w)
            except Exception:  # noqa: BLE001 - already gone
                pass
        _remove_progress_files(g)
    if c.initialized_ray and ray.is_initialized():
        ray.shutdown()


def retire(group: WorkerGroup) -> None:
    """A worker of `group` died: its mesh state is lost, so stop the rest of the group too (a
    jax.distributed group cannot continue without a member); the next use starts a new one."""
    import ray

    group.dead = True
    for w in group.workers:
        try:
            ray.kill(w)
        except Exception:  # noqa: BLE001 - already gone
            pass
    _remove_progress_files(group)


def _remove_progress_files(group: WorkerGroup) -> None:
    for p in group.progress_paths:
        if p and os.path.exists(p):
            os.unlink(p)


def _remove_all_progress_files() -> None:
    if _CLUSTER is not None:
        for g in _CLUSTER.groups.values():
            _remove_progress_files(g)


def _create_group(c: RayCluster, device_ids: tuple[int, ...], label: str) -> WorkerGroup:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from meshweave.runtime.ray.worker import MeshWorker

    hosts = tuple(sorted({d // c.devices_per_host for d in device_ids}))
    actor_cls = ray.remote(MeshWorker)
    workers, paths = [], []
    for rank, h in enumerate(hosts):
        n_local = sum(1 for d in device_ids if d // c.devices_per_host == h)
        opts = dict(num_cpus=0, max_concurrency=_WORKER_CONCURRENCY, max_restarts=0,
                    runtime_env={"env_vars": _worker_env(n_local)})
        path = None
        if c.node_ids is not None:
            opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(c.node_ids[h], soft=False)
        else:  # same machine as the driver: it can read the worker's progress board after a crash
            path = os.path.join(_progress_dir(), f"meshweave-{uuid.uuid4().hex[:12]}-{label}-h{h}.progress")
        workers.append(actor_cls.options(**opts).remote(label, h, rank, len(hosts), path))
        paths.append(path)
    coordinator = ray.get(workers[0].coordinator_address.remote()) if len(hosts) > 1 else None
    infos = ray.get([w.setup.remote(coordinator) for w in workers])
    for h, info in zip(hosts, infos):
        want = sum(1 for d in device_ids if d // c.devices_per_host == h)
        if info["local_devices"] != want:
            raise RayRuntimeError(f"worker for mesh {label!r} host {h} sees {info['local_devices']} devices, "
                                  f"expected {want}")
    return WorkerGroup(device_ids, hosts, workers, [i["pid"] for i in infos], paths)


def _worker_env(n_devices: int) -> dict[str, str]:
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
    return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n_devices}".strip(),
            "JAX_PLATFORMS": "cpu"}


def _progress_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()

"""`RayProgramExecutor`: runs a `Program` on mesh workers, one call per worker per step.

The driver loads each mesh's fragments and instruction list into its workers once; a step is
then one `run_step` call per worker carrying only the step's inputs (object-store refs, or the
ids of buffers a worker already holds). Results stay on the workers; the driver gets
`RemoteArray` handles. The driver only waits: when a worker raises or dies, it aborts the
step on the others and raises an error naming the mesh, host and instruction.
"""
from __future__ import annotations

import itertools
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np

from meshweave.runtime.program import Program, TensorSig
from meshweave.runtime.ray import cluster as _cluster
from meshweave.runtime.ray.errors import (RayRuntimeError, StepAborted, StepTimeoutError, WorkerDiedError,
                                          WorkerStepError)
from meshweave.runtime.ray.shards import Piece, assemble, dtype_of, full_box

_PROGRAM_IDS = itertools.count(1)
_ABORT_GRACE_S = 5.0


@dataclass(frozen=True)
class RemoteSharding:
    """Where a RemoteArray lives: its mesh and the mesh axes each dimension is split over."""

    mesh: object          # runtime.program.MeshDesc
    spec: tuple           # per dimension: tuple of mesh axis names

    @property
    def num_devices(self) -> int:
        return len(self.mesh.device_ids)


class RemoteArray:
    """A buffer held by mesh workers. Shape, dtype and sharding are local; the value is fetched
    on demand (`np.asarray(a)`, `jax.device_get(a)`); the workers' copy is freed when the
    handle is garbage-collected or `delete()`d."""

    __meshweave_remote__ = True      # meshweave.parallelize accepts it as an argument (plugin/arguments.py)

    def __init__(self, handle: str, sig: TensorSig, mesh, group, epoch: int):
        self._handle = handle
        self.shape = tuple(sig.shape)
        self.dtype = dtype_of(sig.dtype)
        self.sharding = RemoteSharding(mesh, tuple(sig.sharding))
        self._group = group
        self._epoch = epoch
        self._fetching = None
        self._finalizer = weakref.finalize(self, group.pending_free.append, handle)

    ndim = property(lambda self: len(self.shape))
    size = property(lambda self: int(np.prod(self.shape, dtype=np.int64)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __repr__(self) -> str:
        return f"RemoteArray({self.shape}, {self.dtype}, mesh={self.sharding.mesh.name!r}, spec={self.sharding.spec})"

    def _check_live(self) -> None:
        if not self._finalizer.alive:
            raise RayRuntimeError(f"{self!r} was deleted")
        if not self._live():
            raise RayRuntimeError(f"{self!r} is gone: its workers were shut down or died")

    def copy_to_host_async(self) -> None:
        """Start fetching the value (jax.device_get calls this first)."""
        self._check_live()
        if self._fetching is None:
            self._fetching = [w.fetch.remote(self._handle) for w in self._group.workers]

    def __array__(self, dtype=None, copy=None):
        import ray

        self.copy_to_host_async()
        refs, self._fetching = self._fetching, None
        pieces = [Piece(tuple(map(tuple, b)), d) for boxes, datas in ray.get(refs) for b, d in zip(boxes, datas)]
        out = np.array(assemble(full_box(self.shape), pieces, self.dtype), copy=True)
        return out if dtype is None else out.astype(dtype, copy=False)

    def delete(self) -> None:
        """Free the workers' copy now (and wait for it)."""
        import ray

        if self._finalizer.detach() is not None and self._live():
            ray.get([w.free.remote([self._handle]) for w in self._group.workers])

    def _live(self) -> bool:
        c = _cluster._CLUSTER
        return c is not None and c.epoch == self._epoch and not self._group.dead


@dataclass
class StepStats:
    """What the last step cost: wall time on the driver and per worker seconds per instruction kind."""

    wall_s: float
    per_worker: dict[str, dict[str, float]]


class RayProgramExecutor:
    """Run `program` on the current Ray cluster: `executor(*flat_args) -> [RemoteArray, ...]`."""

    def __init__(self, program: Program, *, step_timeout: float = 300.0, load_timeout: float = 600.0):
        import ray

        self.program = program
        self.step_timeout = float(step_timeout)
        self._cluster = _cluster.current()
        self._id = next(_PROGRAM_IDS)
        self._step = 0
        self._closed: str | None = None
        self.last_stats: StepStats | None = None
        _validate(program)
        c = self._cluster
        self._groups = {m.name: c.group_for(m.device_ids, m.name) for m in program.meshes}
        peers = {m.name: self._groups[m.name].workers for m in program.meshes}
        peer_hosts = {m.name: len(self._groups[m.name].hosts) for m in program.meshes}
        t0 = time.perf_counter()
        loads = {}
        for m in program.meshes:
            g = self._groups[m.name]
            frags = tuple(f for f in program.fragments if f.mesh == m.name)
            placement = g.placement(m.device_ids, c.devices_per_host)
            for rank, w in enumerate(g.workers):
                ref = w.load.remote(self._id, m, placement, frags, program.instructions.get(m.name, ()),
                                    peers, peer_hosts)
                loads[ref] = (m.name, g.hosts[rank])
        ready, pending = ray.wait(list(loads), num_returns=len(loads), timeout=load_timeout)
        if pending:
            late = ", ".join(f"mesh {loads[r][0]!r} host {loads[r][1]}" for r in pending)
            raise RayRuntimeError(f"compiling the program's fragments took longer than {load_timeout} s on {late}")
        for r in ready:
            try:
                ray.get(r)
            except ray.exceptions.RayError as e:
                cause = getattr(e, "cause", None) or e
                raise RayRuntimeError(f"mesh {loads[r][0]!r} host {loads[r][1]}: loading the program failed: "
                                      f"{type(cause).__name__}: {cause}") from None
        self.load_s = time.perf_counter() - t0

    # ---- one step ---------------------------------------------------------------------------------
    def __call__(self, *args) -> list[RemoteArray]:
        import ray

        self._check_usable()
        prog, c = self.program, self._cluster
        if len(args) != len(prog.inputs):
            raise TypeError(f"program takes {len(prog.inputs)} flat arguments, got {len(args)}")
        self._step += 1
        step = self._step
        feeds: dict[str, list] = {m.name: [] for m in prog.meshes}
        refs: dict[str, list] = {m.name: [] for m in prog.meshes}
        puts: dict[int, object] = {}
        for b in prog.inputs:
            arg = args[b.index]
            if isinstance(arg, RemoteArray):
                _check_matches(b, arg.shape, arg.dtype)
                arg._check_live()
                if arg._group is self._groups[b.mesh]:
                    feeds[b.mesh].append((b.key, b.sig, b.micro_batches, ("held", arg._handle)))
                    continue
                src = [w.fetch.remote(arg._handle) for w in arg._group.workers]
            else:
                if b.index not in puts:
                    puts[b.index] = ray.put(_host_value(b, arg))
                src = [puts[b.index]]
            pos = list(range(len(refs[b.mesh]), len(refs[b.mesh]) + len(src)))
            refs[b.mesh].extend(src)
            feeds[b.mesh].append((b.key, b.sig, b.micro_batches, ("pieces", pos)))
        outs: dict[str, list] = {m.name: [] for m in prog.meshes}
        handles = []
        for o in prog.outputs:
            h = f"{self._id}.{step}.{o.index}"
            outs[o.mesh].append((o.key, h))
            handles.append((o, h))
        t0 = time.perf_counter()
        calls = {}
        for m in prog.meshes:
            g = self._groups[m.name]
            drop = g.take_pending_free()
            for rank, w in enumerate(g.workers):
                ref = w.run_step.remote(self._id, step, feeds[m.name], outs[m.name], drop, *refs[m.name])
                calls[ref] = (m.name, g.hosts[rank], rank)
        per_worker = self._wait(step, calls)
        self.last_stats = StepStats(time.perf_counter() - t0, per_worker)
        result = [None] * len(prog.outputs)
        for o, h in handles:
            result[o.index] = RemoteArray(h, o.sig, prog.mesh(o.mesh), self._groups[o.mesh], c.epoch)
        return result

    def compiled_text(self, fragment: str) -> str:
        """The compiled, SPMD-partitioned HLO of `fragment` from the first worker of its mesh."""
        import ray

        self._check_usable()
        mesh = self.program.fragment(fragment).mesh
        return ray.get(self._groups[mesh].workers[0].compiled_text.remote(self._id, fragment))

    def run_flat(self, flat_args) -> list[RemoteArray]:
        """The local executor's calling convention (`LocalProgramExecutor.run_flat`)."""
        return self(*flat_args)

    def _wait(self, step: int, calls: dict) -> dict[str, dict[str, float]]:
        import ray

        deadline = time.monotonic() + self.step_timeout
        pending, done = list(calls), {}
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                where = "; ".join(self._where(step, *calls[r]) for r in pending)
                self._abort(step, calls, pending)
                raise StepTimeoutError(f"step {step} did not finish within {self.step_timeout} s "
                                       f"(RayProgramExecutor(step_timeout=...)); still running: {where}")
            try:
                done[ready[0]] = ray.get(ready[0])
            except Exception:  # noqa: BLE001 - classified below, with every worker's outcome
                self._abort(step, calls, pending)
                raise self._failure(step, calls) from None
        return {f"{m}/h{h}": done[r] for r, (m, h, _) in calls.items()}

    def _abort(self, step: int, calls: dict, pending: list) -> None:
        import ray

        for r in pending:
            mesh, _, rank = calls[r]
            try:
                self._groups[mesh].workers[rank].abort.remote(self._id, step)
            except Exception:  # noqa: BLE001 - a dead worker needs no abort
                pass
        ray.wait(pending, num_returns=len(pending), timeout=_ABORT_GRACE_S)

    def _failure(self, step: int, calls: dict) -> Exception:
        """The most telling error among the workers: a death, else a real error, else a hang."""
        import ray

        died, raised, stuck, lost = [], [], [], set()
        for r, (mesh, host, rank) in calls.items():
            ready, _ = ray.wait([r], timeout=0)
            if not ready:
                stuck.append(self._where(step, mesh, host, rank))
                continue
            try:
                ray.get(r)
            except ray.exceptions.RayActorError as e:
                died.append(f"{self._where(step, mesh, host, rank)} died: {_first_line(e)}")
                lost.add(mesh)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, StepAborted):
                    continue
                raised.append(str(cause) if isinstance(cause, WorkerStepError) else str(e))
        for mesh in lost:                     # after reading every progress board
            _cluster.retire(self._groups[mesh])
        if died:
            self._closed = "a worker died: " + "; ".join(died)
            return WorkerDiedError(f"step {step} failed: " + "; ".join(died) +
                                   ". Its buffers are lost; this executor is closed: build a new one "
                                   "(shutdown() and start() if Ray itself went down)."
                                   + (f" Other workers stuck: {'; '.join(stuck)}" if stuck else ""))
        if raised:
            return WorkerStepError(f"step {step} failed: " + "\n".join(raised))
        return RayRuntimeError(f"step {step} failed; workers not finishing after abort: {'; '.join(stuck)}")

    def _where(self, step: int, mesh: str, host: int, rank: int) -> str:
        """'mesh M host H (pid P) at instruction I (run f mb0)' from the worker's progress board."""
        g = self._groups[mesh]
        path = g.progress_paths[rank]
        at = "instruction unknown (" + ("worker on another node)" if path is None else "its group was retired)")
        if path and os.path.exists(path):
            pid_, step_, idx = (int(v) for v in np.fromfile(path, dtype=np.int64, count=3))
            instrs = self.program.instructions.get(mesh, ())
            if pid_ != self._id or step_ != step:
                at = "before its first instruction"
            elif idx == -1:
                at = "while placing the step's inputs"
            elif idx == -2:
                at = "after finishing the step"
            elif 0 <= idx < len(instrs):
                at = f"at instruction {idx} ({instrs[idx].describe()})"
            else:
                at = "while collecting outputs"
        return f"mesh {mesh!r} host {host} (pid {g.pids[rank]}) {at}"

    def _check_usable(self) -> None:
        if self._closed:
            raise RayRuntimeError(f"this RayProgramExecutor is closed ({self._closed})")
        c = _cluster._CLUSTER
        if c is None or c.epoch != self._cluster.epoch:
            raise RayRuntimeError("the Ray runtime this executor ran on was shut down; "
                                  "start() again and build a new RayProgramExecutor")

    def close(self) -> None:
        """Drop this program's executables from the workers (their held buffers stay)."""
        if self._closed is None:
            self._closed = "close() was called"
            c = _cluster._CLUSTER
            if c is not None and c.epoch == self._cluster.epoch:
                for g in self._groups.values():
                    if not g.dead:
                        for w in g.workers:
                            w.unload.remote(self._id)


def _validate(program: Program) -> None:
    names = {m.name for m in program.meshes}
    for f in program.fragments:
        if f.mesh not in names:
            raise ValueError(f"fragment {f.name!r} is on mesh {f.mesh!r}, which the program does not declare")
    for mesh, instrs in program.instructions.items():
        if mesh not in names:
            raise ValueError(f"instructions for undeclared mesh {mesh!r}")
        for i, ins in enumerate(instrs):
            if ins.op == "run" and program.fragment(ins.fragment).mesh != mesh:
                raise ValueError(f"mesh {mesh!r} instruction {i} runs fragment {ins.fragment!r} of another mesh")
            if ins.op in ("send", "recv") and ins.peer not in names:
                raise ValueError(f"mesh {mesh!r} instruction {i} ({ins.describe()}) names unknown peer {ins.peer!r}")
    for b in program.inputs:
        if b.mesh not in names:
            raise ValueError(f"input {b.index} is bound to undeclared mesh {b.mesh!r}")
        if b.micro_batches > 1 and not b.sig.shape:
            raise ValueError(f"input {b.index} is split into {b.micro_batches} micro-batches but is a scalar")


def arg_shape(b) -> tuple[int, ...]:
    """The whole argument's shape: `b.sig` is one micro-batch's layout when it is split."""
    shape = tuple(b.sig.shape)
    return shape if b.micro_batches == 1 else (shape[0] * b.micro_batches,) + shape[1:]


def _check_matches(b, shape, dtype) -> None:
    if tuple(shape) != arg_shape(b):
        split = f" ({b.micro_batches} micro-batches of {tuple(b.sig.shape)})" if b.micro_batches > 1 else ""
        raise ValueError(f"argument {b.index} ({b.key!r}): shape {tuple(shape)}, the program expects "
                         f"{arg_shape(b)}{split}")
    if np.dtype(dtype) != dtype_of(b.sig.dtype):
        raise TypeError(f"argument {b.index} ({b.key!r}): dtype {np.dtype(dtype)}, the program expects "
                        f"{b.sig.dtype}")


def _host_value(b, arg) -> np.ndarray:
    x = np.asarray(arg)
    want = dtype_of(b.sig.dtype)
    if x.dtype != want:
        if not np.can_cast(x.dtype, want, casting="same_kind"):
            raise TypeError(f"argument {b.index} ({b.key!r}): dtype {x.dtype} cannot become {want}")
        x = x.astype(want)
    _check_matches(b, x.shape, x.dtype)
    return x if x.flags.c_contiguous else x.copy()      # (np.ascontiguousarray turns scalars into (1,))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__

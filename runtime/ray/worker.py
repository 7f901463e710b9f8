"""`MeshWorker`: the Ray actor that owns one host's devices of a mesh.

It compiles the fragments of its mesh from StableHLO text (device ids differ between
processes, so executables are built where they run), keeps buffers between steps, and runs its
mesh's instruction list once per step without asking the driver in between. Transfers go
worker to worker: a SEND calls the peer's `deliver` with per-shard numpy pieces (Ray puts big
ones in its object store; the peer reads them without a copy) and a RECV blocks on a condition
variable until they arrive, then reshards them onto its own mesh. The actor is threaded
(`max_concurrency`), so `deliver`, `abort` and `progress` are served while a step runs.
"""
from __future__ import annotations

import os
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np

from meshweave.runtime.program import FragmentDesc, Instruction, MeshDesc, TensorSig
from meshweave.runtime.ray.errors import StepAborted, WorkerStepError
from meshweave.runtime.ray.shards import Piece, assemble, box_of, dtype_of, full_box, pieces_of

# How long a RECV waits between checks of the abort flag (it is woken at once on abort or
# delivery; this only bounds a missed wake-up).
_RECV_POLL_S = 2.0
# Transfers up to this size are stitched on the host and placed with one device_put; bigger
# ones are placed block by block, each block a view of the received buffer (no copy).
_SMALL_BYTES = 1 << 20
# How long a finished step waits for its outgoing deliveries to be accepted.
_SEND_DRAIN_S = 60.0


@dataclass
class _Fragment:
    executable: object
    in_shardings: list
    out_shardings: list
    out_shapes: list


@dataclass
class _Loaded:
    mesh_desc: MeshDesc
    mesh: object                       # jax.sharding.Mesh over this worker's view of the devices
    fragments: dict[str, _Fragment]
    instructions: tuple[Instruction, ...]
    peers: dict[str, list]             # mesh name -> its workers' actor handles
    peer_hosts: dict[str, int]         # mesh name -> how many workers send to us per transfer


class _Outbox:
    """A step's outgoing transfers. Consecutive SENDs to one mesh travel in one `deliver` call
    (one Ray task: its submission, not the bytes, dominates small transfers); the batch leaves
    before the next non-SEND instruction, so nothing waits on it."""

    def __init__(self, program_id: int, step: int):
        self.program_id, self.step = program_id, step
        self.queued: dict[str, list] = {}
        self.pending: list = []

    def add(self, peer_mesh: str, key: str, payload: tuple) -> None:
        self.queued.setdefault(peer_mesh, []).append((key, payload))

    def flush(self, peers: dict[str, list]) -> None:
        for mesh, items in self.queued.items():
            workers = peers[mesh]
            # One argument: Ray serializes it once (pickle 5, numpy buffers out of band: big ones
            # land in the object store and the peer maps them without a copy).
            arg = items
            if len(workers) > 1:
                import ray

                arg = ray.put(items)       # stored once, read by every host of the peer mesh
            self.pending += [w.deliver.remote(self.program_id, self.step, arg) for w in workers]
        self.queued.clear()

    def drain(self) -> None:
        """Wait until the peers accepted every delivery (a dead peer raises here)."""
        import ray

        if self.pending:
            ray.get(self.pending, timeout=_SEND_DRAIN_S)


class MeshWorker:
    """One host's share of a device set; serves every program whose meshes use that set."""

    def __init__(self, mesh_label: str, host: int, rank: int, group_size: int, progress_path: str | None):
        self.mesh_label = mesh_label
        self.host = host
        self.rank = rank
        self.group_size = group_size
        self._programs: dict[int, _Loaded] = {}
        self._held: dict[str, object] = {}
        self._mail: dict[tuple, list[list[Piece]]] = {}
        self._cv = threading.Condition()
        self._aborted: set[tuple[int, int]] = set()
        self._progress = None
        if progress_path:
            self._progress = np.memmap(progress_path, dtype=np.int64, mode="w+", shape=(3,))
            self._progress[:] = -1
        self._add = None

    # ---- set-up -------------------------------------------------------------------------------
    def coordinator_address(self) -> str:
        """A free loopback/host port for jax.distributed (called on rank 0 only)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return f"{ip}:{s.getsockname()[1]}"

    def setup(self, coordinator: str | None = None) -> dict:
        """Initialise jax here (multi-process when the device set spans several workers)."""
        import jax

        if coordinator is not None:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=self.group_size,
                                       process_id=self.rank, coordinator_bind_address=coordinator)
        self._jax = jax
        return {"pid": os.getpid(), "local_devices": len(jax.local_devices()),
                "global_devices": len(jax.devices())}

    def load(self, program_id: int, mesh: MeshDesc, placement: tuple[tuple[int, int], ...],
             fragments: tuple[FragmentDesc, ...], instructions: tuple[Instruction, ...],
             peers: dict[str, list], peer_hosts: dict[str, int]) -> float:
        """Compile this mesh's fragments; `placement[i]` = (rank, local index) of mesh device i."""
        jax = self._jax
        from jax.sharding import AxisType, Mesh

        from meshweave.plugin.jax_adapter import compile_text_for_devices, executable_shardings

        t0 = time.perf_counter()
        by_rank: dict[int, list] = {}
        for d in jax.devices():
            by_rank.setdefault(d.process_index, []).append(d)
        for devs in by_rank.values():
            devs.sort(key=lambda d: d.id)
        if len(by_rank) == 1:          # single process: ranks in the placement are all ours
            by_rank = {self.rank: by_rank[next(iter(by_rank))]}
        devices = [by_rank[r][i] for r, i in placement]
        jmesh = Mesh(np.array(devices).reshape(mesh.shape), mesh.axis_names,
                     axis_types=(AxisType.Auto,) * len(mesh.shape))
        compiled = {}
        instructions = _with_recv_layouts(tuple(instructions), {f.name: f for f in fragments})
        for f in fragments:
            exe = compile_text_for_devices(f.mlir, devices)
            ins = executable_shardings(exe, devices, [self._named(jmesh, s) for s in f.inputs],
                                       [len(s.shape) for s in f.inputs], outputs=False)
            outs = executable_shardings(exe, devices, [self._named(jmesh, s) for s in f.outputs],
                                        [len(s.shape) for s in f.outputs], outputs=True)
            compiled[f.name] = _Fragment(exe, ins, outs, [tuple(s.shape) for s in f.outputs])
        self._programs[program_id] = _Loaded(mesh, jmesh, compiled, tuple(instructions), peers, peer_hosts)
        return time.perf_counter() - t0

    def compiled_text(self, program_id: int, fragment: str) -> str:
        return "\n".join(m.to_string() for m in self._programs[program_id].fragments[fragment].executable.hlo_modules())

    def unload(self, program_id: int) -> None:
        self._programs.pop(program_id, None)

    # ---- the step -------------------------------------------------------------------------------
    def run_step(self, program_id: int, step: int, feeds: list, out_handles: list, drop: list, *refs) -> dict:
        """Free `drop` (handles the driver let go), place the inputs, run the instruction list,
        keep the outputs under `out_handles`.

        feeds: (key, sig, micro_batches, source) with source ("pieces", [ref positions]) or
        ("held", handle id). Returns seconds spent per instruction kind.
        """
        prog = self._programs[program_id]
        spent: dict[str, float] = {}
        buf: dict[str, object] = {}
        out = _Outbox(program_id, step)
        index, ins = -1, None
        t_step = time.perf_counter()
        try:
            self._mark(program_id, step, -1)
            self.free(drop)
            for key, sig, mbs, source in feeds:
                self._feed(prog, buf, key, sig, mbs, source, refs)
            for index, ins in enumerate(prog.instructions):
                self._mark(program_id, step, index)
                if (program_id, step) in self._aborted:
                    raise StepAborted("aborted by the driver")
                t = time.perf_counter()
                if ins.op != "send" and out.queued:
                    out.flush(prog.peers)
                    spent["send"] = spent.get("send", 0.0) + time.perf_counter() - t
                    t = time.perf_counter()
                self._execute(prog, program_id, step, ins, buf, out)
                spent[ins.op] = spent.get(ins.op, 0.0) + time.perf_counter() - t
            index, ins = len(prog.instructions), None
            if out.queued:
                t = time.perf_counter()
                out.flush(prog.peers)
                spent["send"] = spent.get("send", 0.0) + time.perf_counter() - t
            for key, handle in out_handles:
                if key not in buf:
                    raise KeyError(f"output buffer {key!r} does not exist after the last instruction")
                self._held[handle] = buf[key]
            out.drain()
            spent["total"] = time.perf_counter() - t_step
        except StepAborted:
            raise
        except Exception as e:  # noqa: BLE001 - re-raised with where it happened
            what = ins.describe() if ins is not None else ("placing inputs" if index < 0 else "collecting outputs")
            raise WorkerStepError(
                f"mesh {prog.mesh_desc.name!r} host {self.host}: step {step}, instruction {index} "
                f"({what}) failed: {type(e).__name__}: {e}\n{traceback.format_exc()}") from None
        finally:
            self._mark(program_id, step, -2)
            with self._cv:
                self._aborted.discard((program_id, step))
                for k in [k for k in self._mail if k[0] == program_id and k[1] <= step]:
                    del self._mail[k]
        return spent

    def _execute(self, prog: _Loaded, program_id, step, ins: Instruction, buf, out: _Outbox) -> None:
        if ins.op == "run":
            frag = prog.fragments[ins.fragment]
            args = [self._placed(buf[k], s) for k, s in zip(ins.inputs, frag.in_shardings)]
            outs = frag.executable.execute_sharded(args).disassemble_into_single_device_arrays()
            for key, shards, sh, shape in zip(ins.outputs, outs, frag.out_shardings, frag.out_shapes):
                buf[key] = self._jax.make_array_from_single_device_arrays(shape, sh, shards)
            # Wait for the result here, so that time, errors and the progress board belong to
            # this instruction (the next one of a mesh needs its inputs anyway).
            self._jax.block_until_ready([buf[k] for k in ins.outputs])
        elif ins.op == "send":
            arr = buf[ins.inputs[0]]
            pieces = pieces_of(arr.addressable_shards, arr.shape)
            out.add(ins.peer, ins.inputs[0], ([p.box for p in pieces], [p.data for p in pieces]))
        elif ins.op == "recv":
            key = ins.outputs[0]
            pieces = self._wait_for(program_id, step, key, prog.peer_hosts[ins.peer])
            buf[key] = self._from_pieces(pieces, ins.sig, self._named(prog.mesh, ins.sig), 0)
        elif ins.op == "accumulate":
            src, dst = buf[ins.inputs[0]], ins.outputs[0]
            if dst in buf:
                if self._add is None:
                    self._add = self._jax.jit(lambda a, b: a + b)
                buf[dst] = self._add(buf[dst], src)
            else:
                buf[dst] = src
        elif ins.op == "free":
            for k in ins.inputs:
                buf.pop(k, None)
        else:
            raise ValueError(f"unknown instruction op {ins.op!r}")

    def deliver(self, program_id: int, step: int, items: list) -> None:
        """A peer's SENDs, as (key, (boxes, arrays)): kept until our RECV of each key takes them."""
        with self._cv:
            for key, (boxes, datas) in items:
                self._mail.setdefault((program_id, step, key), []).append(
                    [Piece(tuple(map(tuple, b)), d) for b, d in zip(boxes, datas)])
            self._cv.notify_all()

    def abort(self, program_id: int, step: int) -> None:
        with self._cv:
            self._aborted.add((program_id, step))
            self._cv.notify_all()

    def _wait_for(self, program_id, step, key, senders: int) -> list[Piece]:
        slot = (program_id, step, key)
        with self._cv:
            while len(self._mail.get(slot, ())) < senders:
                if (program_id, step) in self._aborted:
                    raise StepAborted("aborted by the driver while waiting for a transfer")
                self._cv.wait(_RECV_POLL_S)
            return [p for msg in self._mail.pop(slot) for p in msg]

    # ---- buffers ---------------------------------------------------------------------------------
    def _feed(self, prog: _Loaded, buf, key, sig: TensorSig, mbs: int, source, refs) -> None:
        sharding = self._named(prog.mesh, sig)
        kind, where = source
        if kind == "held":
            arr = self._held[where]
            if mbs == 1:
                buf[key] = self._placed(arr, sharding)
            else:
                b = sig.shape[0]
                for m in range(mbs):
                    buf[f"{key}#{m}"] = self._jax.device_put(arr[m * b:(m + 1) * b], sharding)
            return
        pieces = []
        for pos in where:
            got = refs[pos]
            if isinstance(got, np.ndarray):
                pieces.append(Piece(full_box(got.shape), got))
            else:
                boxes, datas = got
                pieces.extend(Piece(tuple(map(tuple, b)), d) for b, d in zip(boxes, datas))
        for m in range(mbs):       # sig is one micro-batch's layout
            k = key if mbs == 1 else f"{key}#{m}"
            buf[k] = self._from_pieces(pieces, sig, sharding, m * sig.shape[0] if mbs > 1 else 0)

    def _from_pieces(self, pieces, sig: TensorSig, sharding, dim0_offset: int):
        """A jax.Array with `sharding` built from host pieces (block i of device d = its index box)."""
        jax = self._jax
        shape = tuple(sig.shape)
        dtype = dtype_of(sig.dtype)
        if sharding.is_fully_addressable and np.prod(shape, dtype=np.int64) * dtype.itemsize <= _SMALL_BYTES:
            # Small: stitch on the host and place it in one call (cheaper than a call per device).
            region = tuple((a + (dim0_offset if i == 0 else 0), b + (dim0_offset if i == 0 else 0))
                           for i, (a, b) in enumerate(full_box(shape)))
            return jax.device_put(assemble(region, pieces, dtype), sharding)
        arrays = []
        for d, index in sharding.addressable_devices_indices_map(shape).items():
            box = box_of(index, shape)
            if dim0_offset and box:
                box = ((box[0][0] + dim0_offset, box[0][1] + dim0_offset),) + box[1:]
            block = assemble(box, pieces, dtype_of(sig.dtype))
            arrays.append(jax.device_put(block, d))
        return jax.make_array_from_single_device_arrays(shape, sharding, arrays)

    def _placed(self, arr, sharding):
        if arr.sharding == sharding or arr.sharding.is_equivalent_to(sharding, arr.ndim):
            return arr
        return self._jax.device_put(arr, sharding)

    @staticmethod
    def _named(jmesh, sig: TensorSig):
        from jax.sharding import NamedSharding, PartitionSpec

        spec = [None if not dims else (dims[0] if len(dims) == 1 else tuple(dims)) for dims in sig.sharding]
        if getattr(sig, "unreduced", ()):    # (trailing Nones dropped: jax's own form of the spec)
            while spec and spec[-1] is None:
                spec.pop()    # a partial sum (accumulated gradients): Explicit axes
            from jax.sharding import AxisType, Mesh

            jmesh = Mesh(jmesh.devices, jmesh.axis_names, axis_types=(AxisType.Explicit,) * len(jmesh.axis_names))
            return NamedSharding(jmesh, PartitionSpec(*spec, unreduced=frozenset(sig.unreduced)))
        return NamedSharding(jmesh, PartitionSpec(*spec))

    # ---- handles ----------------------------------------------------------------------------------
    def fetch(self, handle: str):
        """This worker's distinct pieces of a held array: (boxes, numpy arrays)."""
        arr = self._held[handle]
        pieces = pieces_of(arr.addressable_shards, arr.shape)
        return [p.box for p in pieces], [p.data for p in pieces]

    def free(self, handles: list[str]) -> None:
        for h in handles:
            self._held.pop(h, None)

    def held_count(self) -> int:
        return len(self._held)

    def _mark(self, program_id: int, step: int, index: int) -> None:
        if self._progress is not None:
            self._progress[0], self._progress[1], self._progress[2] = program_id, step, index

    def ping(self) -> int:
        return os.getpid()


def _with_recv_layouts(instructions: tuple[Instruction, ...], fragments: dict) -> tuple[Instruction, ...]:
    """Give each RECV without a destination layout the one its first reader on this mesh
    expects (a RUN's fragment input), so the value is resharded once, on arrival."""
    import dataclasses

    out = list(instructions)
    for i, ins in enumerate(instructions):
        if ins.op != "recv" or ins.sig is not None:
            continue
        key = ins.outputs[0]
        for later in instructions[i + 1:]:
            if later.op == "run" and key in later.inputs:
                out[i] = dataclasses.replace(ins, sig=fragments[later.fragment].inputs[later.inputs.index(key)])
                break
        else:
            raise ValueError(f"{ins.describe()}: no destination layout and no fragment on this mesh reads it")
    return tuple(out)

"""In-process execution of a multi-mesh `Program`: every mesh is a disjoint set of local devices.

The per-mesh instruction lists are interleaved in one thread: each mesh advances until it reaches
a RECV whose SEND has not run yet, then the next mesh gets its turn. jax dispatch is
asynchronous, so RUN returns at once and the host never waits between micro-batches; a RECV
is a `jax.device_put` to the destination sharding (the cross-mesh transfer and resharding in
one step).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from meshweave.runtime.placement import place
from meshweave.runtime.program import TensorSig, key_for


class PipelineRuntimeError(RuntimeError):
    """The program could not run; the message names the mesh and the instruction."""


def named_sharding(sig: TensorSig, mesh: Mesh) -> NamedSharding:
    dims = [None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in sig.sharding]
    if sig.unreduced:                    # a partial sum: jax wants Explicit axes for it
        from meshweave.plugin.compile import explicit_mesh

        return NamedSharding(explicit_mesh(mesh), PartitionSpec(*dims, unreduced=frozenset(sig.unreduced)))
    return NamedSharding(mesh, PartitionSpec(*dims))


@jax.jit
def _add(a, b):
    return a + b


class LocalProgramExecutor:
    """Runs a Program's compiled fragments (`compiled`: fragment name -> jax Compiled) in this process."""

    def __init__(self, step):
        program = step.program
        devices_by_id = {d.id: d for d in jax.devices()}
        self.program = program
        self.out_tree = step.out_tree
        self.compiled = {f.name: c for f, c in zip(program.fragments, step.compiled)}
        compiled = self.compiled
        self.meshes = {m.name: Mesh(np.array([devices_by_id[i] for i in m.device_ids]).reshape(m.shape), m.axis_names)
                       for m in program.meshes}
        self._input_shardings = [named_sharding(b.sig, self.meshes[b.mesh]) for b in program.inputs]
        # XLA's CPU client runs collectives of executables in flight together on one thread pool:
        # fragments dispatched back to back (no data dependence) could leave one simulated device
        # in the next fragment while seven wait in an all-reduce of the previous one, until XLA's
        # 40 s rendezvous timeout aborts the process. On CPU each fragment finishes before the next
        # starts (simulated devices gain nothing from the overlap); accelerators keep async dispatch.
        self._serialize = any(d.platform == "cpu" for m in self.meshes.values() for d in m.devices.flat)
        self._expected = {name: list(jax.tree.leaves(c.input_shardings[0],
                                                     is_leaf=lambda s: isinstance(s, jax.sharding.Sharding)))
                          for name, c in compiled.items()}

    @property
    def num_stages(self) -> int:
        return len(self.compiled)

    def stage_text(self, stage: int) -> str:
        return self.compiled[self.program.fragments[stage].name].as_text()

    def place(self, leaves) -> list:
        return [x if _same(x, s) else place(x, s) if b.micro_batches == 1 else x
                for x, s, b in zip((leaves[b.index] for b in self.program.inputs), self._input_shardings,
                                   self.program.inputs)]

    def run(self, leaves):
        return jax.tree.unflatten(self.out_tree, self.run_flat(list(leaves)))

    def run_flat(self, flat_args: list) -> list:
        prog = self.program
        stores: dict[str, dict] = {m.name: {} for m in prog.meshes}
        for b, sharding in zip(prog.inputs, self._input_shardings):
            x = flat_args[b.index]
            if b.micro_batches > 1:
                size = np.shape(x)[0] // b.micro_batches
                for m in range(b.micro_batches):
                    stores[b.mesh][key_for(b.key, m)] = jax.device_put(x[m * size:(m + 1) * size], sharding)
            else:
                stores[b.mesh][b.key] = x if _same(x, sharding) else place(x, sharding)
        sent: dict[tuple[str, str, str], object] = {}
        pcs = {name: 0 for name in prog.instructions}
        remaining = sum(len(v) for v in prog.instructions.values())
        while remaining:
            progressed = False
            for mesh_name, instructions in prog.instructions.items():
                store = stores[mesh_name]
                while pcs[mesh_name] < len(instructions):
                    ins = instructions[pcs[mesh_name]]
                    if ins.op == "recv" and (ins.outputs[0], ins.peer, mesh_name) not in sent:
                        break
                    try:
                        self._execute(ins, mesh_name, store, sent)
                    except PipelineRuntimeError:
                        raise
                    except Exception as e:
                        raise PipelineRuntimeError(f"mesh {mesh_name}: instruction {pcs[mesh_name]} "
                                                   f"({ins.describe()}) failed: {type(e).__name__}: {e}") from e
                    pcs[mesh_name] += 1
                    remaining -= 1
                    progressed = True
            if not progressed:
                waiting = {m: prog.instructions[m][pc].describe() for m, pc in pcs.items()
                           if pc < len(prog.instructions[m])}
                raise PipelineRuntimeError(f"pipeline deadlock: every mesh waits for a transfer: {waiting}")
        return [stores[b.mesh][b.key] for b in prog.outputs]

    def _execute(self, ins, mesh_name, store, sent) -> None:
        if ins.op == "run":
            expected = self._expected[ins.fragment]
            args = []
            for k, s in zip(ins.inputs, expected):
                x = store[k]
                args.append(x if _same(x, s) else place(x, s))
            outs = self.compiled[ins.fragment](*args)
            if self._serialize:
                jax.block_until_ready(outs)
            for k, v in zip(ins.outputs, outs):
                store[k] = v
        elif ins.op == "send":
            sent[(ins.inputs[0], mesh_name, ins.peer)] = store[ins.inputs[0]]
        elif ins.op == "recv":
            x = sent.pop((ins.outputs[0], ins.peer, mesh_name))
            mesh = self.meshes[mesh_name]
            dst = named_sharding(ins.sig, mesh) if ins.sig is not None else NamedSharding(mesh, PartitionSpec())
            mid = _send_once_layout(x.shape, dst, mesh)
            if mid is not None:      # each byte crosses meshes once, then the replicas are made inside the mesh
                x = jax.device_put(x, mid)
            store[ins.outputs[0]] = jax.device_put(x, dst)
        elif ins.op == "accumulate":
            src, dst = ins.inputs[0], ins.outputs[0]
            store[dst] = store[src] if dst not in store else _add(store[dst], store[src])
        elif ins.op == "free":
            for k in ins.inputs:
                store.pop(k, None)
        else:
            raise PipelineRuntimeError(f"mesh {mesh_name}: unknown instruction {ins.op!r}")


def _send_once_layout(shape, dst: NamedSharding, mesh: Mesh) -> NamedSharding | None:
    """Alpa's "send once, all-gather locally": when the destination layout replicates data, first
    land the value split over every device of the destination mesh (the first dimension the mesh
    size divides), so no byte crosses meshes twice; the reshard to `dst` then runs inside the mesh.
    None when `dst` replicates nothing or no dimension divides."""
    n = mesh.devices.size
    used = {a for d in dst.spec if d is not None for a in ((d,) if isinstance(d, str) else d)}
    if n == 1 or len(used) == len(mesh.axis_names):
        return None
    for i, size in enumerate(shape):
        if size % n == 0:
            spec = [None] * len(shape)
            spec[i] = tuple(mesh.axis_names)
            return NamedSharding(mesh, PartitionSpec(*spec))
    return None


def _same(x, sharding) -> bool:
    return isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim)


__all__ = ["LocalProgramExecutor", "PipelineRuntimeError", "named_sharding", "jnp"]

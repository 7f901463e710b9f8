"""Per-mesh instruction lists for a pipelined step: the schedule's task order made concrete.

Each stage's tasks (forward / backward of micro-batch m, then apply-grad) come from
runtime/schedules.py. For every task the emitter adds the RECVs of inputs produced on another
mesh, the RUN, the SENDs of outputs other meshes read, the ACCUMULATEs of gradient-marked
outputs, and FREEs after each micro-batch buffer's last use. A value crosses meshes once per
destination mesh (and micro-batch), however many fragments there read it.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshweave.runtime.program import Instruction, key_for


class EmitError(ValueError):
    """The step's dataflow cannot be pipelined as asked; the message names the value and the fix."""


@dataclass(frozen=True)
class FragmentIO:
    """What the emitter needs of an outlined fragment (passes/stage_outlining.Fragment)."""

    name: str
    stage: int
    phase: str
    mesh: str
    inputs: tuple            # stage_outlining.Source per input
    num_outputs: int


def value_name(src) -> str:
    return f"arg{src.arg}" if src.arg is not None else f"{src.fragment}.{src.index}"


def source_key(src, reader_per_mb: bool, mb: int | None, frags: dict, batch_args: set[int],
               num_micro_batches: int, what: str) -> str:
    """The buffer key a reader uses for `src` (see runtime/program.py for the key scheme)."""
    name = value_name(src)
    if src.arg is not None:
        return key_for(name, mb if src.arg in batch_args and num_micro_batches > 1 else None)
    producer_per_mb = frags[src.fragment].phase != "apply"
    if not producer_per_mb:
        return name
    if reader_per_mb:
        return key_for(name, mb)
    if src.accumulated:
        return "acc:" + name
    if src.batch_dependent and num_micro_batches > 1:
        raise EmitError(f"{what} reads a batch-dependent value of {src.fragment} that is not a meshweave.grad "
                        "output; with num_micro_batches > 1 only the loss, aux outputs and gradients of "
                        "meshweave.value_and_grad leave the micro-batch loop (return per-example values as aux)")
    return key_for(name, 0)


def emit(fragments: list[FragmentIO], orders: dict[int, list[tuple[str, int | None]]], mesh_of_stage: list[str],
         batch_args: set[int], num_micro_batches: int, keep: set[tuple[str, str]]) -> dict[str, list[Instruction]]:
    """Instruction lists per mesh. orders: stage -> [(phase, micro_batch or None for apply)].
    keep: (mesh, key) pairs that must survive the step (step outputs)."""
    frags = {f.name: f for f in fragments}
    by_task = {(f.stage, f.phase): f for f in fragments}
    lists: dict[str, list[Instruction]] = {m: [] for m in dict.fromkeys(mesh_of_stage)}
    # Who reads what from another mesh: (src fragment/arg name, reader mesh).
    sent_to: dict[str, set[str]] = {}
    for f in fragments:
        for src in f.inputs:
            if src.fragment is not None and frags[src.fragment].mesh != f.mesh:
                sent_to.setdefault(src.fragment, set()).add(f.mesh)
    acc_outputs = {(s.fragment, s.index) for f in fragments if f.phase == "apply" for s in f.inputs
                   if s.fragment is not None and s.accumulated and frags[s.fragment].phase != "apply"}
    received: set[tuple[str, str]] = set()
    pending_step_sends: dict[str, list[Instruction]] = {}
    for stage, tasks in sorted(orders.items()):
        mesh = mesh_of_stage[stage]
        out = lists[mesh]
        for phase, mb in tasks:
            f = by_task.get((stage, phase))
            if f is None:
                continue
            per_mb = phase != "apply"
            if not per_mb:
                out += pending_step_sends.pop(mesh, [])
            keys = []
            for src in f.inputs:
                key = source_key(src, per_mb, mb, frags, batch_args, num_micro_batches, f"fragment {f.name}")
                if src.fragment is not None and frags[src.fragment].mesh != mesh and (key, mesh) not in received:
                    out.append(Instruction("recv", outputs=(key,), peer=frags[src.fragment].mesh, micro_batch=mb))
                    received.add((key, mesh))
                keys.append(key)
            outs = tuple(key_for(f"{f.name}.{i}", mb if per_mb else None) for i in range(f.num_outputs))
            out.append(Instruction("run", inputs=tuple(keys), outputs=outs, fragment=f.name, micro_batch=mb))
            for i in range(f.num_outputs):
                if per_mb and (f.name, i) in acc_outputs:
                    out.append(Instruction("accumulate", inputs=(outs[i],), outputs=("acc:" + f"{f.name}.{i}",),
                                           micro_batch=mb))
            for dst in sorted(sent_to.get(f.name, ())):
                for i in range(f.num_outputs):
                    readers = [g for g in fragments if g.mesh == dst and any(
                        s.fragment == f.name and s.index == i for s in g.inputs)]
                    if not readers:
                        continue
                    if per_mb and any(g.phase != "apply" for g in readers):
                        out.append(Instruction("send", inputs=(outs[i],), peer=dst, micro_batch=mb))
                    if per_mb and any(g.phase == "apply" for g in readers):
                        src = next(s for g in readers for s in g.inputs if s.fragment == f.name and s.index == i)
                        key = source_key(src, False, None, frags, batch_args, num_micro_batches, f"fragment {dst}")
                        if key.startswith("acc:") or mb == 0:
                            ins = Instruction("send", inputs=(key,), peer=dst)
                            if ins not in pending_step_sends.setdefault(mesh, []):
                                pending_step_sends[mesh].append(ins)
                    if not per_mb:
                        out.append(Instruction("send", inputs=(outs[i],), peer=dst))
    for mesh, sends in pending_step_sends.items():
        lists[mesh] += sends
    return {m: _with_frees(ins, {k for mm, k in keep if mm == m}) for m, ins in lists.items()}


def _with_frees(instructions: list[Instruction], keep: set[str]) -> list[Instruction]:
    """FREE each micro-batch buffer after its last use on this mesh (step outputs are kept)."""
    last: dict[str, int] = {}
    for i, ins in enumerate(instructions):
        for k in ins.inputs + ins.outputs:
            last[k] = i
    frees: dict[int, list[str]] = {}
    for k, i in last.items():
        if "#" in k and k not in keep:
            frees.setdefault(i, []).append(k)
    out = []
    for i, ins in enumerate(instructions):
        out.append(ins)
        if i in frees:
            out.append(Instruction("free", inputs=tuple(sorted(frees[i]))))
    return out

"""What a runtime backend executes: meshes, compiled-fragment descriptions, per-mesh instruction lists.

A `Program` is the hand-off between the compiler and any executor (local, Ray). It is plain data
(picklable, no jax objects), so a driver can ship it to workers. A single-mesh step is the
degenerate case: one mesh, one fragment, one RUN instruction.

Buffers are named by *keys*: `"<value>"` for per-step values (parameters, optimizer state,
accumulated gradients) and `"<value>#<m>"` for micro-batch `m`'s copy of a value (`key_for`).
Each mesh runs its instruction list in order; a RECV waits for the matching SEND (same key,
peer meshes swapped). Transfers carry the destination sharding, so the receiver reshards on
arrival.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# One entry per tensor dimension: the mesh axes it is split over, outermost first.
DimSharding = tuple[str, ...]


def key_for(value: str, micro_batch: int | None) -> str:
    """The buffer key of `value` for `micro_batch` (None: a per-step value)."""
    return value if micro_batch is None else f"{value}#{micro_batch}"


@dataclass(frozen=True)
class MeshDesc:
    """A (sub-)mesh: its logical shape and the global ids of its devices, row-major."""

    name: str
    shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    device_ids: tuple[int, ...]


@dataclass(frozen=True)
class TensorSig:
    """Shape, dtype and sharding (over its mesh) of one buffer. `unreduced`: mesh axes over which
    the buffer is a partial sum (each device holds a summand; a pipeline's accumulated gradients
    until apply-grad sums them)."""

    shape: tuple[int, ...]
    dtype: str
    sharding: tuple[DimSharding, ...]
    unreduced: tuple[str, ...] = ()


@dataclass(frozen=True)
class FragmentDesc:
    """One compiled unit: a StableHLO module (`mlir`, @main with sdy shardings for `mesh`).

    kind: "step" (a whole single-mesh step), "forward", "backward", "apply".
    Inputs and outputs are positional and match @main's arguments and results.
    """

    name: str
    mesh: str
    kind: Literal["step", "forward", "backward", "apply"]
    stage: int
    mlir: str
    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]
    donated: tuple[int, ...] = ()


@dataclass(frozen=True)
class Instruction:
    """RUN a fragment, SEND/RECV a buffer between meshes, ACCUMULATE (dst += src), or FREE buffers.

    run:        fragment, inputs (keys, positional), outputs (keys, positional)
    send:       inputs=(key,), peer = destination mesh
    recv:       outputs=(key,), peer = source mesh, sig = the destination layout (None: the layout
                of the first fragment on this mesh that reads the key)
    accumulate: inputs=(src key,), outputs=(dst key,): dst = src if absent, else dst + src
    free:       inputs = keys whose last use has passed
    """

    op: Literal["run", "send", "recv", "accumulate", "free"]
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    fragment: str | None = None
    peer: str | None = None
    sig: TensorSig | None = None
    micro_batch: int | None = None      # for reports and plots only

    def describe(self) -> str:
        what = self.fragment or ",".join(self.inputs or self.outputs)
        mb = f" mb{self.micro_batch}" if self.micro_batch is not None else ""
        peer = f" {'->' if self.op == 'send' else '<-'} {self.peer}" if self.peer else ""
        return f"{self.op} {what}{mb}{peer}"


@dataclass(frozen=True)
class InputBinding:
    """Where flat step argument `index` goes: onto `mesh` as `key` (split into `micro_batches` along
    dimension 0, keys `key#0..`, when micro_batches > 1). `sig` is the layout of what lands under
    one key: for a split argument, one micro-batch's shape and sharding."""

    index: int
    mesh: str
    key: str
    sig: TensorSig
    micro_batches: int = 1


@dataclass(frozen=True)
class OutputBinding:
    """Flat step result `index` is buffer `key` on `mesh` after the last instruction."""

    index: int
    mesh: str
    key: str
    sig: TensorSig


@dataclass(frozen=True)
class Program:
    meshes: tuple[MeshDesc, ...]
    fragments: tuple[FragmentDesc, ...]
    instructions: dict[str, tuple[Instruction, ...]]      # mesh name -> its list, in order
    inputs: tuple[InputBinding, ...]
    outputs: tuple[OutputBinding, ...]
    schedule: str = "single"
    num_micro_batches: int = 1
    notes: dict = field(default_factory=dict)

    def mesh(self, name: str) -> MeshDesc:
        for m in self.meshes:
            if m.name == name:
                return m
        raise KeyError(f"program has no mesh {name!r}; meshes: {[m.name for m in self.meshes]}")

    def fragment(self, name: str) -> FragmentDesc:
        for f in self.fragments:
            if f.name == name:
                return f
        raise KeyError(f"program has no fragment {name!r}")

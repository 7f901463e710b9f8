"""Host-side pieces of a sharded array: what travels between workers, and resharding on arrival.

A sender ships each distinct shard of its local devices once (replicas are not repeated) as a
numpy array plus the global box it covers. A receiver builds the block each of its devices
needs: when one piece covers the block exactly it is used as is (zero-copy from Ray's object
store into `jax.device_put`), otherwise the block is cut and stitched from the overlapping
pieces. Pure numpy, so it is testable without Ray or jax devices.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Box = tuple[tuple[int, int], ...]     # per dimension: [start, stop)


@dataclass(frozen=True)
class Piece:
    box: Box
    data: np.ndarray


def box_of(index: tuple, shape: tuple[int, ...]) -> Box:
    """The box of a numpy index made of slices (jax's `Shard.index`), on an array of `shape`."""
    out = []
    for sl, n in zip(index, shape):
        start, stop, step = sl.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {sl} is not supported")
        out.append((start, stop))
    return tuple(out) + tuple((0, n) for n in shape[len(index):])


def pieces_of(shards, shape: tuple[int, ...]) -> list[Piece]:
    """Distinct pieces of jax `addressable_shards`: one numpy view per box (replicas dropped)."""
    seen: dict[Box, Piece] = {}
    for s in shards:
        b = box_of(s.index, shape)
        if b not in seen:
            seen[b] = Piece(b, np.asarray(s.data))
    return list(seen.values())


def assemble(box: Box, pieces: list[Piece], dtype) -> np.ndarray:
    """The block `box` of the global array from pieces that cover it.

    A piece with exactly this box is returned as is (no copy). Otherwise the block is filled
    from the overlapping pieces; a region no piece covers is an error, never left as garbage.
    """
    for p in pieces:
        if p.box == box:
            return p.data
    shape = tuple(b - a for a, b in box)
    out = np.empty(shape, dtype=dtype)
    covered = np.zeros(shape, dtype=bool) if pieces else None
    for p in pieces:
        lo = [max(a, pa) for (a, _), (pa, _) in zip(box, p.box)]
        hi = [min(b, pb) for (_, b), (_, pb) in zip(box, p.box)]
        if any(l >= h for l, h in zip(lo, hi)):
            continue
        dst = tuple(slice(l - a, h - a) for l, h, (a, _) in zip(lo, hi, box))
        src = tuple(slice(l - pa, h - pa) for l, h, (pa, _) in zip(lo, hi, p.box))
        out[dst] = p.data[src]
        covered[dst] = True
    if covered is None or not covered.all():
        raise ValueError(f"received pieces {[p.box for p in pieces]} do not cover block {box}")
    return out


def dtype_of(name: str) -> np.dtype:
    """numpy dtype of a TensorSig dtype name (bfloat16 and friends come from ml_dtypes)."""
    try:
        return np.dtype(name)
    except TypeError:
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))


def full_box(shape: tuple[int, ...]) -> Box:
    return tuple((0, n) for n in shape)

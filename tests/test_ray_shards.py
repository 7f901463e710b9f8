"""Host-side pieces and resharding used by Ray transfers (no Ray needed)."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meshweave.runtime.ray.shards import Piece, assemble, box_of, dtype_of, full_box, pieces_of


def test_exact_piece_is_used_without_copy():
    data = np.arange(12, dtype=np.float32).reshape(3, 4)
    out = assemble(((0, 3), (0, 4)), [Piece(((0, 3), (0, 4)), data)], np.float32)
    assert out is data


def test_block_stitched_from_pieces_of_another_layout():
    full = np.arange(64, dtype=np.float32).reshape(8, 8)
    rows = [Piece(((r, r + 2), (0, 8)), full[r:r + 2]) for r in range(0, 8, 2)]     # split on dim 0
    block = assemble(((1, 7), (4, 8)), rows, np.float32)                              # a column block
    np.testing.assert_array_equal(block, full[1:7, 4:8])


def test_uncovered_block_is_an_error():
    full = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="do not cover"):
        assemble(full_box((4, 4)), [Piece(((0, 2), (0, 4)), full[:2])], np.float32)


def test_pieces_drop_replicas():
    mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    x = jax.device_put(np.arange(16, dtype=np.float32).reshape(4, 4), NamedSharding(mesh, P("a", None)))
    pieces = pieces_of(x.addressable_shards, x.shape)
    assert sorted(p.box for p in pieces) == [((0, 2), (0, 4)), ((2, 4), (0, 4))]
    np.testing.assert_array_equal(assemble(full_box((4, 4)), pieces, np.float32), np.asarray(x))


def test_box_and_dtype_helpers():
    assert box_of((slice(2, 4),), (8, 3)) == ((2, 4), (0, 3))
    assert box_of((), ()) == ()
    assert dtype_of("bfloat16").name == "bfloat16"
    with pytest.raises(ValueError, match="strided"):
        box_of((slice(0, 8, 2),), (8,))

"""The α-β cost model and the strategy algebra on Shardy sharding rules (no compilation)."""
import pytest

from meshweave.dialects.sharding import MeshSpec, TensorSharding as T
from meshweave.passes import sharding_rules as sr
from meshweave.passes.cost_model import LogicalMesh

MESH = MeshSpec.from_shape((2, 4))          # axes x=2, y=4


@pytest.fixture
def lm():
    return LogicalMesh.create(MESH, alpha=(1, 1), beta=(1, 0.1))


def test_collective_formulas(lm):
    # Units: the fastest link's byte (beta 0.1) costs 1, so beta becomes (10, 1), alpha (10, 10).
    assert lm.beta == (10.0, 1.0) and lm.alpha == (10.0, 10.0)
    n = 4000.0
    assert lm.all_reduce(n, ("y",)) == pytest.approx(10 + 1 * 2 * 3 / 4 * n + 0.01)
    assert lm.all_gather(n, ("x",)) == pytest.approx(10 + 10 * 1 / 2 * n + 0.1)
    assert lm.reduce_scatter(n, ("y",)) == pytest.approx(10 + 3 / 4 * n + 0.001)
    # a group over both axes pays the slowest link
    assert lm.all_reduce(n, ("x", "y")) == pytest.approx(10 + 10 * 2 * 7 / 8 * n + 0.01)
    assert lm.to_user_units(lm.all_reduce(n, ("y",))) == pytest.approx(0.1 * lm.all_reduce(n, ("y",)))


def test_resharding(lm):
    n = 8000.0
    rep, row, col = T(((), ())), T((("y",), ())), T(((), ("y",)))
    assert lm.reshard(n, rep, row) == 0                     # slicing is free
    assert lm.reshard(n, T((("x",), ())), T((("x", "y"), ()))) == 0
    assert lm.reshard_plan(n, row, rep) == [("all-gather", ("y",), n)]
    assert lm.reshard_plan(n, row, col)[0][0] == "all-to-all"  # moving an axis between dims
    assert lm.reshard(n, row, col) < lm.reshard(n, row, rep)
    nogather = LogicalMesh.create(MESH, allow_all_gather=False)
    assert nogather.reshard(n, row, rep) == float("inf")


def test_dot_strategies_from_rule():
    # [i, k] x [k, j] -> [i, j], k summed
    rule = sr.Rule((32, 256, 64), (((0,), (2,)), ((2,), (1,))), (((0,), (1,)),), reduction=frozenset({2}))
    strategies = sr.enumerate_assignments(rule, MESH, use_all_axes=True)
    assert all(sum(len(a) for a in s) == 2 for s in strategies)   # heavy op: no replicated compute
    names = {sr.describe(rule, a, MESH) for a in strategies}
    assert "[x,y] x [y,-] -> [x,-] (sum @ y)" in names          # Megatron row-parallel, batch on x
    assert "[x,-] x [-,y] -> [x,y]" in names                    # column-parallel
    assert "[xy,-] x [-,-] -> [xy,-]" in names                  # data parallel on both axes
    # a factor of 6 cannot take y (4) or x,y (8)
    small = sr.Rule((6, 8, 8), rule.operands, rule.results, reduction=rule.reduction)
    for a in sr.enumerate_assignments(small, MESH):
        assert "y" not in a[0]


def test_need_replication_and_compound_dims():
    # reshape [i, (k l)] -> [i, k, l] with k=4, l=16: l may only be split if k is fully split
    rule = sr.Rule((8, 4, 16), (((0,), (1, 2)),), (((0,), (1,), (2,)),))
    for a in sr.enumerate_assignments(rule, MESH):
        if a[2]:
            assert MESH.axes_size(a[1]) == 4, a
    blocked = sr.Rule((8, 16), (((0,), (1,)),), (((0,), (1,)),), need_replication=frozenset({1}))
    assert all(not a[1] for a in sr.enumerate_assignments(blocked, MESH))


def test_induced_assignment_follows_operand():
    rule = sr.Rule((8, 4, 16), (((0,), (1, 2)),), (((0,), (1,), (2,)),))
    a = sr.induced_assignment(rule, 0, T((("x",), ("y",))), MESH)
    assert sr.tensor_sharding(rule.results[0], a, MESH) == T((("x",), ("y",), ()))
    # a split the rule cannot carry (minor factor only) is dropped, i.e. gathered
    rule2 = sr.Rule((8, 1, 16), (((0,), (1, 2)),), (((0,), (1,), (2,)),))
    a2 = sr.induced_assignment(rule2, 0, T(((), ("y",))), MESH)
    assert sr.tensor_sharding(rule2.results[0], a2, MESH) == T(((), (), ("y",)))


def test_trip_count_of_counted_and_data_dependent_loops():
    import jax
    import jax.numpy as jnp
    from jaxlib.mlir import ir

    from meshweave.dialects.context import parse_module
    from meshweave.passes.cost_graph import trip_count

    def f(x):
        y = jax.lax.scan(lambda h, w: (h * w, None), x, jnp.ones((5, 3)))[0]
        z = jax.lax.fori_loop(2, 9, lambda i, h: h + i, y)
        return jax.lax.while_loop(lambda h: h.sum() < 100, lambda h: h * 2, z)

    module = parse_module(jax.jit(f).lower(jnp.ones(3)).as_text())
    trips = []

    def visit(op):
        if op.name == "stablehlo.while":
            trips.append(trip_count(op))
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    assert trips == [5, 7, None]        # scan, fori_loop(2, 9), data-dependent


def _layouts(rank=2):
    """Every layout of a rank-`rank` tensor on MESH (each axis on at most one dim, both orders)."""
    import itertools

    out = set()
    for pick in itertools.product(range(rank + 1), repeat=2):
        for order in (("x", "y"), ("y", "x")):
            dims = [[] for _ in range(rank)]
            for ax in order:
                d = pick[("x", "y").index(ax)]
                if d < rank:
                    dims[d].append(ax)
            out.add(T(tuple(tuple(d) for d in dims)))
    return sorted(out, key=str)


@pytest.mark.parametrize("alpha,beta", [((1, 1), (1, 0.1)), ((1000, 1), (1, 1)), ((0, 0), (0.1, 1))])
def test_edge_costs_price_the_predicted_collectives(alpha, beta):
    # The solver prices an edge with reshard_affine; the plan reports reshard_plan's collectives.
    # They must describe the same collectives at every size (small tensors included).
    lm = LogicalMesh.create(MESH, alpha=alpha, beta=beta)
    layouts = _layouts()
    checked = 0
    for src in layouts:
        for dst in layouts:
            for n in (0.0, 4.0, 512.0, 1e8):
                assert lm.reshard(n, src, dst) == pytest.approx(lm.plan_cost(lm.reshard_plan(n, src, dst))), \
                    (src, dst, n)
                checked += 1
    assert checked == len(layouts) ** 2 * 4 and len(layouts) >= 9


def test_unknown_element_type_is_an_error_not_four_bytes():
    from jaxlib.mlir import ir

    from meshweave.passes.cost_graph import UnknownDtypeError, tensor_bytes

    with ir.Context():
        assert tensor_bytes(ir.Type.parse("tensor<8x4xbf16>")) == 64
        assert tensor_bytes(ir.Type.parse("tensor<8xi1>")) == 8
        assert tensor_bytes(ir.Type.parse("tensor<3xi4>")) == 2
        assert tensor_bytes(ir.Type.parse("tensor<2xcomplex<f32>>")) == 16
        with pytest.raises(UnknownDtypeError, match="element type 'index'"):
            tensor_bytes(ir.Type.parse("tensor<2xindex>"))


def test_relayout_within_one_dim_is_priced_as_xla_moves_it():
    # Root cause (ZeRO's optimizer state [-,xy] -> [-,y]): XLA permutes the tiles once at the
    # smaller per-device size, then all-gathers what dst holds more; no all-to-all.
    lm = LogicalMesh.create(MeshSpec(("x", "y"), (2, 4)))
    n = 4096.0
    assert lm.reshard_plan(n, T(((), ("x", "y"))), T(((), ("y",)))) == [
        ("collective-permute", ("x", "y"), n / 8), ("all-gather", ("x",), n / 4)]
    assert lm.reshard_plan(n, T((("y",),)), T((("x", "y"),))) == [("collective-permute", ("y", "x"), n / 8)]
    assert lm.reshard_plan(n, T((("x", "y"),)), T((("y", "x"),))) == [("collective-permute", ("x", "y"), n / 8)]
    # an axis arriving from another dim is still an all-to-all
    assert lm.reshard_plan(n, T((("x",), ("y",))), T((("x", "y"), ())))[0][0] == "all-to-all"

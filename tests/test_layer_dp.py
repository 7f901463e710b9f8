"""Layer clustering DP (passes/layer_dp.py): exact against brute force, balance, errors."""
import itertools
import random

import pytest

from meshweave.passes.layer_dp import (LayerBalanceWarning, LayerClusteringError, LayerOp,
                                       cluster_layers)


def random_ops(rng, n):
    """n ops in program order; each defines one value and uses a few earlier ones (or arguments)."""
    ops = []
    for i in range(n):
        flops = 0.0 if rng.random() < 0.3 else float(rng.randint(1, 9))
        uses = tuple(f"v{j}" for j in rng.sample(range(i), min(i, rng.randint(0, 3))))
        if rng.random() < 0.3:
            uses += ("param",)                     # an argument: never counted
        ops.append(LayerOp(flops, defs=((f"v{i}", rng.choice([1, 4, 16, 64])),), uses=uses))
    return ops


def boundary_bytes(ops, cuts):
    """Per layer: bytes of values defined in an earlier layer and used in this one."""
    bounds = list(cuts) + [len(ops)]
    layer = {i: j for j in range(len(cuts)) for i in range(bounds[j], bounds[j + 1])}
    where = {vid: (layer[i], b) for i, op in enumerate(ops) for vid, b in op.defs}
    out = [0] * len(cuts)
    for j in range(len(cuts)):
        needed = {vid for i in range(bounds[j], bounds[j + 1]) for vid in ops[i].uses
                  if vid in where and where[vid][0] < j}
        out[j] = sum(where[v][1] for v in needed)
    return out


def brute_force(ops, K, eps):
    """Least (bytes, sum of squared FLOPs) over all cuts; the FLOP bound relaxed as the DP does."""
    n = len(ops)
    total = sum(op.flops for op in ops)
    plans = []
    for inner in itertools.combinations(range(1, n), K - 1):
        cuts = (0,) + inner
        bounds = list(cuts) + [n]
        fl = [sum(op.flops for op in ops[bounds[j]:bounds[j + 1]]) for j in range(K)]
        if all(any(op.flops > 0 for op in ops[bounds[j]:bounds[j + 1]]) for j in range(K)):
            plans.append((cuts, fl))
    limit = (1 + eps) * total / K
    if not any(max(fl) <= limit * (1 + 1e-9) for _, fl in plans):
        limit = min(max(fl) for _, fl in plans)
    return min((sum(boundary_bytes(ops, cuts)), sum(f * f for f in fl), cuts)
               for cuts, fl in plans if max(fl) <= limit * (1 + 1e-9))


@pytest.mark.filterwarnings("ignore::meshweave.passes.layer_dp.LayerBalanceWarning")  # relaxing is legitimate here
@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 11)
    ops = random_ops(rng, n)
    heavy = sum(op.flops > 0 for op in ops)
    if heavy == 0:
        with pytest.raises(LayerClusteringError, match="no op has FLOPs"):
            cluster_layers(ops, 1)
        return
    K = rng.randint(1, heavy)
    eps = rng.choice([0.0, 0.1, 0.5, 2.0])
    got = cluster_layers(ops, K, eps)
    want_bytes, want_sq, _ = brute_force(ops, K, eps)
    assert got.total_boundary_bytes == want_bytes
    assert sum(f * f for f in got.layer_flops) == pytest.approx(want_sq)
    assert list(got.boundary_bytes) == boundary_bytes(ops, got.cuts)
    assert len(got.cuts) == K and got.cuts[0] == 0 and list(got.cuts) == sorted(set(got.cuts))
    assert max(got.layer_flops) <= got.flops_limit * (1 + 1e-9)
    assert got.eps >= eps and (got.eps == eps) == (not got.warnings)


def chain(flops, act_bytes):
    """A straight-line network: op i uses op i-1's output (act_bytes[i-1] bytes)."""
    return [LayerOp(f, defs=((i, act_bytes[i]),), uses=((i - 1,) if i else ("x",)))
            for i, f in enumerate(flops)]


def test_cuts_at_the_narrow_activation():
    # Six equal ops; the value after op 2 is tiny, the others large: two layers cut there.
    ops = chain([1.0] * 6, [100, 100, 1, 100, 100, 100])
    got = cluster_layers(ops, 2)
    assert got.cuts == (0, 3)
    assert got.boundary_bytes == (0, 1)
    assert got.layer_of(2) == 0 and got.layer_of(3) == 1


def test_balance_bound_wins_over_bytes():
    # The narrow point is after op 0, but a layer of 1 op vs 5 ops breaks eps=0.5.
    ops = chain([1.0] * 6, [1, 100, 100, 100, 100, 100])
    got = cluster_layers(ops, 2, eps=0.5)
    assert max(got.layer_flops) <= 4.5
    assert got.cuts[1] in (2, 3, 4)
    loose = cluster_layers(ops, 2, eps=10.0)
    assert loose.cuts == (0, 1)


def test_value_used_by_two_later_layers_counts_twice():
    ops = [LayerOp(1.0, defs=(("a", 8),)), LayerOp(1.0, uses=("a",), defs=(("b", 1),)),
           LayerOp(1.0, uses=("a", "b"))]
    got = cluster_layers(ops, 3)
    assert got.boundary_bytes == (0, 8, 9)


def test_relaxes_balance_with_a_warning():
    ops = chain([10.0, 1.0, 1.0], [1, 1, 1])
    with pytest.warns(LayerBalanceWarning, match="relaxed"):
        got = cluster_layers(ops, 2, eps=0.1)
    assert got.cuts == (0, 1) and got.flops_limit == 10.0
    assert got.eps == pytest.approx(10.0 * 2 / 12 - 1)
    assert got.warnings


def test_zero_flop_ops_join_neighbours():
    ops = chain([0.0, 5.0, 0.0, 0.0, 5.0, 0.0], [8, 8, 1, 8, 8, 8])
    got = cluster_layers(ops, 2)
    assert got.cuts == (0, 3) and got.layer_flops == (5.0, 5.0)


@pytest.mark.parametrize("ops,K,eps,match", [
    (chain([1.0, 0.0, 1.0], [1, 1, 1]), 3, 0.5, "only 2 of the 3 forward ops have FLOPs"),
    (chain([1.0], [1]), 0, 0.5, "layer_num=0"),
    (chain([1.0], [1]), 1, -1.0, "eps=-1.0"),
    ([LayerOp(-1.0)], 1, 0.5, r"ops\[0\].flops=-1.0"),
    ([LayerOp(1.0, uses=("b",)), LayerOp(1.0, defs=(("b", 4),))], 1, 0.5, "program order"),
    ([LayerOp(1.0, defs=(("b", 4),)), LayerOp(1.0, defs=(("b", 4),))], 1, 0.5, "defined twice"),
    ([LayerOp(1.0, defs=(("b", 2.5),))], 1, 0.5, "nbytes=2.5"),
    (["op"], 1, 0.5, "expected a LayerOp"),
])
def test_errors(ops, K, eps, match):
    with pytest.raises(LayerClusteringError, match=match):
        cluster_layers(ops, K, eps)


def test_a_thousand_ops_is_quick():
    # A 24-block transformer-like chain with residual uses; just that it runs (no timing asserted).
    ops = []
    for b in range(24):
        base = len(ops)
        for j in range(40):
            i = len(ops)
            uses = (i - 1,) if i else ("x",)
            if j == 0 and b:
                uses += (base - 20,)
            ops.append(LayerOp(100.0 if j % 10 == 0 else 0.0, defs=((i, 64 if j else 16),), uses=uses))
    got = cluster_layers(ops, 24)
    assert len(got.cuts) == 24 and max(got.layer_flops) <= got.flops_limit


def test_malformed_defs():
    with pytest.raises(LayerClusteringError, match=r"defs entry 'a': expected \(value_id, nbytes\)"):
        cluster_layers([LayerOp(1.0, defs=("a",))], 1)

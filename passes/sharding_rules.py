"""Strategy algebra on Shardy op sharding rules.

`sdy-populate-op-sharding-rules` gives every op a factor mapping: each tensor dimension is a
product of factors; a factor shared by operands and results must be sharded alike; reduction
factors (e.g. a dot's contracting dimension) leave partial sums to all-reduce. A *strategy*
assigns mesh axes to factors. From one assignment follow the sharding of every operand and
result, so one rule-driven enumerator covers dot_general, convolution, reduce, gather,
scatter, reshape, transpose, broadcast and every elementwise op alike.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

from jaxlib.mlir.dialects import sdy

from meshweave.dialects.sharding import MeshSpec, TensorSharding

Assignment = tuple[tuple[str, ...], ...]   # per factor: the mesh axes splitting it


@dataclass(frozen=True)
class Rule:
    factor_sizes: tuple[int, ...]
    operands: tuple[tuple[tuple[int, ...], ...], ...]   # per operand, per dim: factor indices
    results: tuple[tuple[tuple[int, ...], ...], ...]
    reduction: frozenset = frozenset()
    need_replication: frozenset = frozenset()
    permutation: frozenset = frozenset()

    @classmethod
    def from_attr(cls, attr) -> "Rule":
        r = sdy.OpShardingRuleAttr(attr)

        def maps(ms):
            return tuple(tuple(tuple(sdy.DimMappingAttr(d).factor_indices) for d in sdy.TensorMappingAttr(t).dim_mappings)
                         for t in ms)

        return cls(tuple(r.factor_sizes), maps(r.operand_mappings), maps(r.result_mappings),
                   frozenset(r.reduction_factors), frozenset(r.need_replication_factors),
                   frozenset(r.permutation_factors))

    @classmethod
    def identity(cls, shape) -> "Rule":
        """A tensor on its own (function arguments): one factor per dimension."""
        return cls(tuple(shape), (), (tuple((i,) for i in range(len(shape))),))

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def shardable(self, f: int) -> bool:
        return f not in self.need_replication and f not in self.permutation and self.factor_sizes[f] > 1


def whole_compound_dims(rule: Rule) -> Rule:
    """`rule` with every factor of a compound operand dimension that holds a permutation factor (a
    strided spatial dimension: window x output) kept whole (need replication); grouped features
    (groups x features per group) stay splittable.

    Shardy writes a strided convolution's input spatial dimension as (window x output) factors and
    lets the window factor be split with the kernel's and summed; compiled that way, a
    non-overlapping (patch-embedding) convolution split over its window gave a different result
    from jax.jit (a ViT on 4x2, 0.12 off in the loss), so the planner never offers such splits."""
    compound = {f for dims in rule.operands for fs in dims
                if len(fs) > 1 and any(f in rule.permutation for f in fs) for f in fs}
    if not compound - rule.need_replication:
        return rule
    return Rule(rule.factor_sizes, rule.operands, rule.results, rule.reduction,
                rule.need_replication | frozenset(compound), rule.permutation)


_SHARDINGS: dict = {}


def tensor_sharding(dims: tuple[tuple[int, ...], ...], a: Assignment, mesh: MeshSpec) -> TensorSharding:
    """The layout of a tensor whose dims map to `dims` factors under assignment `a` (memoized:
    the same few layouts recur across thousands of ops)."""
    key = (dims, a, mesh.name)
    ts = _SHARDINGS.get(key)
    if ts is None:
        if len(_SHARDINGS) > 1_000_000:
            _SHARDINGS.clear()
        ts = _SHARDINGS[key] = TensorSharding(tuple(tuple(ax for f in factors for ax in a[f]) for factors in dims),
                                              mesh.name)
    return ts


def _prefix_ok(dims, a: Assignment, mesh: MeshSpec, sizes) -> bool:
    """A compound dimension (a reshape's merged dims) may only be split on its major factors."""
    for factors in dims:
        if len(factors) < 2:
            continue
        open_ = False
        for f in factors:
            if sizes[f] == 1:
                continue
            if a[f] and open_:
                return False
            if mesh.axes_size(a[f]) != sizes[f]:
                open_ = True
    return True


def valid(rule: Rule, a: Assignment, mesh: MeshSpec) -> bool:
    for f, axes in enumerate(a):
        if axes and (not rule.shardable(f) or rule.factor_sizes[f] % mesh.axes_size(axes)):
            return False
    return all(_prefix_ok(t, a, mesh, rule.factor_sizes) for t in rule.operands + rule.results)


def enumerate_assignments(rule: Rule, mesh: MeshSpec, *, use_all_axes: bool = False,
                          allowed=None) -> list[Assignment]:
    """Every valid way to give each mesh axis (of size > 1) to at most one factor.

    Several axes on one factor keep mesh order. `use_all_axes` keeps only assignments that use
    every axis (heavy ops: no replicated compute) when any such assignment exists. `allowed`
    filters assignments (e.g. a forced batch split).
    """
    axes = [a for a, s in zip(mesh.axis_names, mesh.shape) if s > 1]
    choices = [f for f in range(rule.num_factors) if rule.shardable(f)]
    out = []
    for pick in itertools.product([None] + choices, repeat=len(axes)):
        a = [()] * rule.num_factors
        for ax, f in zip(axes, pick):
            if f is not None:
                a[f] = a[f] + (ax,)
        a = tuple(a)
        if valid(rule, a, mesh) and (allowed is None or allowed(a)):
            out.append(a)
    if use_all_axes:
        full = [a for a in out if sum(len(x) for x in a) == len(axes)]
        if full:
            out = full
    return out


_INDUCED: dict = {}


def induced_assignment(rule: Rule, operand: int, sharding: TensorSharding, mesh: MeshSpec) -> Assignment:
    """The assignment implied by one operand's sharding (what a follower op does).

    Axes that cannot carry over (a factor that must be replicated, a split the rule cannot
    express) are dropped: the operand is then gathered on them first.
    """
    key = (rule, operand, sharding, mesh)
    hit = _INDUCED.get(key)
    if hit is None:
        if len(_INDUCED) > 1_000_000:
            _INDUCED.clear()
        hit = _INDUCED[key] = _induced(rule, operand, sharding, mesh)
    return hit


def _induced(rule: Rule, operand: int, sharding: TensorSharding, mesh: MeshSpec) -> Assignment:
    a = [()] * rule.num_factors
    for factors, axes in zip(rule.operands[operand], sharding.dims):
        fi, remaining = 0, None
        for ax in axes:
            n = mesh.axis_size(ax)
            while fi < len(factors) and (remaining == 1 or rule.factor_sizes[factors[fi]] == 1):
                fi, remaining = fi + 1, None
            if fi >= len(factors):
                break
            f = factors[fi]
            if remaining is None:
                remaining = rule.factor_sizes[f]
            if remaining % n or not rule.shardable(f):
                break
            a[f] = a[f] + (ax,)
            remaining //= n
    a = tuple(a)
    return a if valid(rule, a, mesh) else _largest_valid_prefix(rule, a, mesh)


def _largest_valid_prefix(rule: Rule, a: Assignment, mesh: MeshSpec) -> Assignment:
    cur = list(a)
    for f in range(len(cur)):
        while cur[f] and not valid(rule, tuple(cur), mesh):
            cur[f] = cur[f][:-1]
    return tuple(cur) if valid(rule, tuple(cur), mesh) else tuple(() for _ in cur)


def reduced_axes(rule: Rule, a: Assignment) -> tuple[str, ...]:
    """Mesh axes over which the op's results hold partial sums (sharded reduction factors)."""
    return tuple(ax for f in sorted(rule.reduction) for ax in a[f])


def describe(rule: Rule, a: Assignment, mesh: MeshSpec) -> str:
    """'[x,-] x [-,y] -> [x,y]' (operands -> results), plus '(all-reduce @ y)' for partial sums."""
    ops = " x ".join(tensor_sharding(d, a, mesh).short() for d in rule.operands)
    res = ", ".join(tensor_sharding(d, a, mesh).short() for d in rule.results)
    red = reduced_axes(rule, a)
    return f"{ops} -> {res}" + (f" (sum @ {','.join(red)})" if red else "")


def halo_free_conv_rule(op) -> None:
    """Mark a convolution's window factors unshardable where splitting them needs halos.

    When a kernel spans its whole input dim (a weight gradient: input 8, window 8, padding 1,
    output 3), Shardy's rule gives the input and kernel spatial dims one shared reduction factor,
    as if each device could sum its slice of the window alone; but every output position reads
    input rows across the slice boundary, so XLA exchanges halos (collective-permutes) the plan
    never priced. Such a factor is exact only for an output dim of size 1; otherwise it gets
    need_replication (rewritten in place, so rule-keyed memos see a different rule)."""
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import stablehlo as hlo

    attr = op.attributes["sdy.sharding_rule"]
    rule = Rule.from_attr(attr)
    dn = hlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
    out_shape = ir.RankedTensorType(op.result.type).shape
    lhs, rhs, out = rule.operands[0], rule.operands[1], rule.results[0]
    halo = set()
    for k, (i, w, o) in enumerate(zip(dn.input_spatial_dimensions, dn.kernel_spatial_dimensions,
                                      dn.output_spatial_dimensions)):
        if out_shape[o] > 1:
            halo |= set(lhs[i]) & set(rhs[w]) & rule.reduction
    halo -= rule.need_replication
    if not halo:
        return
    r = sdy.OpShardingRuleAttr(attr)
    op.attributes["sdy.sharding_rule"] = sdy.OpShardingRuleAttr.get(
        list(r.factor_sizes), list(r.operand_mappings), list(r.result_mappings),
        reduction_factors=list(r.reduction_factors),
        need_replication_factors=sorted(set(r.need_replication_factors) | halo),
        permutation_factors=list(r.permutation_factors), is_custom=r.is_custom, context=op.context)

"""Memo tables that let the cost graph cost each op *signature* once.

A 24-layer transformer repeats one layer's few hundred ops 24 times: the same sharding rule
(an MLIR attribute, uniqued by its context), the same operand layouts, the same sizes. What an
op's strategies imply (its results' and operands' layouts, its partial sums) and what they cost
depends only on that signature, so `CostMemo` computes it on first sight and hands the same
answer to every repeat. Layouts are interned (`Layout`: one object per distinct tuple of
shardings, hashed by identity), so signature keys hash in constant time instead of walking
nested tuples. Everything cached is computed exactly as without the memo: same floats, same plans.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshweave.dialects.sharding import TensorSharding
from meshweave.passes import sharding_rules as sr
from meshweave.passes.cost_model import LogicalMesh


class Layout(tuple):
    """A tensor's sharding per strategy of its group. Interned by `CostMemo.layout`: equal contents
    are one object, so identity is equality and hashing is O(1)."""

    __slots__ = ()
    __hash__ = object.__hash__
    __eq__ = object.__eq__
    __ne__ = object.__ne__


@dataclass(frozen=True, eq=False)
class OpPlan:
    """What an op's strategies imply, shared by every op with the same signature."""

    strategies: tuple                       # OpStrategy per strategy
    names: tuple[str, ...] | None           # anchors: each strategy described
    results: tuple[Layout, ...]             # per result: its layout per strategy
    operands: tuple[Layout, ...]            # per operand: the layout each strategy requires
    sums: tuple[tuple[int, str, tuple[str, ...], tuple[int, ...]], ...]
    """(strategy, "all-reduce" | "reduce-scatter", reduced axes, per result: shards before the
    reduction) for every strategy that leaves partial sums."""


def result_sharding(rule: sr.Rule, st, r: int, mesh) -> TensorSharding:
    """Result r's sharding under strategy `st` (a reduce-scatter adds the reduced axes to its factor)."""
    a = st.a
    if st.scatter is not None:
        red = sr.reduced_axes(rule, a)
        a = tuple(ax + red if f == st.scatter else ax for f, ax in enumerate(a))
    return sr.tensor_sharding(rule.results[r], a, mesh)


class _Forgetful(dict):
    """A table that stores nothing (``CostMemo(share=False)``: every op costed afresh)."""

    def __setitem__(self, key, value):
        pass


class CostMemo:
    """Per cost graph (its entries depend on the mesh, its α-β costs and the graph's options).
    ``share=False`` turns every table off: each op is costed from scratch, as a reference."""

    def __init__(self, lmesh: LogicalMesh, share: bool = True):
        self.lmesh = lmesh
        self.mesh = lmesh.mesh
        table = dict if share else _Forgetful
        self._layouts, self._rules, self._plans, self._sums = table(), table(), table(), table()
        self._reshards, self._matrices, self._affine = table(), table(), table()
        self._compute = table()
        self.arguments = table()          # the cost graph's: argument signature -> its strategies

    @property
    def op_signatures(self) -> int:
        """Distinct op signatures costed (op plans built)."""
        return len(self._plans)

    def layout(self, shardings) -> Layout:
        key = tuple(shardings)
        hit = self._layouts.get(key)
        if hit is None:
            hit = self._layouts[key] = Layout(key)
        return hit

    def rule(self, attr) -> sr.Rule:
        """The op sharding rule of an `sdy.sharding_rule` attribute (uniqued by MLIR: one per signature)."""
        hit = self._rules.get(attr)
        if hit is None:
            hit = self._rules[attr] = sr.Rule.from_attr(attr)
        return hit

    def op_plan(self, key, rule: sr.Rule, make_strategies, named: bool) -> OpPlan:
        """The plan for signature `key` (which must determine `make_strategies()`'s answer)."""
        plan = self._plans.get(key)
        if plan is not None:
            return plan
        mesh = self.mesh
        strategies = tuple(make_strategies())
        names = tuple(sr.describe(rule, st.a, mesh) + (" scatter" if st.scatter is not None else "")
                      for st in strategies) if named else None
        results = tuple(self.layout(result_sharding(rule, st, r, mesh) for st in strategies)
                        for r in range(len(rule.results)))
        operands = tuple(self.layout(sr.tensor_sharding(dims, st.a, mesh) for st in strategies)
                         for dims in rule.operands)
        sums = []
        for s, st in enumerate(strategies):
            red = sr.reduced_axes(rule, st.a)
            if red:
                shards = tuple(mesh.axes_size(sr.tensor_sharding(dims, st.a, mesh).used_axes())
                               for dims in rule.results)
                if st.scatter is not None:
                    sums.append((s, "reduce-scatter", red, shards))
                else:   # XLA all-reduces a sum over several split factors once per factor, in turn
                    sums += [(s, "all-reduce", st.a[f], shards) for f in sorted(rule.reduction) if st.a[f]]
        plan = self._plans[key] = OpPlan(strategies, names, results, operands, tuple(sums))
        return plan

    def sum_charges(self, plan: OpPlan, result_bytes: tuple[int, ...], scale: float) -> tuple:
        """((strategy, cost, (kind, axes, per-device bytes before)), ...) for the plan's partial sums."""
        key = (plan, result_bytes, scale)
        hit = self._sums.get(key)
        if hit is None:
            out = []
            for s, kind, red, shards in plan.sums:
                for nbytes, n in zip(result_bytes, shards):
                    step = (kind, red, nbytes / n)
                    out.append((s, self.lmesh.plan_cost([step]) * scale, step))
            hit = self._sums[key] = tuple(out)
        return hit

    def compute_charges(self, plan: OpPlan, flops: float, flop_cost: float) -> np.ndarray:
        """Per strategy, the cost of computing `flops` (the op's total) split over the devices the
        strategy shards it over (a reduce-scatter variant computes as its all-reduce one); read-only."""
        key = (plan, flops, flop_cost)
        hit = self._compute.get(key)
        if hit is None:
            hit = np.array([flops / self.mesh.axes_size(tuple(a for axes in st.a for a in axes)) * flop_cost
                            for st in plan.strategies])
            hit.flags.writeable = False
            hit = self._compute[key] = hit
        return hit

    def reshard_charges(self, src: Layout, dst: Layout, nbytes: int, scale: float) -> tuple:
        """((strategy, cost, collectives), ...) for a tensor laid out `src` needed as `dst`, both
        indexed by one group's strategies (strategies that only slice are left out)."""
        key = (src, dst, nbytes, scale)
        hit = self._reshards.get(key)
        if hit is None:
            out = []
            for s, (a, b) in enumerate(zip(src, dst)):
                plan = self.lmesh.reshard_plan(nbytes, a, b)
                if plan:
                    out.append((s, self.lmesh.plan_cost(plan) * scale, plan))
            hit = self._reshards[key] = tuple(out)
        return hit

    def edge_matrix(self, src: Layout, dst: Layout, nbytes: int, scale: float) -> np.ndarray:
        """Resharding cost per (src strategy, dst strategy), read-only; computed once per distinct
        pair of shardings and size."""
        key = (src, dst, nbytes, scale)
        hit = self._matrices.get(key)
        if hit is not None:
            return hit
        su, si = _distinct(src)
        du, di = _distinct(dst)
        small = np.empty((len(su), len(du)))
        for i, a in enumerate(su):
            for j, b in enumerate(du):
                terms = self._affine.get((a, b))
                if terms is None:
                    terms = self._affine[(a, b)] = self.lmesh.reshard_terms(a, b)
                small[i, j] = min(c0 + c1 * nbytes for c0, c1 in terms)
        small = small * scale
        hit = small[np.ix_(si, di)]
        hit.flags.writeable = False
        self._matrices[key] = hit
        return hit


def _distinct(shardings) -> tuple[list, np.ndarray]:
    """(distinct shardings in first-seen order, index of each entry among them)."""
    first: dict = {}
    index = np.array([first.setdefault(s, len(first)) for s in shardings], dtype=np.int64)
    return list(first), index

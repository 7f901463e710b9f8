"""Layer clustering (AutoLayerOption): cut the forward ops into contiguous layers.

Stage construction works on layers, not ops, so the forward ops (in program order) are first
grouped into `layer_num` contiguous layers that
- balance compute: every layer's FLOPs <= (1 + eps) * total / layer_num, and every layer holds
  at least one op with FLOPs (a layer of only cheap ops is no pipeline stage worth having);
- cut where little data crosses: the objective is the bytes of values defined in one layer and
  used in a later one, summed over the consuming layers (a value used by two later layers has to
  reach both). Values no op defines (arguments, parameters) are inputs everywhere and not counted.
Ties go to the plan with the smaller sum of squared layer FLOPs (the more even one). Both terms
add up over layers, so a DP over (layers so far, next op) is exact. When no cut meets the FLOP
bound, the bound is raised to the least achievable one and the clustering records a warning.

Pure Python + numpy: the pass that traces the program turns its forward ops into `LayerOp`s.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

_TOL = 1e-9


class LayerClusteringError(ValueError):
    """Ops or options that cannot be clustered; the message says what to change."""


class LayerBalanceWarning(UserWarning):
    """No clustering meets the FLOP balance bound; a looser one was used."""


@dataclass(frozen=True)
class LayerOp:
    """One forward op: its FLOPs, the values it defines (id, bytes) and the values it uses."""

    flops: float
    defs: tuple[tuple[Hashable, int], ...] = ()
    uses: tuple[Hashable, ...] = ()


@dataclass(frozen=True)
class LayerClustering:
    """The layers: op ranges [cuts[j], cuts[j+1]) (the last one ends at num_ops).

    boundary_bytes[j]: bytes of values defined in layers before j and used in layer j.
    flops_limit: the per-layer FLOP bound that was applied; eps: the balance slack it
    corresponds to (larger than requested when relaxed, see warnings).
    """

    cuts: tuple[int, ...]
    num_ops: int
    layer_flops: tuple[float, ...]
    boundary_bytes: tuple[int, ...]
    total_boundary_bytes: int
    flops_limit: float
    eps: float
    warnings: tuple[str, ...] = ()

    @property
    def layer_ranges(self) -> tuple[tuple[int, int], ...]:
        ends = self.cuts[1:] + (self.num_ops,)
        return tuple(zip(self.cuts, ends))

    def layer_of(self, op_index: int) -> int:
        """The layer that op `op_index` belongs to."""
        if not 0 <= op_index < self.num_ops:
            raise IndexError(f"op index {op_index} out of range 0..{self.num_ops - 1}")
        return int(np.searchsorted(self.cuts, op_index, side="right")) - 1


def cluster_layers(ops: Sequence[LayerOp], layer_num: int, eps: float = 0.5) -> LayerClustering:
    """Group `ops` (forward ops in program order) into `layer_num` contiguous layers; exact DP."""
    if not isinstance(layer_num, int) or isinstance(layer_num, bool) or layer_num < 1:
        raise LayerClusteringError(f"layer_num={layer_num!r}: expected an integer >= 1")
    if not (isinstance(eps, (int, float)) and math.isfinite(eps) and eps >= 0):
        raise LayerClusteringError(f"eps={eps!r}: expected a finite number >= 0 (the allowed FLOP imbalance)")
    flops = np.array([_check_flops(op, i) for i, op in enumerate(ops)], dtype=np.float64)
    n = len(ops)
    heavy = int((flops > 0).sum())
    if layer_num > heavy:
        raise LayerClusteringError(
            f"layer_num={layer_num} but only {heavy} of the {n} forward ops have FLOPs; each layer needs at least "
            f"one: use layer_num <= {heavy}" + ("" if heavy else " (no op has FLOPs: nothing to cluster)"))
    uses = _use_lists(ops)
    prefix = np.concatenate([[0.0], np.cumsum(flops)])
    heavy_prefix = np.concatenate([[0], np.cumsum(flops > 0)])
    limit = (1 + eps) * prefix[-1] / layer_num
    notes: list[str] = []
    plan = _dp(n, layer_num, prefix, heavy_prefix, uses, limit)
    if plan is None:
        least = _least_max_flops(n, layer_num, prefix, heavy_prefix)
        used_eps = least * layer_num / prefix[-1] - 1
        notes.append(f"no {layer_num}-layer clustering keeps every layer within (1 + {eps:g}) x the average FLOPs; "
                     f"the bound was relaxed to the least achievable, eps = {used_eps:.4g}")
        warnings.warn(notes[-1], LayerBalanceWarning, stacklevel=2)
        limit, eps = least, used_eps
        plan = _dp(n, layer_num, prefix, heavy_prefix, uses, limit)
        assert plan is not None
    cuts = tuple(plan)
    ends = cuts[1:] + (n,)
    bytes_in = tuple(int(_column(uses, n, r)[l]) for l, r in zip(cuts, ends))
    return LayerClustering(cuts=cuts, num_ops=n,
                           layer_flops=tuple(float(prefix[r] - prefix[l]) for l, r in zip(cuts, ends)),
                           boundary_bytes=bytes_in, total_boundary_bytes=sum(bytes_in),
                           flops_limit=float(limit), eps=float(eps), warnings=tuple(notes))


def _check_flops(op, i) -> float:
    if not isinstance(op, LayerOp):
        raise LayerClusteringError(f"ops[{i}] is a {type(op).__name__}; expected a LayerOp")
    if not (isinstance(op.flops, (int, float)) and math.isfinite(op.flops) and op.flops >= 0):
        raise LayerClusteringError(f"ops[{i}].flops={op.flops!r}: expected a finite number >= 0")
    return float(op.flops)


def _use_lists(ops) -> list[list[tuple[int, int, int]]]:
    """For each op r: (definition index, previous use index or -1, bytes) of every value it uses."""
    defined: dict[Hashable, tuple[int, int]] = {}
    for i, op in enumerate(ops):
        for d in op.defs:
            try:
                vid, nbytes = d
            except (TypeError, ValueError):
                raise LayerClusteringError(f"ops[{i}].defs entry {d!r}: expected (value_id, nbytes)") from None
            if not isinstance(nbytes, (int, np.integer)) or isinstance(nbytes, bool) or nbytes < 0:
                raise LayerClusteringError(f"ops[{i}] defines {vid!r} with nbytes={nbytes!r}; expected an integer >= 0")
            if vid in defined:
                raise LayerClusteringError(f"value {vid!r} is defined twice (ops[{defined[vid][0]}] and ops[{i}]); "
                                           "value ids must be unique")
            defined[vid] = (i, int(nbytes))
    last_use: dict[Hashable, int] = {}
    out = []
    for r, op in enumerate(ops):
        here = []
        for vid in dict.fromkeys(op.uses):        # a value used twice by one op counts once
            if vid not in defined:
                continue                          # an argument: available to every layer
            d, nbytes = defined[vid]
            if d >= r:
                raise LayerClusteringError(f"ops[{r}] uses {vid!r}, which ops[{d}] defines: ops must be in program "
                                           "order (every value defined before its uses)")
            here.append((d, last_use.get(vid, -1), nbytes))
            last_use[vid] = r
        out.append(here)
    return out


def _column(uses, n, r) -> np.ndarray:
    """in_bytes[l] for the layer [l, r), every l <= r: bytes defined before l and used in [l, r)."""
    diff = np.zeros(n + 2, dtype=np.int64)
    for j in range(r):
        for d, prev, nbytes in uses[j]:
            lo = max(d, prev) + 1          # l must be after the definition and after the previous use
            if lo <= j:
                diff[lo] += nbytes
                diff[j + 1] -= nbytes
    return np.cumsum(diff)[:n + 1]


def _dp(n, K, prefix, heavy_prefix, uses, limit):
    """Cut positions minimizing (boundary bytes, sum of squared FLOPs) under the FLOP limit, or None."""
    big = np.iinfo(np.int64).max // 4
    fa = np.full((K + 1, n + 1), big, dtype=np.int64)    # bytes
    fq = np.full((K + 1, n + 1), np.inf)                 # sum of squared layer FLOPs
    arg = np.full((K + 1, n + 1), -1, dtype=np.int64)
    fa[0, 0], fq[0, 0] = 0, 0.0
    col = np.zeros(n + 1, dtype=np.int64)
    diff = np.zeros(n + 2, dtype=np.int64)
    slack = limit * (1 + _TOL) + _TOL
    for r in range(1, n + 1):
        # Extend the column to layers ending at r: op r-1's uses count for every l after their
        # definition and previous use.
        for d, prev, nbytes in uses[r - 1]:
            lo = max(d, prev) + 1
            if lo <= r - 1:
                diff[lo] += nbytes
                diff[r] -= nbytes
        col = np.cumsum(diff)[:n + 1]
        ls = np.arange(r)
        ok = (prefix[r] - prefix[ls] <= slack) & (heavy_prefix[r] - heavy_prefix[ls] >= 1)
        if not ok.any():
            continue
        sq = (prefix[r] - prefix[ls]) ** 2
        a = np.where(ok[None, :] & (fa[:K, :r] < big), fa[:K, :r] + col[None, :r], big)   # [k-1, l]
        q = fq[:K, :r] + sq[None, :]
        amin = a.min(axis=1)
        q = np.where(a == amin[:, None], q, np.inf)
        best = q.argmin(axis=1)
        valid = amin < big
        fa[1:, r] = np.where(valid, amin, big)
        fq[1:, r] = np.where(valid, q[np.arange(K), best], np.inf)
        arg[1:, r] = np.where(valid, best, -1)
    if fa[K, n] >= big:
        return None
    cuts, r = [], n
    for k in range(K, 0, -1):
        r = int(arg[k, r])
        cuts.append(r)
    return cuts[::-1]


def _least_max_flops(n, K, prefix, heavy_prefix) -> float:
    """The least possible max layer FLOPs over K contiguous layers with one heavy op each."""
    g = np.full((K + 1, n + 1), np.inf)
    g[0, 0] = 0.0
    for r in range(1, n + 1):
        ls = np.arange(r)
        ok = heavy_prefix[r] - heavy_prefix[ls] >= 1
        cand = np.maximum(g[:K, :r], (prefix[r] - prefix[ls])[None, :])
        g[1:, r] = np.where(ok[None, :], cand, np.inf).min(axis=1)
    return float(g[K, n])

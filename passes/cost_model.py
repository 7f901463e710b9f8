"""α-β cost model of a logical device mesh: collectives, resharding, per-device memory.

Costs are in the mesh's own units: `alpha[a]` per collective step on axis a (latency) plus
`beta[a]` per byte moved (inverse bandwidth). A collective over several axes uses the
slowest of them. Small constant tie-breakers (as in Alpa) make the solver prefer, at equal
bytes, reduce-scatter over all-reduce over all-to-all over all-gather.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from meshweave.dialects.sharding import MeshSpec, TensorSharding

INF = float("inf")
TIE_ALL_REDUCE = 0.01
TIE_ALL_GATHER = 0.1
TIE_REDUCE_SCATTER = 0.001
TIE_ALL_TO_ALL = 0.001


@dataclass(frozen=True)
class LogicalMesh:
    """Costs are computed in normalized units: `alpha`/`beta` here are the given values divided by
    `unit` (the smallest positive beta), so one byte over the fastest link costs 1 and the
    tie-breakers stay small whatever units the caller used; `to_user_units` converts back."""

    mesh: MeshSpec
    alpha: tuple[float, ...]
    beta: tuple[float, ...]
    allow_all_gather: bool = True
    allow_all_to_all: bool = True
    unit: float = 1.0

    @property
    def user_alpha(self) -> tuple[float, ...]:
        return tuple(a * self.unit for a in self.alpha)

    @property
    def user_beta(self) -> tuple[float, ...]:
        return tuple(b * self.unit for b in self.beta)

    def to_user_units(self, cost: float) -> float:
        return cost * self.unit

    @classmethod
    def create(cls, mesh: MeshSpec, alpha=None, beta=None, **kw) -> "LogicalMesh":
        n = len(mesh.shape)
        alpha = tuple(float(a) for a in alpha) if alpha is not None else (1.0,) * n
        # Default: the first axis is the slow (inter-host) one, later axes are 10x faster.
        beta = tuple(float(b) for b in beta) if beta is not None else (1.0,) + (0.1,) * (n - 1)
        if len(alpha) != n or len(beta) != n:
            raise ValueError(f"alpha {alpha} / beta {beta} need one value per mesh axis ({n} axes: {mesh})")
        if any(a < 0 for a in alpha) or any(b < 0 for b in beta):
            raise ValueError("alpha and beta must be non-negative")
        unit = min((b for b in beta if b > 0), default=1.0)
        return cls(mesh, tuple(a / unit for a in alpha), tuple(b / unit for b in beta), unit=unit, **kw)

    # ------------------------------------------------------------------ axes
    def _ab(self, axes) -> tuple[float, float, int]:
        cache = self.__dict__.setdefault("_ab_cache", {})
        key = tuple(axes)
        hit = cache.get(key)
        if hit is None:
            idx = [self.mesh.axis_names.index(a) for a in axes]
            n = math.prod(self.mesh.shape[i] for i in idx)
            hit = cache[key] = (max(self.alpha[i] for i in idx), max(self.beta[i] for i in idx), n)
        return hit

    def alpha_of(self, axes) -> float:
        """The latency term of one collective over `axes` (0 when they hold one device)."""
        a, _, n = self._ab(axes)
        return a if n > 1 else 0.0

    # ------------------------------------------------------------------ collectives
    def all_reduce(self, nbytes: float, axes) -> float:
        if not axes:
            return 0.0
        a, b, n = self._ab(axes)
        return a + b * 2 * (n - 1) / n * nbytes + TIE_ALL_REDUCE if n > 1 else 0.0

    def reduce_scatter(self, nbytes: float, axes) -> float:
        """nbytes: the per-device size *before* scattering."""
        if not axes:
            return 0.0
        a, b, n = self._ab(axes)
        return a + b * (n - 1) / n * nbytes + TIE_REDUCE_SCATTER if n > 1 else 0.0

    def all_gather(self, nbytes: float, axes) -> float:
        """nbytes: the per-device size *after* gathering."""
        if not axes:
            return 0.0
        a, b, n = self._ab(axes)
        if n == 1:
            return 0.0
        if not self.allow_all_gather:
            return INF
        return a + b * (n - 1) / n * nbytes + TIE_ALL_GATHER

    def all_to_all(self, nbytes: float, axes) -> float:
        """nbytes: the per-device size (unchanged by an all-to-all)."""
        if not axes:
            return 0.0
        a, b, n = self._ab(axes)
        if n == 1:
            return 0.0
        if not self.allow_all_to_all:
            return INF
        return a + b * (n - 1) / n / n * nbytes * (n / 2) + TIE_ALL_TO_ALL

    def collective_permute(self, nbytes: float, axes) -> float:
        """Every device sends `nbytes` to one peer and receives as much (a shift, a halo exchange)."""
        if not axes:
            return 0.0
        a, b, n = self._ab(axes)
        return a + b * nbytes if n > 1 else 0.0

    # ------------------------------------------------------------------ resharding
    def reshard_plan(self, nbytes: float, src: TensorSharding, dst: TensorSharding) -> list[tuple[str, tuple, float]]:
        """The collectives that turn a tensor of `nbytes` (global) laid out as `src` into `dst`.

        Per dimension, the axes both shardings share as a common prefix stay; further
        splitting by dst is a free local slice. Axes src has but dst does not keep are
        all-gathered, or moved to another dimension with an all-to-all when that is cheaper
        for this size. Returns [(kind, axes, per-device bytes)], empty when slicing suffices.
        Its cost is exactly `reshard(nbytes, src, dst)`, the term the solver's edges use.
        """
        shapes = self._reshard_shapes(src, dst)
        if not shapes:
            return []
        terms = self.reshard_terms(src, dst)
        best = min(range(len(shapes)), key=lambda k: (terms[k][0] + terms[k][1] * nbytes, k))
        return [(kind, axes, nbytes * frac) for kind, axes, frac in shapes[best]]

    def _reshard_shapes(self, src: TensorSharding, dst: TensorSharding) -> tuple:
        """The candidate plans for one byte, each ((kind, axes, fraction of the global bytes per
        device), ...): gather everything, or (when an axis moves between dims) all-to-all it."""
        cache = self.__dict__.setdefault("_shape_cache", {})
        key = (src, dst)
        hit = cache.get(key)
        if hit is not None:
            return hit
        hit = ()
        relayout = self._relayout_in_dim(src, dst)
        if relayout is not None:
            hit = (relayout,)
        elif src != dst and src.rank:
            kept, gathered, dst_extra = [], [], []
            for s, d in zip(src.dims, dst.dims):
                k = 0
                while k < len(s) and k < len(d) and s[k] == d[k]:
                    k += 1
                kept += s[:k]
                gathered += s[k:]
                dst_extra += d[k:]
            if gathered:
                hit = (self._gather_per_dim(src, kept),)
                moved = [a for a in gathered if a in dst_extra]
                if moved and self._one_all_to_all(src, dst, moved):
                    # XLA gathers the axes that leave first, then moves the rest with one
                    # all-to-all; when a dim both gives and takes moved axes (a swap), the
                    # devices end up holding their tiles in another order: a collective-permute.
                    rest = [a for a in gathered if a not in moved]
                    frac = 1 / self.mesh.axes_size(kept + moved)
                    a2a = self._gather_per_dim(src, [a for a in src.used_axes() if a not in rest])
                    a2a += (("all-to-all", tuple(moved), frac),)
                    if {_dim_of(src, a) for a in moved} & {_dim_of(dst, a) for a in moved}:
                        a2a += (("collective-permute", tuple(moved), frac),)
                    hit += (a2a,)
        cache[key] = hit
        return hit

    def _relayout_in_dim(self, src: TensorSharding, dst: TensorSharding) -> tuple | None:
        """XLA's route when one dim changes its axes in place ([xy]->[y], [xy]->[yx], [y]->[xy],
        [x]->[y]) and takes no axis from another dim: its tile order differs, so XLA moves tiles
        with one collective-permute at the smaller of the two per-device sizes (slicing first when
        dst splits finer), then all-gathers when dst holds more per device. None for other reshards."""
        diff = [d for d, (s, t) in enumerate(zip(src.dims, dst.dims)) if s != t]
        if len(diff) != 1:
            return None
        s, t = src.dims[diff[0]], dst.dims[diff[0]]
        k = 0
        while k < len(s) and k < len(t) and s[k] == t[k]:
            k += 1
        s_rest, t_rest = s[k:], t[k:]
        if not s_rest or not t_rest or any(a in src.used_axes() and a not in s_rest for a in t_rest):
            return None
        src_frac = 1 / self.mesh.axes_size(src.used_axes())
        dst_frac = 1 / self.mesh.axes_size(dst.used_axes())
        moved = tuple(dict.fromkeys(s_rest + t_rest))
        steps = (("collective-permute", moved, min(src_frac, dst_frac)),)
        if dst_frac > src_frac:
            steps += (("all-gather", tuple(a for a in s_rest if a not in t_rest) or s_rest, dst_frac),)
        return steps

    def _gather_per_dim(self, src: TensorSharding, kept) -> tuple:
        """Gathering every axis but `kept` off several dims is one all-gather per dim, last dim
        first (as XLA's partitioner replicates a tensor), each on the bytes gathered so far."""
        steps, left = [], list(src.used_axes())
        for d in reversed(range(src.rank)):
            axes = tuple(a for a in src.dims[d] if a not in kept)
            if axes:
                left = [a for a in left if a not in axes]
                steps.append(("all-gather", axes, 1 / self.mesh.axes_size(left)))
        return tuple(steps)

    @staticmethod
    def _one_all_to_all(src: TensorSharding, dst: TensorSharding, moved) -> bool:
        """Whether XLA moves `moved` with one all-to-all: no dim receives axes from two dims
        (XLA replicates the tensor for that instead)."""
        sources: dict = {}
        for a in moved:
            sources.setdefault(_dim_of(dst, a), set()).add(_dim_of(src, a))
        return all(len(s) == 1 for s in sources.values())

    def reshard_terms(self, src: TensorSharding, dst: TensorSharding) -> tuple[tuple[float, float], ...]:
        """((c0, c1), ...): resharding n bytes costs min_k c0_k + c1_k * n, each term the cost of one
        candidate plan of `reshard_plan` (which picks the cheapest for its n); memoized."""
        cache = self.__dict__.setdefault("_terms_cache", {})
        key = (src, dst)
        hit = cache.get(key)
        if hit is None:
            hit = []
            for shape in self._reshard_shapes(src, dst) or ((),):
                c0 = self.plan_cost([(k, ax, 0.0) for k, ax, _ in shape])
                c1 = 0.0 if math.isinf(c0) else self.plan_cost(shape) - c0
                hit.append((c0, c1))
            hit = cache[key] = tuple(hit)
        return hit

    def plan_cost(self, plan) -> float:
        cost = {"all-gather": self.all_gather, "all-to-all": self.all_to_all, "collective-permute": self.collective_permute,
                "all-reduce": self.all_reduce, "reduce-scatter": self.reduce_scatter}
        return sum(cost[kind](nbytes, axes) for kind, axes, nbytes in plan)

    def reshard(self, nbytes: float, src: TensorSharding, dst: TensorSharding) -> float:
        """Cost of `reshard_plan` (0 when dst only slices src further)."""
        return min(c0 + c1 * nbytes for c0, c1 in self.reshard_terms(src, dst))

    def shard_bytes(self, nbytes: float, sharding: TensorSharding) -> float:
        return nbytes / self.mesh.axes_size(sharding.used_axes())


def conv_flops(rhs_shape, out_shape, kernel_output_dim: int, lhs_dilation=()) -> float:
    """2 x output elements x kernel elements per output feature, less the zeros an lhs dilation
    inserts (the input gradient of a strided convolution): forward, input- and weight-gradient
    convolutions alike, whatever their dimension order. Grouped convolutions are covered: the
    kernel's input-feature dim already counts one group's features."""
    zeros = math.prod(lhs_dilation) if lhs_dilation else 1
    return 2.0 * math.prod(out_shape) * math.prod(rhs_shape) / rhs_shape[kernel_output_dim] / zeros


def _dim_of(ts: TensorSharding, axis: str) -> int | None:
    return next((d for d, axes in enumerate(ts.dims) if axis in axes), None)

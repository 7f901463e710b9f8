"""meshweave's Python view of Shardy (`sdy`) meshes and tensor shardings.

Passes reason about shardings as small immutable values (`TensorSharding`: the mesh axes that
split each tensor dimension) and convert to and from `#sdy.sharding` attributes only at the
IR boundary, so the cost model and the solver never touch MLIR objects.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy

DEFAULT_MESH = "mesh"
_AXIS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class MeshSpec:
    """A named logical device mesh, e.g. axes ("x", "y") of sizes (2, 4)."""

    axis_names: tuple[str, ...]
    shape: tuple[int, ...]
    name: str = DEFAULT_MESH

    def __post_init__(self):
        if len(self.axis_names) != len(self.shape):
            raise ValueError(f"mesh axis names {self.axis_names} and shape {self.shape} differ in length")
        if len(set(self.axis_names)) != len(self.axis_names):
            raise ValueError(f"mesh axis names must be distinct, got {self.axis_names}")
        for a in self.axis_names:
            if not _AXIS_NAME.match(a):
                raise ValueError(f"mesh axis name {a!r} is not an identifier")
        for s in self.shape:
            if not isinstance(s, int) or s < 1:
                raise ValueError(f"mesh shape {self.shape} must hold positive integers")

    @classmethod
    def from_shape(cls, shape, axis_names=None, name: str = DEFAULT_MESH) -> "MeshSpec":
        shape = tuple(int(s) for s in shape)
        if axis_names is None:
            axis_names = default_axis_names(len(shape))
        return cls(tuple(axis_names), shape, name)

    @classmethod
    def parse(cls, text: str, axis_names=None) -> "MeshSpec":
        """Parse "2x4" (as `meshweave-opt --mesh` and pass options spell it)."""
        try:
            shape = tuple(int(t) for t in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"mesh shape {text!r} is not of the form AxB (e.g. 2x4)") from None
        return cls.from_shape(shape, axis_names)

    @property
    def num_devices(self) -> int:
        return math.prod(self.shape)

    def axis_size(self, axis: str) -> int:
        return self.shape[self.axis_names.index(axis)]

    def axes_size(self, axes) -> int:
        return math.prod(self.axis_size(a) for a in axes)

    def to_mlir(self) -> str:
        axes = ", ".join(f'"{a}"={s}' for a, s in zip(self.axis_names, self.shape))
        return f"sdy.mesh @{self.name} = <[{axes}]>"

    def __str__(self) -> str:
        return "x".join(map(str, self.shape)) + " (" + ", ".join(self.axis_names) + ")"


def default_axis_names(rank: int) -> tuple[str, ...]:
    names = ("x", "y", "z", "w")
    if rank > len(names):
        return tuple(f"a{i}" for i in range(rank))
    return names[:rank]


@dataclass(frozen=True)
class TensorSharding:
    """Mesh axes splitting each dimension of a tensor (major axis first); unnamed axes replicate.

    `unreduced`: mesh axes over which the value is a partial sum (Shardy's `unreduced={...}`):
    each device holds a summand and the value is their sum, taken where a reader needs it."""

    dims: tuple[tuple[str, ...], ...]
    mesh: str = DEFAULT_MESH
    unreduced: tuple[str, ...] = ()

    @classmethod
    def replicated(cls, rank: int, mesh: str = DEFAULT_MESH) -> "TensorSharding":
        return cls(((),) * rank, mesh)

    @classmethod
    def from_attr(cls, attr: ir.Attribute) -> "TensorSharding":
        ts = sdy.TensorShardingAttr(attr)
        mesh = ts.mesh_or_ref
        mesh_name = mesh.value if isinstance(mesh, ir.FlatSymbolRefAttr) else DEFAULT_MESH
        dims = []
        for d in ts.dimension_shardings:
            axes = []
            for a in sdy.DimensionShardingAttr(d).axes:
                ax = sdy.AxisRefAttr(a)
                if ax.sub_axis_info is not None:
                    raise ValueError(f"sub-axis shardings are not supported: {attr}")
                axes.append(ax.name)
            dims.append(tuple(axes))
        unreduced = []
        for a in ts.unreduced_axes:
            ax = sdy.AxisRefAttr(a)
            if ax.sub_axis_info is not None:
                raise ValueError(f"sub-axis shardings are not supported: {attr}")
            unreduced.append(ax.name)
        return cls(tuple(dims), mesh_name, tuple(unreduced))

    @property
    def rank(self) -> int:
        return len(self.dims)

    @property
    def is_replicated(self) -> bool:
        return all(not d for d in self.dims)

    def used_axes(self) -> tuple[str, ...]:
        return tuple(a for d in self.dims for a in d)

    def shards_per_dim(self, mesh: MeshSpec) -> tuple[int, ...]:
        return tuple(mesh.axes_size(d) for d in self.dims)

    def num_shards(self, mesh: MeshSpec) -> int:
        return mesh.axes_size(self.used_axes())

    def divides(self, shape, mesh: MeshSpec) -> bool:
        return all(s % n == 0 for s, n in zip(shape, self.shards_per_dim(mesh)))

    def to_text(self) -> str:
        dims = ", ".join("{" + ", ".join(f'"{a}"' for a in d) + "}" for d in self.dims)
        unreduced = (", unreduced={" + ", ".join(f'"{a}"' for a in self.unreduced) + "}") if self.unreduced else ""
        return f"#sdy.sharding<@{self.mesh}, [{dims}]{unreduced}>"

    def to_attr(self, context: ir.Context | None = None) -> ir.Attribute:
        return ir.Attribute.parse(self.to_text(), context=context)

    def partition_spec(self):
        from jax.sharding import PartitionSpec

        spec = [None if not d else (d[0] if len(d) == 1 else tuple(d)) for d in self.dims]
        while spec and spec[-1] is None:
            spec.pop()
        return PartitionSpec(*spec, unreduced=frozenset(self.unreduced)) if self.unreduced else PartitionSpec(*spec)

    def short(self) -> str:
        """Compact form for reports: [x,-] means dim 0 split on x, dim 1 replicated."""
        return "[" + ",".join("".join(d) if d else "-" for d in self.dims) + "]" + \
            (f"+{''.join(self.unreduced)}" if self.unreduced else "")

    def __str__(self) -> str:
        return self.short()

"""install-mesh: declare the logical device mesh (`sdy.mesh @mesh`) the later passes shard over."""
from __future__ import annotations

from jaxlib.mlir import ir

from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.registry import Option, Pass, PassError, register


def read_mesh(module: ir.Module, name: str = "mesh") -> MeshSpec | None:
    """The module's `sdy.mesh @name`, or None."""
    from jaxlib.mlir.dialects import sdy

    for op in module.body.operations:
        if op.operation.name == "sdy.mesh" and ir.StringAttr(op.attributes["sym_name"]).value == name:
            m = sdy.MeshAttr(op.attributes["mesh"])
            axes = [sdy.MeshAxisAttr(a) for a in m.axes]
            return MeshSpec(tuple(a.name for a in axes), tuple(a.size for a in axes), name)
    return None


def write_mesh(module: ir.Module, mesh: MeshSpec) -> None:
    """Replace (or add) the module's mesh and set mhlo.num_partitions to its device count."""
    with module.context, ir.Location.unknown():
        for op in list(module.body.operations):
            if op.operation.name == "sdy.mesh" and ir.StringAttr(op.attributes["sym_name"]).value == mesh.name:
                op.operation.erase()
        new = ir.Operation.parse(mesh.to_mlir())
        ops = list(module.body.operations)
        if ops:
            ir.InsertionPoint(ops[0]).insert(new)
        else:
            ir.InsertionPoint(module.body).insert(new)
        module.operation.attributes["mhlo.num_partitions"] = ir.IntegerAttr.get(
            ir.IntegerType.get_signless(32), mesh.num_devices)
        if "mhlo.num_replicas" not in module.operation.attributes:
            module.operation.attributes["mhlo.num_replicas"] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32), 1)


@register
class InstallMesh(Pass):
    name = "install-mesh"
    summary = "Declare the logical device mesh (sdy.mesh @mesh) and set mhlo.num_partitions"
    options = (
        Option("shape", "shape", (), "mesh shape, e.g. 2x4 (default: the pipeline's mesh, e.g. --mesh)"),
        Option("axes", "str-list", (), "axis names, e.g. x,y (default: x, y, z, ...)"),
    )

    def run(self, module, state):
        if self.shape:
            mesh = MeshSpec.from_shape(self.shape, self.axes or None)
        elif state.mesh is not None:
            mesh = state.mesh
            if self.axes:
                mesh = MeshSpec.from_shape(mesh.shape, self.axes)
        else:
            mesh = read_mesh(module)
            if mesh is None:
                raise PassError(self.name, "no mesh given: pass shape=AxB (or --mesh AxB to meshweave-opt)")
        existing = read_mesh(module, mesh.name)
        if existing is not None and existing != mesh:
            _check_compatible_shardings(module, mesh, self.name)
        write_mesh(module, mesh)
        state.mesh = mesh


def _check_compatible_shardings(module, mesh: MeshSpec, pass_name: str) -> None:
    """Existing shardings must only name axes of the new mesh."""
    import re

    used = set()
    for dims in re.findall(r'\{("\w+"(?:, "\w+")*)\}', str(module)):
        used.update(re.findall(r'"(\w+)"', dims))
    missing = sorted(used - set(mesh.axis_names))
    if missing:
        raise PassError(pass_name, f"the module shards over axes {missing}, which mesh {mesh} does not have")

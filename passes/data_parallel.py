"""data-parallel: shard the batch dimension of batch arguments over the whole mesh.

Batch arguments are the ones carrying `mw.batch_dim` (the spine sets it from `batch_argnums`);
every other argument is replicated. The shardings are closed sdy shardings on @main's
arguments: XLA's partitioner then inserts the gradient all-reduce itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import TensorSharding
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register


@dataclass
class DataParallelResult(PassResult):
    degree: int                  # devices the batch is split over
    axes: list[str]
    arg_shardings: list[str]     # per @main argument, short form
    batch_args: int              # arguments whose batch dimension was split

    def explain(self) -> str:
        return (f"batch split over {self.axes} (degree {self.degree}) on {self.batch_args} argument(s); "
                f"everything else replicated")


@register
class DataParallel(Pass):
    name = "data-parallel"
    summary = "Shard batch arguments (mw.batch_dim) over all mesh axes, replicate everything else"
    options = (
        Option("axes", "str-list", (), "mesh axes to split the batch over (default: all)"),
        Option("uneven", "str", "error", "batch not divisible by the data-parallel degree: error | replicate"),
    )

    def run(self, module, state):
        if self.uneven not in ("error", "replicate"):
            raise PassError(self.name, f"uneven={self.uneven!r}: expected error or replicate")
        mesh = state.mesh
        if mesh is None:
            raise PassError(self.name, "no mesh: run install-mesh first")
        axes = tuple(self.axes) or mesh.axis_names
        for a in axes:
            if a not in mesh.axis_names:
                raise PassError(self.name, f"axis '{a}' is not in mesh {mesh}")
        degree = mesh.axes_size(axes)
        main = mw.main_func(module)
        args = mw.entry_block(main).arguments
        attrs = mw.arg_attr_dicts(main)
        decided, n_batch = [], 0
        with module.context:
            for i, (arg, d) in enumerate(zip(args, attrs)):
                shape = list(ir.RankedTensorType(arg.type).shape)
                sharding = TensorSharding.replicated(len(shape), mesh.name)
                if mw.BATCH_DIM in d:
                    dim = mw.attr_value(d[mw.BATCH_DIM])
                    path = mw.attr_value(d[mw.ARG_PATH]) if mw.ARG_PATH in d else f"argument {i}"
                    if not 0 <= dim < len(shape):
                        raise PassError(self.name, f"{path}: batch dim {dim} out of range for shape {shape}")
                    if shape[dim] % degree == 0:
                        dims = [()] * len(shape)
                        dims[dim] = axes
                        sharding = TensorSharding(tuple(dims), mesh.name)
                        n_batch += 1
                    elif self.uneven == "error":
                        raise PassError(self.name, (
                            f"{path}: batch size {shape[dim]} is not divisible by the data-parallel degree "
                            f"{degree} (mesh {mesh}); use a batch size that is a multiple of {degree}, "
                            f"or a smaller mesh"))
                    else:
                        state.warn(f"{path}: batch size {shape[dim]} not divisible by {degree}; replicated")
                d[mw.SDY_SHARDING] = sharding.to_attr()
                decided.append(sharding.short())
        mw.set_arg_attr_dicts(main, attrs)
        if n_batch == 0:
            state.warn("data-parallel: no argument is marked as a batch (mw.batch_dim); everything is replicated")
        state.results[self.name] = DataParallelResult(degree, list(axes), decided, n_batch)

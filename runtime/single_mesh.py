"""The `Program` of a single-mesh step: one mesh, one "step" fragment, one RUN instruction.

This is the degenerate case of the compiler-to-executor hand-off (program.py); pipelined
steps build theirs from their stages. Plain data, so any backend can execute it.
"""
from __future__ import annotations

from meshweave.runtime.program import (FragmentDesc, InputBinding, Instruction, MeshDesc, OutputBinding, Program,
                                       TensorSig)

MESH = "mesh0"
FRAGMENT = "step"


def _sig(placement, dims) -> TensorSig:
    return TensorSig(tuple(placement.shape), placement.dtype, tuple(tuple(d) for d in dims))


def single_mesh_program(mlir_text: str, stage, in_dims, out_dims, donated=()) -> Program:
    """`stage`: the plan's StagePlan (placements, devices); `in_dims` / `out_dims`: per flat input /
    output, the mesh axes of each dimension; `mlir_text`: @main with its sdy shardings."""
    ins = tuple(_sig(p, d) for p, d in zip(stage.inputs, in_dims))
    outs = tuple(_sig(p, d) for p, d in zip(stage.outputs, out_dims))
    mesh = MeshDesc(MESH, tuple(stage.mesh_shape), tuple(stage.axis_names), tuple(stage.device_ids))
    in_keys = tuple(f"in{i}" for i in range(len(ins)))
    out_keys = tuple(f"out{i}" for i in range(len(outs)))
    fragment = FragmentDesc(FRAGMENT, MESH, "step", 0, mlir_text, ins, outs, donated=tuple(donated))
    return Program(
        meshes=(mesh,), fragments=(fragment,),
        instructions={MESH: (Instruction("run", in_keys, out_keys, fragment=FRAGMENT),)},
        inputs=tuple(InputBinding(i, MESH, k, sig) for i, (k, sig) in enumerate(zip(in_keys, ins))),
        outputs=tuple(OutputBinding(i, MESH, k, sig) for i, (k, sig) in enumerate(zip(out_keys, outs))))

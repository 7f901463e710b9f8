"""Small hand-built `Program`s (no compiler involved) for testing and benchmarking executors.

Fragments are lowered from plain jax functions against an `AbstractMesh`, so the driver needs
no devices of the meshes it describes; the StableHLO text travels to the workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec

from meshweave.runtime.program import (FragmentDesc, InputBinding, Instruction, MeshDesc, OutputBinding, Program,
                                       TensorSig, key_for)


def sig(shape, spec=(), dtype="float32") -> TensorSig:
    """TensorSig from a partition-spec-like tuple: None, "x" or ("x", "y") per dimension."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    dims = tuple(() if s is None else ((s,) if isinstance(s, str) else tuple(s)) for s in spec)
    return TensorSig(tuple(shape), dtype, dims)


def _spec(s: TensorSig) -> PartitionSpec:
    return PartitionSpec(*[None if not d else (d[0] if len(d) == 1 else d) for d in s.sharding])


def lower_fragment(name: str, mesh: MeshDesc, kind: str, stage: int, fn, inputs, outputs) -> FragmentDesc:
    """Lower `fn` for `mesh` with the given input/output TensorSigs; the module is StableHLO text."""
    am = AbstractMesh(mesh.shape, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.shape))
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(am, _spec(s))) for s in inputs]
    outs = tuple(NamedSharding(am, _spec(s)) for s in outputs)
    jitted = jax.jit(fn, out_shardings=outs if len(outs) > 1 else outs[0])
    text = jitted.trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    return FragmentDesc(name, mesh.name, kind, stage, text, tuple(inputs), tuple(outputs))


@dataclass(frozen=True)
class MlpPipeline:
    """A 2-stage MLP training step (GPipe, gradient accumulation) and its single-device reference."""

    program: Program
    reference: object          # jax.jit(step)(w1, x, w2, y) -> (w1_new, w2_new, loss)
    args: tuple                # numpy inputs, in program.inputs order


def mlp_pipeline(batch=32, d_in=16, d_hidden=32, d_out=8, micro_batches=4, lr=0.1, seed=0,
                 mesh0_devices=(0, 1, 2, 3), mesh1_devices=(4, 5, 6, 7)) -> MlpPipeline:
    """Stage 0 on a 2x2 mesh (tensor-parallel w1), stage 1 on a 4-device mesh (data parallel):
    the hidden activation is resharded on arrival in both directions."""
    k = micro_batches
    mb = batch // k
    m0 = MeshDesc("stage0", (2, 2), ("dp", "mp"), tuple(mesh0_devices))
    m1 = MeshDesc("stage1", (4,), ("d",), tuple(mesh1_devices))

    def stage0(w1, x):
        return jnp.tanh(x @ w1)

    def stage1_loss(w2, h, y):
        return jnp.mean((h @ w2 - y) ** 2)

    w1_s, x_s, h0_s = sig((d_in, d_hidden), (None, "mp")), sig((mb, d_in), ("dp",)), sig((mb, d_hidden), ("dp", "mp"))
    w2_s, h1_s, y_s = sig((d_hidden, d_out)), sig((mb, d_hidden), ("d",)), sig((mb, d_out), ("d",))
    loss_s = sig(())

    def bwd0(w1, x, dh):
        return jax.vjp(stage0, w1, x)[1](dh)[0]

    def fb1(w2, h, y):
        loss, (dw2, dh) = jax.value_and_grad(stage1_loss, argnums=(0, 1))(w2, h, y)
        return loss, dw2, dh

    def apply(w, g):
        return w - lr * g / k

    def apply1(w2, g, loss_sum):
        return w2 - lr * g / k, loss_sum / k

    frags = (
        lower_fragment("fwd0", m0, "forward", 0, stage0, [w1_s, x_s], [h0_s]),
        lower_fragment("bwd0", m0, "backward", 0, bwd0, [w1_s, x_s, h0_s], [w1_s]),
        lower_fragment("apply0", m0, "apply", 0, apply, [w1_s, w1_s], [w1_s]),
        lower_fragment("fb1", m1, "backward", 1, fb1, [w2_s, h1_s, y_s], [loss_s, w2_s, h1_s]),
        lower_fragment("apply1", m1, "apply", 1, apply1, [w2_s, w2_s, loss_s], [w2_s, loss_s]),
    )
    I = Instruction
    ins0, ins1 = [], []
    for m in range(k):
        x, h = key_for("x", m), key_for("h", m)
        ins0 += [I("run", ("w1", x), (h,), fragment="fwd0", micro_batch=m),
                 I("send", (h,), peer="stage1", micro_batch=m), I("free", (h,), micro_batch=m)]
        ins1 += [I("recv", outputs=(h,), peer="stage0", sig=h1_s, micro_batch=m),
                 I("run", ("w2", h, key_for("y", m)), (key_for("l", m), key_for("g2", m), key_for("dh", m)),
                   fragment="fb1", micro_batch=m),
                 I("send", (key_for("dh", m),), peer="stage0", micro_batch=m),
                 I("accumulate", (key_for("g2", m),), ("g2",), micro_batch=m),
                 I("accumulate", (key_for("l", m),), ("lsum",), micro_batch=m),
                 I("free", (h, key_for("y", m), key_for("l", m), key_for("g2", m), key_for("dh", m)), micro_batch=m)]
    for m in range(k):
        x, dh = key_for("x", m), key_for("dh", m)
        ins0 += [I("recv", outputs=(dh,), peer="stage1", sig=h0_s, micro_batch=m),
                 I("run", ("w1", x, dh), (key_for("g1", m),), fragment="bwd0", micro_batch=m),
                 I("accumulate", (key_for("g1", m),), ("g1",), micro_batch=m),
                 I("free", (x, dh, key_for("g1", m)), micro_batch=m)]
    ins0.append(I("run", ("w1", "g1"), ("w1_new",), fragment="apply0"))
    ins1.append(I("run", ("w2", "g2", "lsum"), ("w2_new", "loss"), fragment="apply1"))
    program = Program(
        meshes=(m0, m1), fragments=frags, instructions={"stage0": tuple(ins0), "stage1": tuple(ins1)},
        inputs=(InputBinding(0, "stage0", "w1", w1_s), InputBinding(1, "stage0", "x", x_s, k),     # sig: 1 micro-batch
                InputBinding(2, "stage1", "w2", w2_s), InputBinding(3, "stage1", "y", y_s, k)),
        outputs=(OutputBinding(0, "stage0", "w1_new", w1_s), OutputBinding(1, "stage1", "w2_new", w2_s),
                 OutputBinding(2, "stage1", "loss", loss_s)),
        schedule="gpipe", num_micro_batches=k)

    def step(w1, x, w2, y):
        def loss_fn(w1, w2):
            return jnp.mean(jnp.stack([stage1_loss(w2, stage0(w1, x[i * mb:(i + 1) * mb]), y[i * mb:(i + 1) * mb])
                                       for i in range(k)]))
        loss, (g1, g2) = jax.value_and_grad(loss_fn, argnums=(0, 1))(w1, w2)
        return w1 - lr * g1, w2 - lr * g2, loss

    rng = np.random.default_rng(seed)
    args = (rng.standard_normal((d_in, d_hidden), np.float32) * 0.3, rng.standard_normal((batch, d_in), np.float32),
            rng.standard_normal((d_hidden, d_out), np.float32) * 0.3, rng.standard_normal((batch, d_out), np.float32))
    return MlpPipeline(program, jax.jit(step), args)

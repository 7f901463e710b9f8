"""The main job: parallelize real training steps over 8 simulated CPU devices with meshweave.

For each model (an MLP with Adam; a small GPT with Adam) the ILP plans the step on a 2x4 logical
mesh, XLA compiles it, and a few training steps run; then a 4-layer GPT runs as a pipeline
(PipeshardParallel: 2 stages on two 4-device sub-meshes, each stage auto-sharded on its own,
4 micro-batches, 1F1B). After every step the loss and every updated parameter are compared with
single-device `jax.jit` on the same inputs.

    python examples/train.py [--steps 3] [--mesh 2x4] [--dump-dir DIR] [--model mlp|gpt|pipeline|all]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshweave as mw  # noqa: E402
from meshweave import fidelity  # noqa: E402
from meshweave.models import gpt, mlp  # noqa: E402

# Adam amplifies rounding differences where a gradient is ~0 (it divides by sqrt(v)): parallel
# reductions sum in another order, so a parameter may move by a different fraction of one Adam
# step (at most 2 x LR). Parameters must agree to a quarter of one step; losses to 1e-4.
LR = 1e-3
RTOL, ATOL = 1e-4, 0.25 * LR


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def close(a, b) -> bool:
    return all(np.allclose(np.asarray(x), np.asarray(y), rtol=RTOL, atol=ATOL) for x, y in
               zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def train(name, step, state, batches, method, dump_dir):
    where = f"a {'x'.join(map(str, method.mesh_shape))} mesh" if method.mesh_shape else f"{len(jax.devices())} devices"
    print(f"\n=== {name}: {method.describe()} on {where} ===")
    ref_step = jax.jit(step)
    par_step = mw.parallelize(step, method=method)
    t0 = time.perf_counter()
    exe = par_step.get_executable(state, batches[0])
    print(f"planned and compiled in {time.perf_counter() - t0:.1f} s")
    print(exe.plan.summary())
    auto = exe.state.results.get("auto-sharding")
    if auto:
        print(auto.explain().split("heavy ops")[0].strip())
        print("plan fidelity (predicted vs compiled collectives):")
        print(fidelity.report(exe.plan.stages[0].fidelity, exe.collectives()))
    for key in ("layer-clustering", "stage-construction", "insert-transfers", "pipeline-schedule"):
        if key in exe.state.results:
            print(exe.state.results[key].explain())
    if dump_dir:
        path = os.path.join(dump_dir, name)
        exe.dump(path)
        print(f"dumped passes, stage HLO and plan.json to {path}")
    ok = True
    ref_state = par_state = state
    for i, batch in enumerate(batches):
        ref_state, ref_loss = ref_step(ref_state, batch)
        par_state, par_loss = par_step(par_state, batch)
        same = close(par_state, ref_state) and np.allclose(par_loss, ref_loss, rtol=RTOL)
        ok &= same
        print(f"step {i}: loss {float(par_loss):.6f} (jax.jit {float(ref_loss):.6f}); "
              f"max |param diff| {max_diff(par_state, ref_state):.2e} -> {'MATCH' if same else 'MISMATCH'}")
    return ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--mesh", default="2x4")
    p.add_argument("--model", choices=("mlp", "gpt", "pipeline", "all"), default="all")
    p.add_argument("--dump-dir", default=None)
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.mesh.split("x"))
    print(f"jax {jax.__version__}, {len(jax.devices())} {jax.devices()[0].platform} devices, meshweave {mw.__version__}")
    method = mw.ShardParallel(mesh_shape=shape)
    opt = optax.adam(LR)
    ok = True
    if args.model in ("mlp", "all"):
        sizes = [256, 1024, 1024, 1024, 256]
        state = mlp.init_state(jax.random.PRNGKey(0), sizes, opt)
        batches = [mlp.synthetic_batch(jax.random.PRNGKey(10 + i), 64, sizes[0], sizes[-1]) for i in range(args.steps)]
        ok &= train("mlp", mlp.make_train_step(opt), state, batches, method, args.dump_dir)
    if args.model in ("gpt", "all"):
        cfg = gpt.GPTConfig(vocab=512, seq_len=64, d_model=256, heads=8, layers=2)
        state = gpt.init_state(jax.random.PRNGKey(1), cfg, opt)
        batches = [gpt.synthetic_batch(jax.random.PRNGKey(20 + i), cfg, 16) for i in range(args.steps)]
        ok &= train("gpt", gpt.make_train_step(opt), state, batches, method, args.dump_dir)
    if args.model in ("pipeline", "all"):
        cfg = gpt.GPTConfig(vocab=512, seq_len=64, d_model=256, heads=8, layers=4)
        state = gpt.init_state(jax.random.PRNGKey(2), cfg, opt)
        batches = [gpt.synthetic_batch(jax.random.PRNGKey(30 + i), cfg, 16) for i in range(args.steps)]
        pipe = mw.PipeshardParallel(num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2),
                                    pipeline_schedule="1f1b")
        ok &= train("gpt-pipeline", gpt.make_train_step(opt, grad_fn=mw.value_and_grad), state, batches, pipe,
                    args.dump_dir)
    print("\nRESULT:", "all steps match jax.jit" if ok else "MISMATCH against jax.jit")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

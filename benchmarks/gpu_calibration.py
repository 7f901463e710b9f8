"""Achievable matmul rate of GPT blocks on a real GPU, to calibrate `ClusterSpec.device_flops`.

Times one GPT block's forward + backward (models/gpt.py, bf16, sequence 1024) through stock
jax.jit for Alpa's 2.6B-39B hidden sizes at micro-batch 1 and 8, and counts its matmul FLOPs
the way the stage DP does (`stage_profiling._flops`); also a bare 8192^3 bf16 matmul (ones).
Needs a GPU; writes $OUT/gpu_calibration.json (or --out).

    python benchmarks/gpu_calibration.py --out benchmarks/results/gpu_calibration_h200.json
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp

from meshweave.models import gpt
from meshweave.passes.stage_profiling import _flops

PEAK_BF16 = 989e12      # H100 / H200 SXM dense bf16
SIZES = {"2.6B": (2560, 32), "6.7B": (4096, 32), "15B": (5120, 40), "39B": (8192, 64)}   # hidden, heads


def seconds(f, *args, warmup=3, reps=10) -> float:
    for _ in range(warmup):
        jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(reps):
        r = f(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t) / reps


def block(p, x):
    x = x + gpt.attention(p, gpt.layer_norm(p["ln1"], x))
    return x + gpt.mlp(p, gpt.layer_norm(p["ln2"], x))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_calibration.json"))
    args = ap.parse_args()
    out = {"device": str(jax.devices()[0]), "jax": jax.__version__, "peak_bf16": PEAK_BF16, "rows": []}
    a = jnp.ones((8192, 8192), jnp.bfloat16)
    out["matmul_8192_tflops"] = 2 * 8192 ** 3 / seconds(jax.jit(lambda a: a @ a), a) / 1e12
    for name, (hidden, heads) in SIZES.items():
        cfg = gpt.GPTConfig(vocab=51200, seq_len=1024, d_model=hidden, heads=heads, layers=1)
        params = gpt.init(jax.random.PRNGKey(0), cfg, jnp.bfloat16)["blocks"][0]
        for b in (1, 8):
            x = jax.random.normal(jax.random.PRNGKey(1), (b, 1024, hidden), jnp.bfloat16)
            g = jax.jit(jax.grad(lambda p, x: block(p, x).astype(jnp.float32).sum(), argnums=(0, 1)))
            flops, t = _flops(g.lower(params, x).as_text()), seconds(g, params, x)
            out["rows"].append({"model": name, "micro_batch": b, "matmul_flops": flops, "seconds": t,
                                "tflops": flops / t / 1e12, "fraction_of_peak": flops / t / PEAK_BF16})
            print(out["rows"][-1], flush=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

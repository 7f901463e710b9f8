"""Whole planning time of a pipelined GPT step on a 2-host x 4-device virtual cluster, by phase.

Runs `parallelize(..., method=PipeshardParallel(stage_option="auto"))` on 8 simulated CPU devices
split into 2 hosts, so every phase is real: trace, passes (layer clustering, outlining), the
stage DP with its per-layer intra-op solves (stage_construction), the auto-sharding ILP of every
fragment on its sub-mesh (fragment_ilps) and the XLA compile of every fragment (xla_compile).
One step is then run and its loss checked against single-device jax.jit.

    python benchmarks/pipeline_planning.py [--layers 24] [--d-model 256] [--micro-batches 4]
                                           [--out benchmarks/results/pipeline_planning.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshweave as mw  # noqa: E402
from meshweave.models import gpt  # noqa: E402


def run(layers: int, d_model: int, micro_batches: int, batch: int, seq: int, layer_option) -> dict:
    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=1024, seq_len=seq, d_model=d_model, heads=8, layers=layers)
    key = jax.random.PRNGKey(0)
    state = gpt.init_state(key, cfg, opt)
    data = gpt.synthetic_batch(key, cfg, batch)
    step = gpt.make_train_step(opt, grad_fn=mw.value_and_grad)
    method = mw.PipeshardParallel(num_micro_batches=micro_batches, num_hosts=2, layer_option=layer_option)
    par = mw.parallelize(step, method=method)
    t0 = time.perf_counter()
    exe = par.get_executable(state, data)
    total = time.perf_counter() - t0
    _, loss = par(state, data)
    _, ref = jax.jit(step)(state, data)
    info = exe.plan.pipeline
    return {
        "layers": layers, "d_model": d_model, "seq_len": seq, "batch": batch, "micro_batches": micro_batches,
        "layer_option": repr(layer_option),
        "planning_seconds": round(total, 3),
        "phases_seconds": {k: round(v, 3) for k, v in info["timings"].items()},
        "stages": [{"layers": s["layers"], "physical_shape": s["physical_shape"], "logical_shape": s["logical_shape"],
                    "devices": s["device_ids"], "predicted_latency_s": s["predicted_latency"]} for s in info["stages"]],
        "fragments": len(info["fragments"]),
        "bubble_fraction": info["bubble_fraction"],
        "loss": float(loss), "jit_loss": float(ref),
        "loss_matches_jit": bool(np.isclose(float(loss), float(ref), rtol=1e-5)),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "pipeline_planning.json"))
    args = p.parse_args(argv)
    rows = []
    for option in (mw.ManualLayerOption(), mw.AutoLayerOption(args.layers // 3)):
        row = run(args.layers, args.d_model, args.micro_batches, args.batch, args.seq, option)
        print(json.dumps(row, indent=1))
        rows.append(row)
    out = {"command": "python " + " ".join([os.path.relpath(__file__)] + sys.argv[1:]),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
           "note": "8 simulated CPU devices as 2 hosts x 4; planning = first call's compile (trace, passes, stage "
                   "DP with per-layer ILPs, per-fragment ILPs, XLA compile)",
           "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()

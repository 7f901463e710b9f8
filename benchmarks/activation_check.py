"""Check the stage DP's activation term against a compiled forward fragment.

The DP charges a stage, per micro-batch in flight, the bytes per device of the values its forward
fragment hands to its backward, in the layouts the ILP chose (`stage_profiling._held_bytes`).
This compiles a GPT of Alpa's widths (a few blocks; per-layer activations do not depend on depth)
as one pipeline stage on 8 simulated CPU devices and compares, for the forward fragment:
  * XLA's own count of the bytes its outputs occupy per device (`memory_analysis()`),
  * the DP's count on the same layouts (activations for the backward + values for other stages),
  * what the activations consist of: values the backward could recompute from what the stage
    already holds (broadcasts of smaller values, converts of parameters, iota/constants).

    python -m benchmarks.activation_check --model 2.6B --layers 2 --micro-batch 8
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import meshweave as mw  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CHEAP = {"stablehlo.broadcast_in_dim": "broadcast", "stablehlo.convert": "convert", "stablehlo.iota": "iota",
         "stablehlo.constant": "constant", "stablehlo.reshape": "reshape", "stablehlo.transpose": "transpose"}


def main(argv=None):
    from jaxlib.mlir import ir

    from meshweave.dialects.context import parse_module
    from meshweave.models import gpt
    from meshweave.models.alpa_configs import gpt_config
    from meshweave.pipeshard import compile_pipeshard
    from meshweave.passes.stage_profiling import held_values
    from meshweave.plugin.arguments import ArgumentSpec

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="2.6B")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch (Alpa's 2.6B row: 1024/128)")
    p.add_argument("--cluster", default="p3")
    p.add_argument("--out", default=os.path.join(RESULTS, "activation_check.json"))
    args = p.parse_args(argv)
    cfg = gpt_config(args.model)
    cfg = type(cfg)(**{**cfg.__dict__, "layers": args.layers})
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda k: gpt.init_state(k, cfg, opt, jnp.bfloat16), jax.random.PRNGKey(0))
    tokens = jax.ShapeDtypeStruct((args.micro_batch, cfg.seq_len), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens}
    step = gpt.make_train_step(opt, grad_fn=mw.value_and_grad)
    cluster = mw.ClusterSpec.preset(args.cluster, 8)
    _, alpha, beta = cluster.logical_mesh()
    option = mw.ManualStageOption((tuple(range(args.layers)),), ((1, 8),), ((8,),),
                                  ({"alpha": alpha[-1:], "beta": beta[-1:], "time_limit": 5.0},))
    method = mw.PipeshardParallel(num_micro_batches=1, stage_option=option, devices=tuple(jax.devices()[:8]))
    call = ArgumentSpec.create(step, batch_argnums=(1,)).bind((state, batch), {})
    program, compiled, state_, *_ = compile_pipeshard(step, call, method)
    outlined = state_.results["stage-outlining"]
    fwd = next(f for f in outlined.fragments if f.phase == "forward")
    c = compiled[fwd.name]
    xla_out = c.compiled.memory_analysis().output_size_in_bytes
    axes = dict(zip(program.meshes[0].axis_names, program.meshes[0].shape))

    def per_device(sig):
        return math.prod(sig.shape) * np.dtype(sig.dtype).itemsize / math.prod(axes[a] for d in sig.sharding for a in d)

    _, acts, _ = held_values(outlined.fragments, fwd)
    ours_acts = sum(per_device(c.desc.outputs[j]) for j in acts)
    ours_all = sum(per_device(s) for s in c.desc.outputs)
    module = parse_module(c.desc.mlir)
    from meshweave.dialects import meshweave as mwd

    main_fn = mwd.main_func(module)
    ret = list(main_fn.regions[0].blocks[0].operations)[-1]
    kinds: dict[str, float] = {}
    for j in acts:
        v = ret.operands[j]
        while not isinstance(v.owner, ir.Block) and v.owner.name == "sdy.sharding_constraint":
            v = v.owner.operands[0]
        name = "argument" if isinstance(v.owner, ir.Block) else v.owner.name
        kind = CHEAP.get(name, "computed")
        kinds[kind] = kinds.get(kind, 0.0) + per_device(c.desc.outputs[j])
    doc = {"command": "python -m benchmarks.activation_check " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": args.model, "layers": args.layers, "micro_batch": args.micro_batch, "logical_mesh": [8],
           "forward_outputs": len(c.desc.outputs), "activations_for_backward": len(acts),
           "xla_output_bytes_per_device": xla_out, "dp_output_bytes_per_device": ours_all,
           "dp_activation_bytes_per_device": ours_acts, "activation_bytes_by_producer": kinds}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

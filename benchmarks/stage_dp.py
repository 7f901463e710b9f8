"""Stage-construction DP time on a 64-device virtual cluster (8 hosts x 8), GPT-like costs.

The costs come from a synthetic analytic model of a GPT training step (not from the intra-op
planner): per transformer block 24*b*s*h^2 + 4*b*s^2*h forward FLOPs (x3 with backward) at a
fixed device throughput, tensor-parallel all-reduces of the activations inside a host, the
data-parallel gradient all-reduce amortized over the micro-batches, 16 bytes of parameter +
gradient + Adam state per parameter split over the model-parallel degree, ~34*s*b*h bytes of
activations per block per micro-batch, and a transfer of one micro-batch's boundary activation
(and its gradient) between consecutive stages. Embedding and LM head sit in the first and last
layer. Every (start, end, sub-mesh) triple is priced for every logical shape Alpa's
"single_node_model_parallel" space offers, so the DP sees the full candidate table.
Target (issue 10): <= 10 s per solve on this machine.

The branch and bound's answer is checked against Alpa's unpruned sweep (DP for every bound)
for the layer counts in --verify-sweep (the sweep takes about a minute for 24 layers).

    python benchmarks/stage_dp.py [--layers 24,48] [--micro-batches 32] [--verify-sweep 24]
                                  [--out benchmarks/results/stage_dp.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np

from meshweave.passes.stage_dp import (StageCandidate, StageCostCache, Submesh, _build_tables, _StageDP,
                                       logical_shape_choices, solve_stages, submesh_choices)

HOSTS, PER_HOST = 8, 8


@dataclass(frozen=True)
class GPTCostModel:
    """An analytic per-micro-batch cost model of a GPT stage (seconds, bytes per device)."""

    layers: int
    hidden: int = 8192
    seq: int = 2048
    vocab: int = 51200
    micro_batch: int = 8
    micro_batches: int = 32
    device_flops: float = 150e12          # achieved FLOP/s per device
    intra_host_bw: float = 150e9          # bytes/s per device
    inter_host_bw: float = 12.5e9
    memory_capacity: float = 80e9

    def block_flops(self) -> float:
        b, s, h = self.micro_batch, self.seq, self.hidden
        return 3 * (24 * b * s * h * h + 4 * b * s * s * h)

    def head_flops(self) -> float:
        return 3 * 2 * self.micro_batch * self.seq * self.hidden * self.vocab

    def layer_params(self, i: int) -> float:
        p = 12 * self.hidden ** 2
        if i in (0, self.layers - 1):
            p += self.vocab * self.hidden
        return p

    def activation_bytes(self) -> float:
        return 34 * self.seq * self.micro_batch * self.hidden

    def stage_cost(self, start: int, end: int, sub: Submesh) -> list[StageCandidate]:
        n = sub.num_devices
        flops = (end - start) * self.block_flops() + (self.head_flops() if end == self.layers else 0)
        params = sum(self.layer_params(i) for i in range(start, end))
        out = []
        for dp, mp in logical_shape_choices(sub):
            if self.micro_batch % dp:
                continue
            compute = flops / (n * self.device_flops)
            act_bytes = 2 * self.micro_batch // dp * self.seq * self.hidden
            tp = 0.0 if mp == 1 else 4 * (end - start) * 2 * (mp - 1) / mp * act_bytes / self.intra_host_bw
            grad_bw = self.inter_host_bw if sub.num_hosts > 1 else self.intra_host_bw
            grads = 0.0 if dp == 1 else 2 * (dp - 1) / dp * 2 * params / mp / grad_bw / self.micro_batches
            out.append(StageCandidate((dp, mp), latency=compute + tp + grads,
                                      memory_bytes=16 * params / mp,
                                      activation_bytes_per_micro_batch=(end - start) * self.activation_bytes() / n,
                                      options={"force_batch_dim_to_mesh_dim": 0}))
        return out

    def transfer_cost(self, boundary: int, a: Submesh, b: Submesh) -> float:
        bw = self.inter_host_bw if (a.num_hosts > 1 or b.num_hosts > 1 or a.devices_per_host == PER_HOST) \
            else self.intra_host_bw
        return 2 * (2 * self.micro_batch * self.seq * self.hidden) / bw


def sweep_objective(model: GPTCostModel, cost: StageCostCache) -> tuple[float, float]:
    """Alpa's plain sweep: DP(t) for every candidate bound t (no pruning); (optimum, seconds)."""
    t0 = time.perf_counter()
    subs = submesh_choices(HOSTS, PER_HOST)
    tables, _ = _build_tables(model.layers, subs, cost, model.transfer_cost)
    dp = _StageDP(tables, subs, model.layers, HOSTS * PER_HOST, model.micro_batches, model.memory_capacity, "1f1b")
    lat = tables.lat[dp.memok[0]]
    runs = (dp.run(float(t)) for t in np.unique(lat[np.isfinite(lat)]))
    return min(r[1] for r in runs if r is not None), time.perf_counter() - t0


def one(layers: int, micro_batches: int, verify: bool) -> dict:
    model = GPTCostModel(layers=layers, micro_batches=micro_batches)
    cost = StageCostCache(model.stage_cost)
    sol = solve_stages(layers, HOSTS, PER_HOST, micro_batches, cost,
                       transfer_cost=model.transfer_cost, memory_capacity=model.memory_capacity)
    st = sol.stats
    check = {}
    if verify:
        opt, secs = sweep_objective(model, cost)
        check = {"sweep_objective_s": round(opt, 9), "sweep_seconds": round(secs, 1),
                 "equals_sweep": abs(opt - sol.objective) <= 1e-9 * opt}
    return {**check, "layers": layers, "cluster": [HOSTS, PER_HOST], "micro_batches": micro_batches,
            "submesh_choices": len(submesh_choices(HOSTS, PER_HOST)),
            "dp_seconds": round(st.seconds, 3), "target_s": 10.0, "target_met": st.seconds <= 10.0,
            "stage_cost_calls": st.stage_cost_calls, "transfer_cost_calls": st.transfer_cost_calls,
            "latency_candidates": st.latency_candidates, "dp_evaluations": st.dp_evaluations,
            "stage_buckets": st.stage_buckets,
            "objective_s": round(sol.objective, 6), "max_stage_latency_s": round(sol.max_latency, 6),
            "transfer_time_s": round(sol.transfer_time, 6),
            "stages": [{"layers": list(s.layers), "submesh": list(s.submesh.shape), "logical": list(s.logical_shape),
                        "latency_s": round(s.latency, 6), "memory_gb": round(s.memory / 1e9, 2),
                        "in_flight": s.in_flight} for s in sol.stages]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="24,48")
    ap.add_argument("--micro-batches", type=int, default=32)
    ap.add_argument("--verify-sweep", default="24",
                    help="layer counts whose result is checked against the unpruned sweep over every bound (slow)")
    ap.add_argument("--out", default="benchmarks/results/stage_dp.json")
    args = ap.parse_args(argv)
    rows = []
    for L in (int(x) for x in args.layers.split(",")):
        row = one(L, args.micro_batches, str(L) in args.verify_sweep.split(","))
        print(f"{L} layers: {row['dp_seconds']} s, {len(row['stages'])} stages, "
              f"{row['dp_evaluations']} DP runs of {row['latency_candidates']} candidate bounds", flush=True)
        rows.append(row)
    result = {"command": "python " + " ".join([os.path.relpath(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "numpy": np.__version__, "load_average": list(os.getloadavg())},
              "cost_model": "synthetic GPT (see the script's docstring); not measured on hardware",
              "target": "stage DP <= 10 s each for 24 and 48 layers on 64 devices",
              "target_met": all(r["target_met"] for r in rows), "rows": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cluster presets for planning on clusters that are not here (`ClusterSpec.preset(name, num_gpus)`).

Numbers are datasheet figures turned into the α-β model's per-device terms; where a figure is an
estimate the comment says so. `device_flops` is an achievable matmul rate (a fraction of the
dense peak), because the planner's compute term counts matmul FLOPs only; `peak_flops` stays the
datasheet peak so reports can give % of peak.

Achievable rates: on an H200 (the H100's compute die), one GPT block's forward + backward through
stock jax.jit in bf16 ran its matmul FLOPs at 0.27-0.34 of the 989 TFLOP/s peak (6.7B-39B blocks at
micro-batch 8: 0.32-0.34; benchmarks/results/gpu_calibration_h200.json), while a bare 8192^3
matmul ran at ~0.8-0.9: the block's non-matmul ops (softmax, layer norm, GELU) take the rest. The
"h100" preset uses 0.33. No V100 was at hand: "p3" uses 0.4, an estimate from Alpa's reported
37 TFLOP/s per V100 on GPT-2.6B with rematerialization (~0.4 of peak in hardware FLOPs).

- "h100": hosts of 8 x H100 SXM 80 GB. NVLink 4 through NVSwitch: 450 GB/s per direction per
  GPU; InfiniBand NDR: one 400 Gb/s NIC per GPU (50 GB/s); bf16 dense peak 989 TFLOP/s.
- "p3": AWS p3.16xlarge, 8 x V100 SXM2 16 GB (Alpa's paper). NVLink 2 hybrid cube-mesh
  (6 links x 25 GB/s; ~100 GB/s per direction usable by a ring, an estimate); 25 Gb/s Ethernet
  per host shared by its 8 GPUs (so 25e9 / 8 / 8 bytes/s per device when all of them cross hosts
  at once); fp16 tensor-core peak 125 TFLOP/s.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshweave.planning import ClusterSpec


@dataclass(frozen=True)
class HostType:
    """One host kind: devices per host and the per-device link, compute and memory figures."""

    name: str
    description: str
    devices_per_host: int
    intra_host_bandwidth: float      # bytes/s per device, one direction
    inter_host_bandwidth: float      # bytes/s per device, one direction
    intra_host_latency: float        # s per collective step
    inter_host_latency: float
    peak_flops: float                # FLOP/s, datasheet dense peak of the training dtype
    matmul_efficiency: float         # achievable fraction of peak for large matmuls
    device_memory: float             # bytes


HOST_TYPES = {
    "h100": HostType("h100", "8x H100 SXM 80 GB, NVLink 4 / NVSwitch, InfiniBand NDR 400 Gb/s per GPU", 8,
                     intra_host_bandwidth=450e9, inter_host_bandwidth=50e9,
                     intra_host_latency=3e-6, inter_host_latency=8e-6,
                     peak_flops=989e12, matmul_efficiency=0.33, device_memory=80e9),
    "p3": HostType("p3", "AWS p3.16xlarge: 8x V100 SXM2 16 GB, NVLink 2, 25 Gb/s Ethernet per host", 8,
                   intra_host_bandwidth=100e9, inter_host_bandwidth=25e9 / 8 / 8,
                   intra_host_latency=5e-6, inter_host_latency=30e-6,
                   peak_flops=125e12, matmul_efficiency=0.4, device_memory=16e9),
}


def preset(name: str, num_gpus: int) -> ClusterSpec:
    """A ClusterSpec of `num_gpus` devices of host type `name`: whole hosts, or part of one host
    when num_gpus is below a host's device count."""
    if name not in HOST_TYPES:
        raise ValueError(f"unknown cluster preset {name!r}; known: {', '.join(sorted(HOST_TYPES))}")
    host = HOST_TYPES[name]
    per = host.devices_per_host
    if not isinstance(num_gpus, int) or num_gpus < 1 or (num_gpus > per and num_gpus % per):
        raise ValueError(f"preset {name!r}: num_gpus={num_gpus!r} must be a positive int, at most {per} or a "
                         f"multiple of {per} (whole hosts)")
    hosts, dph = (num_gpus // per, per) if num_gpus >= per else (1, num_gpus)
    return ClusterSpec(num_hosts=hosts, devices_per_host=dph,
                       inter_host_bandwidth=host.inter_host_bandwidth, intra_host_bandwidth=host.intra_host_bandwidth,
                       latency=host.intra_host_latency, inter_host_latency=host.inter_host_latency,
                       device_flops=host.peak_flops * host.matmul_efficiency, peak_flops=host.peak_flops,
                       device_memory=host.device_memory, name=f"{name}x{num_gpus}")

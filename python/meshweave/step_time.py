"""The α-β step time of a compiled, SPMD-partitioned program: judge what XLA emitted, not what a
planner priced.

Every collective in the compiled HLO is priced by the group of devices it runs over: its device
groups (from the replica groups) give the group size and whether a group spans hosts (partition
id p sits on host p // devices_per_host, so a mesh's first axis crosses hosts when the cluster
has several), and the same α-β formulas the planner uses (`passes/cost_model.LogicalMesh`) turn
its bytes into seconds on that link. Compute is the program's dot and convolution FLOPs per
device at the cluster's achievable matmul rate (`ClusterSpec.device_flops`), the planner's own
compute term. Loop bodies count trip-count times. Nothing overlaps: total = compute +
communication, the convention of `mw.plan`'s predicted step time, so plans compare on equal terms.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from meshweave.dialects.sharding import MeshSpec
from meshweave.passes.cost_model import LogicalMesh
from meshweave.planning import ClusterSpec
from meshweave.plugin import hlo_program as hp


@dataclass(frozen=True)
class PricedCollective:
    """One collective of the compiled program and what it costs."""

    kind: str
    name: str
    computation: str
    bytes: int                    # per device, of the result (as plugin/hlo_stats counts them)
    group_size: int
    axes: tuple[str, ...]         # the mesh axes its device groups span
    inter_host: bool              # some group spans more than one host
    runs: int                     # executions per step (loop trip counts)
    seconds: float                # one execution


@dataclass(frozen=True)
class KindTotal:
    kind: str
    count: int                    # executions per step
    static_count: int             # ops in the program text
    bytes: int                    # per device, summed over executions
    seconds: float


@dataclass(frozen=True)
class StepTimeEstimate:
    compute_s: float
    communication_s: float
    total_s: float
    flops: float                  # dot/convolution FLOPs per device per step
    kinds: tuple[KindTotal, ...]
    collectives: tuple[PricedCollective, ...]
    cluster: str
    notes: tuple[str, ...] = ()   # what the estimate could not see exactly (unknown trip counts, ...)

    def kind(self, name: str) -> KindTotal:
        return next((k for k in self.kinds if k.kind == name), KindTotal(name, 0, 0, 0, 0.0))

    def count(self, kind: str) -> int:
        return self.kind(kind).count

    def bytes(self, kind: str) -> int:
        return self.kind(kind).bytes

    @property
    def inter_host_s(self) -> float:
        return sum(c.seconds * c.runs for c in self.collectives if c.inter_host)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["inter_host_s"] = self.inter_host_s
        d.pop("collectives")
        return d


_PRICE = {"all-reduce": "all_reduce", "all-gather": "all_gather", "reduce-scatter": "reduce_scatter",
          "all-to-all": "all_to_all", "ragged-all-to-all": "all_to_all",
          "collective-permute": "collective_permute", "collective-broadcast": "collective_permute"}


class _Links:
    """A one-axis LogicalMesh per (group size, link level): the planner's formulas for one group."""

    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster
        self._meshes: dict[tuple[int, bool], LogicalMesh] = {}

    def seconds(self, kind: str, nbytes: float, n: int, inter: bool) -> float:
        if n <= 1:
            return 0.0
        lm = self._meshes.get((n, inter))
        if lm is None:
            c = self.cluster
            alpha = c.inter_host_latency if inter and c.inter_host_latency is not None else c.latency
            beta = 1.0 / (c.inter_host_bandwidth if inter else c.intra_host_bandwidth)
            lm = self._meshes[(n, inter)] = LogicalMesh.create(MeshSpec.from_shape((n,), ("g",)), (alpha,), (beta,))
        return lm.to_user_units(getattr(lm, _PRICE[kind])(nbytes, ("g",)))


def _result_bytes(ins: hp.Instruction) -> int:
    sizes = hp.shape_bytes(ins.shape)
    if ins.opcode == "collective-permute-start":
        return sizes[1] if len(sizes) > 1 else sum(sizes)
    if ins.opcode.endswith("-start") and ins.shape.startswith("(") and not ins.opcode.startswith("all-reduce"):
        sizes = sizes[len(sizes) // 2:]          # async start returns (operands, results)
    return sum(sizes)


def estimate_compiled_step(hlo_text: str, mesh_shape, axis_names, cluster: ClusterSpec) -> StepTimeEstimate:
    """Price the compiled program `hlo_text` (post SPMD partitioning: per-device shapes) on `cluster`.

    mesh_shape/axis_names: the logical mesh the program was partitioned over, devices in row-major
    order (partition id p at np.unravel_index(p, mesh_shape)); its size must be the cluster's.
    """
    mesh_shape = tuple(int(s) for s in mesh_shape)
    axis_names = tuple(axis_names)
    n_dev = math.prod(mesh_shape)
    if len(axis_names) != len(mesh_shape):
        raise ValueError(f"axis_names {axis_names} and mesh_shape {mesh_shape} differ in length")
    if n_dev != cluster.num_devices:
        raise ValueError(f"mesh {mesh_shape} has {n_dev} devices but cluster {cluster.name or cluster} has "
                         f"{cluster.num_devices}; give a ClusterSpec of the mesh's size (e.g. dataclasses.replace("
                         f"ClusterSpec.preset(name, {n_dev}), num_hosts=..., devices_per_host=...))")
    comps = hp.parse_module(hlo_text)
    runs, notes = hp.executions(comps)
    links = _Links(cluster)
    flops = 0.0
    priced: list[PricedCollective] = []
    for comp in comps.values():
        if not runs[comp.name]:
            continue
        shapes = comp.shapes()
        for ins in comp.instructions:
            flops += hp.matmul_flops(ins, shapes) * runs[comp.name]
            kind = hp.collective_kind(ins.opcode)
            if kind is None:
                continue
            nbytes = _result_bytes(ins)
            groups = hp.device_groups(ins.attributes, n_dev)
            if groups is None or any(d >= n_dev for g in groups for d in g):
                notes.append(f"{ins.opcode} %{ins.name}: device groups unreadable; priced over all {n_dev} "
                             "devices on the slowest link")
                groups = [list(range(n_dev))]
            size = max(len(g) for g in groups)
            coords = np.array(np.unravel_index(sorted({d for g in groups for d in g}), mesh_shape)).T
            by_dev = dict(zip(sorted({d for g in groups for d in g}), map(tuple, coords)))
            axes = tuple(a for i, a in enumerate(axis_names)
                         if any(len({by_dev[d][i] for d in g}) > 1 for g in groups))
            inter = any(len({d // cluster.devices_per_host for d in g}) > 1 for g in groups)
            volume = nbytes * size if kind == "reduce-scatter" else nbytes    # the formula's convention
            seconds = links.seconds(kind, volume, size, inter)
            priced.append(PricedCollective(kind, ins.name, comp.name, nbytes, size, axes, inter, runs[comp.name],
                                           seconds))
    kinds = []
    for kind in sorted({c.kind for c in priced}):
        cs = [c for c in priced if c.kind == kind]
        kinds.append(KindTotal(kind, sum(c.runs for c in cs), len(cs), sum(c.bytes * c.runs for c in cs),
                               sum(c.seconds * c.runs for c in cs)))
    compute = flops / cluster.device_flops
    comm = sum(k.seconds for k in kinds)
    return StepTimeEstimate(compute, comm, compute + comm, flops, tuple(kinds), tuple(priced),
                            cluster.name or f"{cluster.num_hosts}x{cluster.devices_per_host}", tuple(notes))


def estimate_executable(exe, cluster: ClusterSpec, stage: int = 0) -> StepTimeEstimate:
    """`estimate_compiled_step` of one stage of a compiled meshweave Executable."""
    st = exe.plan.stages[stage]
    return estimate_compiled_step(exe.hlo_text(stage), st.mesh_shape, st.axis_names, cluster)

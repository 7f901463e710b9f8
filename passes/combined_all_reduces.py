"""XLA's all-reduce combiner, as the cost graph sees it: which partial-sum all-reduces end up in one op.

After SPMD partitioning XLA merges all-reduces that have the same reduction, element type and
device groups (its AllReduceKey) and that do not depend on one another (the CPU pipeline with no byte limit and at
most 256 operands per op; the GPU pipeline up to `xla_gpu_all_reduce_combine_threshold_bytes`,
30 MiB by default). A data-parallel step's ~50 gradient all-reduces compile to one op, so
charging α per all-reduce overprices them against one all-to-all + all-gather of the same bytes.

Which all-reduces may combine is decided from the program, not from the plan: the sums whose
results flow into no dot, convolution, gather or scatter (weight, bias and embedding gradients,
the loss) are *combinable*. Two of them could still depend on each other (a norm of gradients),
but not by an all-reduce over the same axes in one plan: after the first the value is replicated
over those axes, so the second sums locally. Sums of one (mesh axes, element type) form a
`CombinedAllReduces`: each member pays β per byte; α is paid once per group through a hub node
of the ILP (`hub_terms`): a member strategy pays α when the hub is idle, the hub pays α when on,
so the ILP pays min(α · #members chosen, α), exactly α once any member is chosen. A member's
own entries combine with each other too (α once per strategy, without a hub). Pipelines' gradient
sums, priced at 1/micro-batches, combine among themselves.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from jaxlib.mlir import ir

CPU_COMBINE_COUNT = 256          # XLA's kCombineCount (CPU) and combine_threshold_count (GPU)


@dataclass(frozen=True)
class CombinerSpec:
    """What XLA's all-reduce combiner merges: up to `threshold_bytes` per combined op (None: no
    byte limit, XLA's CPU pipeline) and `threshold_count` operands."""

    threshold_bytes: float | None = None
    threshold_count: int = CPU_COMBINE_COUNT

    def split_share(self, nbytes: float) -> float:
        """A member's share of the further ops a group over the byte limit splits into (linear in
        its bytes; the ILP does not see the count limit, which `merge_predicted` applies)."""
        return nbytes / self.threshold_bytes if self.threshold_bytes else 0.0


@dataclass
class SumStep:
    """One partial-sum all-reduce the cost graph charged: group g, strategy s, entry `index` of
    g.node_plans[s], on `axes` of per-device `nbytes`, at `share` of its cost (a pipeline's
    gradient sum runs once per step); `key` names the op (its first result)."""

    group: int
    strategy: int
    index: int
    axes: tuple[str, ...]
    nbytes: float
    key: object
    dtype: str                                    # element type and reduction (`reduction_key`)
    share: float = 1.0


@dataclass
class CombinedAllReduces:
    """Sums on one (axes, dtype and reduction) that XLA merges; `members[g][s]`: entries of node_plans[s].
    `price`: what one combined op costs beyond its bytes (α and the all-reduce tie-breaker, times
    the members' share), paid once."""

    axes: tuple[str, ...]
    dtype: str
    share: float
    price: float                                  # normalized cost units
    members: dict[int, dict[int, list[int]]] = field(default_factory=dict)

    @property
    def needs_hub(self) -> bool:
        return len(self.members) > 1

    @property
    def name(self) -> str:
        return f"combined all-reduce over {','.join(self.axes)} ({self.dtype})"


def combinable(block, candidates: set, sinks: set) -> set:
    """The candidate sums (keyed by their first result) of `block` whose results flow into no op
    named in `sinks` (dot, convolution, gather, scatter): a gradient or a loss, not an activation."""
    feeds_sink: set = set()
    for op in reversed(list(block.operations)):
        if op.operation.name in sinks or _holds(op, sinks) or any(r in feeds_sink for r in op.results):
            feeds_sink.update(op.operands)
    return {k for k in candidates if k not in feeds_sink}


def _holds(op, names: set) -> bool:
    """Whether an op's regions (a loop body, a branch) contain one of `names`."""
    return any(inner.operation.name in names or _holds(inner, names)
               for region in op.operation.regions for b in region.blocks for inner in b.operations)


def reduction_key(op) -> str:
    """What an op's all-reduce combines with: its element type and reduction ("f32 add"); a
    reduce's body names the reduction (max and add all-reduces stay apart), anything else adds."""
    kind = "add"
    if op.operation.name == "stablehlo.reduce":
        body = [o.operation.name for o in op.regions[0].blocks[0].operations]
        kind = body[0].split(".")[-1] if len(body) == 2 else "+".join(body)
    return f"{ir.RankedTensorType(op.results[0].type).element_type} {kind}"


def combine(groups, steps: list[SumStep], block, sinks: set, lmesh, spec: CombinerSpec) -> list[CombinedAllReduces]:
    """Group the charged sums XLA will combine and move their α off the members' node costs (onto a
    hub when a group spans several ILP nodes). Mutates `groups[*].node_cost`."""
    if not steps:
        return []
    keep = combinable(block, {st.key for st in steps}, sinks)
    combined: dict[tuple, CombinedAllReduces] = {}
    for st in steps:
        if st.key not in keep:
            continue
        k = (st.axes, st.dtype, st.share)
        c = combined.get(k)
        if c is None:
            c = combined[k] = CombinedAllReduces(st.axes, st.dtype, st.share, lmesh.all_reduce(0.0, st.axes) * st.share)
        c.members.setdefault(st.group, {}).setdefault(st.strategy, []).append(st.index)
        # The entry stays listed in node_plans; `merge_predicted` merges the chosen ones.
        groups[st.group].node_cost[st.strategy] += c.price * (spec.split_share(st.nbytes) - 1.0)
    out = list(combined.values())
    for c in out:
        if not c.needs_hub:       # one ILP node: its strategy pays the price once (else the hub does)
            for g, by_s in c.members.items():
                for s in by_s:
                    groups[g].node_cost[s] += c.price
    return out


def combined_refund(combined: list[CombinedAllReduces], choice, share: float) -> float:
    """How much less the chosen members of the groups at `share` cost in full than separately:
    the price of every op but one per group (normalized units, at full share)."""
    refund = 0.0
    for c in combined:
        if c.share != share:
            continue
        n = sum(len(by_s.get(choice[g], ())) for g, by_s in c.members.items())
        refund += max(n - 1, 0) * c.price / c.share
    return refund


def hub_terms(c: CombinedAllReduces, num_strategies) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """The hub's node cost [idle, on] and, per member group, its edge matrix (strategies x 2)."""
    edges = {}
    for g, by_s in c.members.items():
        m = np.zeros((num_strategies(g), 2))
        m[list(by_s), 0] = c.price
        edges[g] = m
    return np.array([0.0, c.price]), edges


def merge_predicted(groups, choice, combined: list[CombinedAllReduces], spec: CombinerSpec):
    """(entries to leave out as (group, strategy, index), merged all-reduces as (kind, axes, bytes,
    why)): the chosen members of each combined group become ops of up to the combiner's limits."""
    skip, merged = set(), []
    for c in combined:
        sizes = []
        for g, by_s in c.members.items():
            s = choice[g]
            for i in by_s.get(s, ()):
                skip.add((g, s, i))
                sizes.append(groups[g].node_plans[s][i][2])
        op, ops = [], []
        for b in sizes:
            if op and (len(op) >= spec.threshold_count or
                       (spec.threshold_bytes and sum(op) + b > spec.threshold_bytes)):
                ops.append(op)
                op = []
            op.append(b)
        if op:
            ops.append(op)
        merged += [("all-reduce", c.axes, float(sum(o)), f"{len(o)} sums combined by XLA ({c.name})") for o in ops]
    return skip, merged

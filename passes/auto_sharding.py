"""auto-sharding: choose how every op is sharded over the logical mesh by an ILP (Alpa's intra-op pass).

Steps: attach Shardy sharding rules to every op; build the cost graph (passes/cost_graph.py:
strategy groups, α-β communication costs, resharding edges, per-tensor memory); convert it to a
`ShardingProblem` and solve it (passes/solver); write the choice back as closed sdy shardings on
@main's arguments and results, on every planned op's results, and as `sdy.sharding_constraint`
on the operands of dots/convolutions/gathers/scatters whose layout must change. XLA's Shardy
partitioner then inserts exactly the collectives the plan priced; `plan_fidelity` checks that.
"""
from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import sdy
from jaxlib.mlir.passmanager import PassManager

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import TensorSharding
from meshweave.passes.combined_all_reduces import CombinerSpec, hub_terms, merge_predicted
from meshweave.passes.cost_graph import RULE_ATTR, CostGraph, gc_paused
from meshweave.passes import sharding_rules as sr
from meshweave.passes.cost_model import INF, LogicalMesh
from meshweave.passes.explicit_collectives import channel_ids, spell_reshard, wrap_local, wrap_reduce_scatter
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Option, Pass, PassError, register

COST_SCALE = 1000          # float cost units -> integer problem units (tie-breakers are 0.001)
PRICED_TOTAL_LIMIT = 1e12  # graph units of held-memory price at most (x COST_SCALE: 1000x below the solver's
                           # forbidden 10^18, and within float64's exact integers, 2^53 ~ 9e15)


class MemoryBudgetError(PassError):
    """No plan fits the per-device memory budget; `min_budget` is the smallest one that does."""

    def __init__(self, message, min_budget):
        super().__init__("auto-sharding", message)
        self.min_budget = min_budget


@dataclass
class AutoShardingResult(PassResult):
    """The ILP's decision: the problem it solved, the cost graph, the choice and what it predicts."""

    problem: object                   # passes.solver.ShardingProblem (re-solve it, or write it as IOPDDL)
    graph: CostGraph
    choice: list[int]                 # chosen strategy per strategy group
    objective: float                  # in user cost units (alpha/beta's)
    predicted_collectives: dict       # {kind: {count, bytes}}, bytes as the compiled HLO shows them
    predicted_costs: dict             # {kind: cost, "total": cost}
    solver: dict                      # solver statistics (status, method, times, sizes)
    graph_stats: dict
    constraints_inserted: int
    report: str = field(repr=False, default="")
    compute_cost: float = 0.0         # the objective's compute part, user units (0 when not priced)
    compute_priced: bool = False      # device-flops was given: objective = communication + compute

    @property
    def communication_cost(self) -> float:
        """The objective without its compute part (communication and tie-breakers)."""
        return self.objective - self.compute_cost

    def explain(self) -> str:
        return self.report


def to_int_cost(x: np.ndarray) -> np.ndarray:
    from meshweave.passes.solver.problem import INF_COST

    out = np.where(np.isinf(x), INF_COST, np.minimum(np.round(x * COST_SCALE), INF_COST))
    return out.astype(np.int64)


def build_problem(graph: CostGraph, memory_budget: float | None, name: str = "meshweave"):
    """The graph as a ShardingProblem. With a memory budget, every tensor's bytes count over its
    live range: tensors other than a group's first become extra nodes tied to the group."""
    from meshweave.passes.solver.problem import INF_COST, ShardingProblem

    costs = [to_int_cost(g.node_cost) for g in graph.groups]
    names = [g.name for g in graph.groups]
    strategy_names = [list(g.strategies) for g in graph.groups]
    usages = [np.zeros(len(g.strategies), dtype=np.int64) for g in graph.groups]
    intervals = [[0, 0] for _ in graph.groups]
    merged: dict[tuple[int, int], np.ndarray] = {}
    for e in graph.edges:
        m = graph.edge_matrix(e)
        a, b = e.src_group, e.dst_group
        if a > b:
            a, b, m = b, a, m.T
        merged[(a, b)] = merged.get((a, b), 0) + m
    for c in graph.combined:      # XLA's combiner: one hub per group of combinable all-reduces
        if not c.needs_hub:
            continue
        hub_cost, hub_edges = hub_terms(c, lambda g: len(graph.groups[g].strategies))
        hub = len(costs)
        costs.append(to_int_cost(hub_cost))
        usages.append(np.zeros(2, dtype=np.int64))
        intervals.append([0, 0])
        names.append(c.name)
        strategy_names.append(["separate", "combined"])
        for g, m in hub_edges.items():
            merged[(g, hub)] = m
    edge_nodes = list(merged)
    edge_costs = [to_int_cost(merged[k]) for k in edge_nodes]
    if memory_budget is not None:
        first = {}
        for gid, start, end, usage in graph.memory_terms():
            u = np.ceil(usage).astype(np.int64)
            if gid not in first:
                first[gid] = True
                usages[gid] = u
                intervals[gid] = [start, end]
                continue
            k = len(u)
            node = len(costs)
            costs.append(np.zeros(k, dtype=np.int64))
            usages.append(u)
            intervals.append([start, end])
            names.append(f"{graph.groups[gid].name}/mem{node}")
            strategy_names.append(list(graph.groups[gid].strategies))
            tie = np.full((k, k), INF_COST, dtype=np.int64)
            np.fill_diagonal(tie, 0)
            edge_nodes.append((gid, node))
            edge_costs.append(tie)
    problem = ShardingProblem(
        name=name, node_costs=costs, node_usages=usages, intervals=np.array(intervals, dtype=np.int64),
        edge_nodes=np.array(edge_nodes, dtype=np.int64).reshape(-1, 2), edge_costs=edge_costs,
        usage_limit=int(memory_budget) if memory_budget is not None else None,
        node_names=names, strategy_names=strategy_names)
    problem.validate()
    return problem


def predicted_collectives(graph: CostGraph, choice) -> list[tuple[str, tuple, float, str]]:
    """The collectives the plan pays for, as (kind, axes, per-device bytes, why); an operand
    resharded alike for several consumers counts once, as the annotation inserts it once; sums XLA's
    combiner merges are listed as the combined all-reduces it emits."""
    skip, out = merge_predicted(graph.groups, choice, graph.combined, graph.combiner)
    for g in graph.groups:
        s = choice[g.id]
        out += [p for i, p in enumerate(g.node_plans[s]) if (g.id, s, i) not in skip]
    for e in graph.edges:
        if e.operand:
            continue
        src, dst = e.src[choice[e.src_group]], e.dst[choice[e.dst_group]]
        out += [(k, ax, b, e.why) for k, ax, b in graph.lmesh.reshard_plan(e.nbytes, src, dst)]
    for rec, k, tid, req, first in graph.operand_reshards(choice):
        if first:
            t = graph.tensors[tid]
            why = f"operand {k} of {graph.groups[rec.group].name}"
            out += [(kind, ax, b, why) for kind, ax, b in
                    graph.lmesh.reshard_plan(t.nbytes, t.shardings[choice[t.group]], req)]
    return out


def summarize_predicted(colls, mesh) -> dict:
    """{kind: {count, bytes}} with bytes as the compiled HLO shows them (result size per device)."""
    out: dict = {}
    for kind, axes, nbytes, _ in colls:
        s = out.setdefault(kind, {"count": 0, "bytes": 0})
        s["count"] += 1
        s["bytes"] += int(round(nbytes / mesh.axes_size(axes) if kind == "reduce-scatter" else nbytes))
    return dict(sorted(out.items()))


def _annotate(module, func, graph: CostGraph, choice) -> int:
    """Write the chosen shardings into the module; returns the number of constraints inserted."""
    ctx = module.context
    with ctx, ir.Location.unknown():
        args = mw.entry_block(func).arguments
        arg_attrs = mw.arg_attr_dicts(func)
        for i, arg in enumerate(args):
            t = graph.tensors[graph.value_ids[arg]]
            arg_attrs[i][mw.SDY_SHARDING] = t.shardings[choice[t.group]].to_attr()
        mw.set_arg_attr_dicts(func, arg_attrs)
        res_attrs = mw.result_attr_dicts(func)
        ret_types = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value).results
        for r, tid, alias in graph.outputs:
            if r in graph.pinned_outputs:
                ts = graph.pinned_outputs[r]
            elif alias is not None:
                at = graph.tensors[graph.value_ids[args[alias]]]
                ts = at.shardings[choice[at.group]]
            elif tid is not None and graph.tensors[tid].group >= 0:
                t = graph.tensors[tid]
                ts = t.shardings[choice[t.group]]
            else:
                ts = TensorSharding.replicated(len(ir.RankedTensorType(ret_types[r]).shape), graph.mesh.name)
            res_attrs[r][mw.SDY_SHARDING] = ts.to_attr()
        mw.set_result_attr_dicts(func, res_attrs)
        n_constraints = 0
        scatters, locals_ = [], []
        for rec in graph.ops:
            if rec.group < 0:
                continue
            s = choice[rec.group]
            per_value = [graph.tensors[t].shardings[s].to_text()[len("#sdy.sharding"):] for t in rec.results]
            rec.op.attributes["sdy.sharding"] = ir.Attribute.parse(
                "#sdy.sharding_per_value<[" + ", ".join(per_value) + "]>")
            if rec.descriptions is not None:
                rec.op.attributes[mw.STRATEGY] = ir.StringAttr.get(rec.descriptions[s])
                st = graph.groups[rec.group].op_strategies[s]
                if st is not None and st.scatter is not None:
                    scatters.append((rec, s, st))
                elif (st is not None and rec.op.operation.name == "stablehlo.scatter" and graph.mesh.num_devices > 1
                      and local_scatter(st.a, rec.op)):   # one device: XLA skips partitioning, nothing to guard
                    locals_.append((rec, s))
                elif (st is not None and graph.mesh.num_devices > 1
                      and local_grouped_conv(st.a, rec.op, graph.mesh) is not None):
                    locals_.append((rec, s))
        # Pin every operand whose layout must change, so XLA reshards exactly where the plan pays;
        # one constraint per value and layout within a block, shared by its consumers.
        pinned = {}
        channels = channel_ids(module)     # derived from the module: identical compiles, identical IR
        for rec, k, tid, req, first in graph.operand_reshards(choice):
            key = (tid, rec.scope, req)
            if first:
                t = graph.tensors[tid]
                src = t.shardings[choice[t.group]]
                plan = graph.lmesh.reshard_plan(t.nbytes, src, req)
                # The location names the reshard in XLA's metadata (op_name), so compiled
                # collectives can be traced back to the plan's edge.
                where = ir.Location.name(f"reshard {t.name} {src.short()}->{req.short()} for {graph.groups[rec.group].name}")
                with ir.InsertionPoint(rec.op), where:
                    pinned[key] = spell_reshard(rec.op.operands[k], src, req, plan, graph.mesh, channels)
                n_constraints += 1
            rec.op.operands[k] = pinned[key]
        # XLA's Shardy import keeps only @main's, constraints' and manual computations' shardings
        # (an op's own sdy.sharding is dropped and re-propagated), so pin every planned result.
        wrapped = {id(rec) for rec, _ in locals_} | {id(rec) for rec, _, _ in scatters}
        for rec in graph.ops:
            if rec.group >= 0 and id(rec) not in wrapped:
                _pin_results(rec, [graph.tensors[t].shardings[choice[rec.group]] for t in rec.results])
        for rec in graph.ops:
            if rec.loop and rec.op.operation.name == "stablehlo.case":
                _pin_case(rec, [graph.tensors[t].shardings[choice[graph.tensors[t].group]]
                                if graph.tensors[t].group >= 0 else None for t in rec.results])
        for rec, s in locals_:
            groups = local_grouped_conv(graph.groups[rec.group].op_strategies[s].a, rec.op, graph.mesh)
            wrap_local(rec.op, [req[s] for req in rec.operand_reqs],
                       [graph.tensors[t].shardings[s] for t in rec.results], graph.mesh, attributes=groups)
        for rec, s, st in scatters:   # after the constraints: the manual computation takes the op's operands
            rule = st.rule
            partial = sr.tensor_sharding(rule.results[0], st.a, graph.mesh)
            result = graph.tensors[rec.results[0]].shardings[s]
            dim = next(d for d, fs in enumerate(rule.results[0]) if st.scatter in fs)
            wrap_reduce_scatter(rec.op, [req[s] for req in rec.operand_reqs], partial, result,
                                sr.reduced_axes(rule, st.a), dim, graph.mesh, next(channels))
    return n_constraints


def _pin_results(rec, shardings) -> None:
    """Follow each result of `rec.op` by a sharding constraint to its planned layout; every other
    use reads the constrained value."""
    for value, ts in zip(rec.op.results, shardings):
        if ts is None or not any(True for _ in value.uses):
            continue
        with ir.InsertionPoint.after(rec.op), ir.Location.name(f"pin {ts.short()}"):
            pinned = sdy.ShardingConstraintOp(value, ts.to_attr())
        value.replace_all_uses_except(pinned.result, pinned.operation)


def _pin_case(rec, layouts) -> None:
    """Every branch of a case hands result r back in its planned layout, and the result is pinned
    to it (None: a result computed from constants only, left to XLA)."""
    for region in rec.op.regions:
        ret = list(region.blocks[0].operations)[-1]
        for r, ts in enumerate(layouts):
            owner = ret.operands[r].owner
            pinned = (not isinstance(owner, ir.Block) and owner.name == "sdy.sharding_constraint"
                      and owner.attributes["sharding"] == ts.to_attr()) if ts is not None else True
            if not pinned:
                with ir.InsertionPoint(ret), ir.Location.name(f"branch result {r} {ts.short()}"):
                    ret.operands[r] = sdy.ShardingConstraintOp(ret.operands[r], ts.to_attr()).result
    _pin_results(rec, layouts)


def local_scatter(a, op) -> bool:
    """Whether a scatter under assignment `a` is purely local: the dims it scatters into (operand
    factors its updates lack) are whole on every device and nothing is summed across devices."""
    rule = sr.Rule.from_attr(op.attributes[RULE_ATTR])
    n = len(rule.operands) // 2
    in_updates = {f for dims in rule.operands[n + 1:] for fs in dims for f in fs}
    scattered = {f for dims in rule.operands[:n] for fs in dims for f in fs} - in_updates
    return not sr.reduced_axes(rule, a) and not any(a[f] for f in scattered)


def local_grouped_conv(a, op, mesh) -> dict | None:
    """For a grouped convolution (feature or batch groups) whose plan sums over no mesh axis: the
    group counts each device's local convolution has ({attribute: count}); None for other ops.
    XLA's partitioner gathers such a convolution's operands (and exchanges halos) although every
    device holds whole groups, so the op runs in a manual computation as the plan priced it."""
    if op.operation.name != "stablehlo.convolution" or RULE_ATTR not in op.attributes:
        return None
    counts = {k: ir.IntegerAttr(op.attributes[k]).value for k in ("feature_group_count", "batch_group_count")
              if k in op.attributes}
    if all(v == 1 for v in counts.values()):
        return None
    rule = sr.Rule.from_attr(op.attributes[RULE_ATTR])
    if sr.reduced_axes(rule, a):
        return None
    # The group factor is the one the input, the kernel and the result all carry.
    shared = [{f for dims in t for f in dims} for t in (rule.operands[0], rule.operands[1], rule.results[0])]
    group = shared[0] & shared[1] & shared[2]
    if len(group) != 1:
        return None
    split = mesh.axes_size(a[group.pop()])
    if any(v > 1 and v % split for v in counts.values()):
        return None                 # a device would hold part of a group: not a local op
    i64 = ir.IntegerType.get_signless(64)
    return {k: ir.IntegerAttr.get(i64, v // split) for k, v in counts.items() if v > 1}


@dataclass(frozen=True)
class ReplicatedFallback:
    """An op with no sharding rule: it runs replicated and its operands are gathered first."""

    name: str
    op_name: str
    gathered_bytes: float       # per device, summed over the operands the plan gathers
    cost: float                 # in the logical mesh's units


def replicated_fallbacks(graph: CostGraph, choice) -> list[ReplicatedFallback]:
    out = []
    for g in graph.groups:
        if g.kind != "replicated":
            continue
        plans = [p for p in g.node_plans[choice[g.id]]]
        for e in graph.edges:
            if e.dst_group == g.id:
                src, dst = e.src[choice[e.src_group]], e.dst[choice[e.dst_group]]
                plans += [(k, ax, b, e.why) for k, ax, b in graph.lmesh.reshard_plan(e.nbytes, src, dst)]
        out.append(ReplicatedFallback(g.name, g.op.operation.name, sum(b for _, _, b, _ in plans),
                                      graph.lmesh.plan_cost([(k, ax, b) for k, ax, b, _ in plans])))
    return out


def _explain(graph: CostGraph, choice, colls, info) -> str:
    lm = graph.lmesh
    lines = [f"logical mesh {graph.mesh}  alpha={lm.user_alpha} beta={lm.user_beta}  (costs below in units of "
             f"{lm.unit:g}: one byte over the fastest link)",
             f"ILP: {info['nodes']} nodes, {info['edges']} edges, {info['variables_hint']} strategy choices; "
             f"solved by {info['method']} in {info['solve_time']:.3f} s ({info['status']}); objective {info['objective']:.6g}"]
    heavy = sorted((r for r in graph.ops if r.heavy), key=lambda r: -r.flops)
    lines.append("heavy ops (chosen strategy, its own cost" + (": communication + compute):" if graph.flop_cost else
                                                                "; compute not priced):"))
    for rec in heavy[:40]:
        g = graph.groups[rec.group]
        s = choice[g.id]
        compute = g.compute_cost[s] if g.compute_cost is not None else 0.0
        lines.append(f"  {g.name:24s} {rec.descriptions[s]:48s} cost {g.node_cost[s] - compute:.6g}"
                     + (f" + compute {compute:.6g}" if g.compute_cost is not None else ""))
    if len(heavy) > 40:
        lines.append(f"  ... {len(heavy) - 40} more")
    fallbacks = replicated_fallbacks(graph, choice)
    if fallbacks:
        lines.append("ops without a sharding rule (run replicated; what gathering their operands costs):")
        for fb in fallbacks:
            lines.append(f"  {fb.name:24s} {fb.op_name:28s} gathers {fb.gathered_bytes:12.0f} B/device   cost {fb.cost:.6g}")
    by_kind = defaultdict(lambda: [0, 0.0, 0.0])
    for kind, axes, nbytes, _ in colls:
        by_kind[kind][0] += 1
        by_kind[kind][1] += nbytes
        by_kind[kind][2] += graph.lmesh.plan_cost([(kind, axes, nbytes)])
    lines.append("predicted collectives:")
    for kind, (n, b, c) in sorted(by_kind.items()):
        lines.append(f"  {kind:15s} x{n:<4d} {b:14.0f} B/device   cost {c:.6g}")
    if not by_kind:
        lines.append("  none")
    merged = [c for c in colls if c[3].endswith(")") and "sums combined by XLA" in c[3]]
    if merged:
        lines.append("XLA's all-reduce combiner (priced: α once per combined op):")
        lines += [f"  {why}: {nbytes:.0f} B/device" for _, _, nbytes, why in merged]
    return "\n".join(lines)


@register
class AutoSharding(Pass):
    name = "auto-sharding"
    summary = "Choose every op's sharding over the mesh with an ILP (α-β costs, memory limit); write sdy shardings"
    options = (
        Option("alpha", "float-list", (), "latency per mesh axis (default 1 each)"),
        Option("beta", "float-list", (), "inverse bandwidth per mesh axis (default 1, then 0.1)"),
        Option("memory-budget", "float", 0.0, "bytes per device; 0 = unlimited"),
        Option("batch-axes", "str-list", (), "force batch arguments (mw.batch_dim) to split their batch dim on these axes"),
        Option("zero-stage", "int", 0, "2: shard optimizer state over all devices; 3: shard parameters too"),
        Option("allow-all-gather", "bool", True, "allow all-gather when resharding"),
        Option("allow-all-to-all", "bool", True, "allow all-to-all when resharding"),
        Option("prefer-reduce-scatter", "bool", False, "offer reduce-scatter variants of summing ops"),
        Option("allow-mixed-mesh-shape", "bool", False,
               "let ops split a non-batch dim over several mesh axes (the mesh as 1-D) beside 2-D ops"),
        Option("combine-all-reduces", "bool", True,
               "price independent all-reduces of one kind, dtype and axes as XLA's combiner merges them (α once)"),
        Option("all-reduce-combine-bytes", "float", 0.0,
               "the combiner's byte limit per combined op; 0 = none (XLA's CPU pipeline; its GPU default is 30 MiB)"),
        Option("device-flops", "float", 0.0, "achievable FLOP/s per device, in alpha/beta's time unit: each "
               "dot/convolution strategy pays its per-device FLOPs at this rate; 0 = compute not priced"),
        Option("solver", "str", "highs", "ILP backend: highs | cbc"),
        Option("time-limit", "float", 10.0, "solver time limit in seconds (it stops earlier at a proven optimum)"),
        Option("gradient-results", "int-list", (),
               "@main results that are weight gradients a pipeline accumulates over micro-batches"),
        Option("micro-batches", "int", 1, "micro-batches per step: the gradient sums behind gradient-results are "
               "all-reduced once per step, so each run pays 1/micro-batches of that all-reduce"),
        Option("memory-price", "float", 0.0, "objective units per byte per device of the priced arguments and "
               "results (what a pipeline stage holds between fragments); 0 = off; the reported objective excludes it"),
        Option("priced-args", "int-list", (), "@main arguments whose bytes per device are priced (parameters)"),
        Option("priced-arg-scale", "float", 1.0, "bytes held per priced argument byte (parameter, gradient, "
               "optimizer state)"),
        Option("priced-results", "int-list", (), "@main results whose bytes per device are priced"),
        Option("priced-result-scales", "float-list", (), "per priced result: bytes held per byte (default 1)"),
    )

    def _price_held_memory(self, graph: CostGraph, func, warn) -> list[tuple[int, np.ndarray]]:
        """Add the memory price of the priced arguments/results to their groups' strategy costs;
        returns (group, added cost per strategy) so the objective can be reported without it."""
        if not self.memory_price:
            return []
        nargs = len(mw.entry_block(func).arguments)
        scales = list(self.priced_result_scales) or [1.0] * len(self.priced_results)
        if len(scales) != len(self.priced_results):
            raise PassError(self.name, f"priced-result-scales has {len(scales)} entries for {len(self.priced_results)} "
                            "priced-results; give one scale per result (or none for 1 each)")
        bad = [a for a in self.priced_args if not 0 <= a < nargs]
        if bad:
            raise PassError(self.name, f"priced-args {bad}: @main has {nargs} arguments")
        tids = [(graph.value_ids[mw.entry_block(func).arguments[a]], self.priced_arg_scale) for a in self.priced_args]
        outputs = {r: (tid, alias) for r, tid, alias in graph.outputs}
        for r, scale in zip(self.priced_results, scales):
            if r not in outputs:
                raise PassError(self.name, f"priced-results: @main has no result {r}")
            tid, alias = outputs[r]
            if alias is not None:
                tid = graph.value_ids[mw.entry_block(func).arguments[alias]]
            if tid is not None:
                tids.append((tid, scale))
        unit = graph.lmesh.to_user_units(1.0)          # user units per graph unit
        added: dict[int, np.ndarray] = {}
        for tid, scale in tids:
            t = graph.tensors[tid]
            if t.group < 0:                             # a constant: not planned, nothing to choose
                continue
            per_device = np.array([t.nbytes / graph.mesh.axes_size(sh.used_axes()) for sh in t.shardings])
            add = per_device * (self.memory_price * scale / unit)
            added[t.group] = added.get(t.group, 0.0) + add
        # The price is applied as given: scaling it down (as a cap on the largest priced entry once
        # did) made every lean level of a large model the same weak price, and its "lean" layouts
        # hold what the fastest ones hold. Only a price whose total nears the solver's forbidden
        # cost (or float64's exact integers) is scaled, with a warning: the layouts then hold more.
        total = sum(float(np.max(a)) for a in added.values())
        if total > PRICED_TOTAL_LIMIT:
            warn(f"auto-sharding: memory-price={self.memory_price:g} prices up to {total:.3g} cost units of held "
                 f"memory, beyond what the solver keeps exact ({PRICED_TOTAL_LIMIT:.3g}); scaled down to that "
                 "(the layouts may hold more than the price asks for; a MemoryPrice set by hand: lower it; a "
                 "memory-lean level of the stage DP: it comes from LEAN_PRICE_FACTORS)")
            added = {g: a * (PRICED_TOTAL_LIMIT / total) for g, a in added.items()}
        for g, add in added.items():
            graph.groups[g].node_cost = graph.groups[g].node_cost + add
        return list(added.items())

    def run(self, module, state):
        from meshweave.passes.solver import solve

        mesh = state.mesh
        if mesh is None:
            raise PassError(self.name, "no mesh: run install-mesh first (or give --mesh)")
        lmesh = LogicalMesh.create(mesh, self.alpha or None, self.beta or None,
                                   allow_all_gather=self.allow_all_gather, allow_all_to_all=self.allow_all_to_all)
        for a in self.batch_axes:
            if a not in mesh.axis_names:
                raise PassError(self.name, f"batch-axes: '{a}' is not an axis of mesh {mesh}")
        if self.device_flops < 0:
            raise PassError(self.name, f"device-flops={self.device_flops}: expected a positive FLOP/s rate, or 0 to "
                                       "leave compute out of the objective")
        if self.zero_stage not in (0, 2, 3):
            raise PassError(self.name, f"zero-stage={self.zero_stage}: expected 0, 2 or 3")
        state.logical_mesh = lmesh
        func = mw.main_func(module)
        # CHLO ops (chlo.square, chlo.erf, chlo.top_k, ...) have no Shardy rule: decompose them into
        # StableHLO ops that do (XLA would legalize them the same way before partitioning).
        PassManager.parse("builtin.module(func.func(chlo-legalize-to-stablehlo),"
                          "func.func(sdy-populate-op-sharding-rules))",
                          context=module.context).run(module.operation)
        func.walk(_fix_conv_rules)
        t0, c0 = time.perf_counter(), time.process_time()   # wall and CPU (the machine may be shared)
        share = 1.0
        if self.gradient_results and self.micro_batches > 1:
            from meshweave.passes.partial_gradients import mark_gradient_sums

            mark_gradient_sums(func, self.gradient_results)
            share = 1.0 / self.micro_batches
        budget = self.memory_budget or None
        with gc_paused():   # the build allocates many objects and frees few: spare it the collector's scans
            graph = CostGraph(lmesh, prefer_reduce_scatter=self.prefer_reduce_scatter, batch_axes=self.batch_axes,
                              zero_stage=self.zero_stage, mixed_mesh_shape=self.allow_mixed_mesh_shape,
                              warn=state.warn, gradient_share=share,
                              combiner=CombinerSpec(self.all_reduce_combine_bytes or None)
                              if self.combine_all_reduces else None,
                              flop_cost=1.0 / self.device_flops / lmesh.unit if self.device_flops else 0.0).build(func)
            held = self._price_held_memory(graph, func, state.warn)
            problem = build_problem(graph, budget)
        t_build, c_build = time.perf_counter() - t0, time.process_time() - c0
        sol = solve(problem, time_limit=self.time_limit, method="auto", backend=self.solver,
                    cache=state.options.get("solve_cache"))   # a SolveCache shared by repeated planning
        c_solve = time.process_time() - c0 - c_build
        if not sol.feasible:
            if budget is not None:
                floor = sol.stats.get("min_peak_usage")
                raise MemoryBudgetError(
                    f"no sharding plan fits memory-budget={budget:.0f} bytes per device; the smallest budget "
                    f"the planner can meet is {floor} bytes (raise memory_budget_per_device to at least that, "
                    f"or use more devices)", floor)
            raise PassError(self.name, f"the solver found no plan ({sol.status})")
        if sol.status == "timeout" or sol.status == "feasible":
            state.warn(f"auto-sharding: solver stopped at its {self.time_limit:g} s limit; using the best plan "
                       f"found (status {sol.status})")
        choice = [int(x) for x in sol.assignment[: len(graph.groups)]]
        held_cost = sum(float(price[choice[g]]) for g, price in held)     # in the graph's units
        objective = lmesh.to_user_units(sol.cost / COST_SCALE - held_cost)
        if sol.cost / COST_SCALE - held_cost >= 1e13:      # the held-memory price is not a forbidden cost
            state.warn("auto-sharding: the plan needs a forbidden (infinite-cost) resharding; check the warnings "
                       "above for ops that run replicated")
        n_constraints = _annotate(module, func, graph, choice)
        PassManager.parse("builtin.module(func.func(sdy-drop-sharding-rules))",
                          context=module.context).run(module.operation)
        colls = predicted_collectives(graph, choice)
        info = {"nodes": problem.num_nodes, "edges": problem.num_edges,
                "variables_hint": int(sum(len(c) for c in problem.node_costs)),
                "method": sol.method, "status": sol.status, "solve_time": sol.solve_time,
                "build_time": t_build, "objective": objective, "problem_cost": int(sol.cost),
                "build_cpu_time": c_build, "solve_cpu_time": c_solve}
        state.results[self.name] = AutoShardingResult(
            problem=problem, graph=graph, choice=choice, objective=objective,
            predicted_collectives=summarize_predicted(colls, mesh),
            predicted_costs=_cost_by_kind(lmesh, colls),
            solver={**info, **{k: v for k, v in sol.stats.items() if isinstance(v, (int, float, str))}},
            graph_stats=graph.stats(), constraints_inserted=n_constraints,
            report=_explain(graph, choice, colls, info),
            compute_cost=lmesh.to_user_units(chosen_compute(graph, choice)), compute_priced=bool(self.device_flops))


def chosen_compute(graph: CostGraph, choice) -> float:
    """The compute part of the plan's cost (normalized units): dot/conv FLOPs per device at the rate."""
    return float(sum(g.compute_cost[choice[g.id]] for g in graph.groups if g.compute_cost is not None))


def _fix_conv_rules(op):
    if op.name == "stablehlo.convolution" and RULE_ATTR in op.attributes:
        sr.halo_free_conv_rule(op)
    return ir.WalkResult.ADVANCE


def _cost_by_kind(lmesh, colls) -> dict:
    out = defaultdict(float)
    for kind, axes, nbytes, _ in colls:
        out[kind] += lmesh.to_user_units(lmesh.plan_cost([(kind, axes, nbytes)]))
    out["total"] = sum(out.values())
    return dict(out)

"""The intra-op cost graph of a function: ILP nodes (strategy groups), their costs and edges.

Every non-constant tensor gets its sharding from one *group* (an ILP node):
- anchors start a group and enumerate strategies from their sharding rule: function
  arguments, dot_general / convolution (heavy: no replicated compute unless compute is priced),
  gather / scatter;
- followers (elementwise, broadcast, reshape, transpose, reduce, slice, ... : any other op
  with a rule) join the group of their biggest non-constant operand and derive their
  sharding from it, paying an all-gather where the rule cannot carry a split over and an
  all-reduce where they sum over a split dimension. Followers keep the ILP small.
- ops without a rule (custom_call, unknown ops) are replicated anchors, with a warning.
Constants, iotas and ops computed only from them are *free*: any layout is a local slice.

With a FLOP cost (`flop_cost`, from the pass's device-flops), each dot/convolution strategy also
pays its per-device FLOPs, and heavy ops may then leave mesh axes unused (replicated compute is
priced, not forbidden). Elementwise ops are not priced: the rate is calibrated on whole blocks.

Edges carry the resharding cost between a producer's sharding and what a consumer needs.
Costs come from passes/cost_model.py; the result converts to a `ShardingProblem` for the solver.
"""
from __future__ import annotations

import gc
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.sharding import TensorSharding
from meshweave.passes.combined_all_reduces import (CombinedAllReduces, CombinerSpec, SumStep, combine,
                                                   combined_refund, reduction_key)
from meshweave.passes.cost_memo import CostMemo, Layout
from meshweave.passes.cost_model import INF, LogicalMesh, conv_flops
from meshweave.passes import sharding_rules as sr

HEAVY = {"stablehlo.dot_general", "stablehlo.convolution"}
ANCHORS = HEAVY | {"stablehlo.gather", "stablehlo.scatter"}
PASS_THROUGH = {"stablehlo.optimization_barrier"}
RULE_ATTR = "sdy.sharding_rule"
MEMORY_TIE = 1e-4          # cost per byte held per device by an argument (a tie-breaker, << any collective)
class UnknownDtypeError(ValueError):
    """A tensor's element type has no known size; costs and memory would be wrong."""


def element_bits(et: ir.Type) -> int:
    """Storage bits of one element (i1/pred: one byte, as XLA stores it)."""
    for cls in (ir.FloatType, ir.IntegerType):
        try:
            width = cls(et).width
        except (ValueError, TypeError):
            continue
        return 8 if width == 1 else width
    try:
        return 2 * element_bits(ir.ComplexType(et).element_type)
    except (ValueError, TypeError):
        pass
    raise UnknownDtypeError(f"auto-sharding: element type '{et}' has no known size, so its tensors cannot be "
                            "costed; use a float, integer or complex dtype (or cast before this op)")


def tensor_bytes(t: ir.Type) -> int:
    rt = ir.RankedTensorType(t)
    return -(-math.prod(rt.shape) * element_bits(rt.element_type) // 8)


@dataclass(frozen=True)
class OpStrategy:
    a: sr.Assignment
    scatter: int | None = None      # factor that takes the reduced axes (reduce-scatter instead of all-reduce)
    rule: sr.Rule | None = None     # the op's sharding rule (for scatter strategies)


@dataclass
class Tensor:
    value: ir.Value
    name: str
    shape: tuple[int, ...]
    nbytes: int
    group: int                              # -1: free (constant-derived)
    shardings: tuple[TensorSharding, ...] | None  # per strategy of the group (interned: one object per layout)
    start: int = 0
    end: int = 0
    batch_dim: int | None = None            # the dimension carrying the batch (data-parallel analysis)


@dataclass
class Group:
    id: int
    name: str
    kind: str                               # "arg" | "anchor" | "replicated"
    strategies: list[str]
    node_cost: np.ndarray                   # float, per strategy
    node_plans: list[list]                  # per strategy: [(kind, axes, bytes, why)]
    op: object = None                       # anchor op (OpView) or None for arguments
    arg_index: int | None = None
    op_strategies: list[OpStrategy] | None = None
    members: list[int] = field(default_factory=list)    # tensor ids
    compute_cost: np.ndarray | None = None  # heavy anchors with compute priced: per strategy, part of node_cost


@dataclass
class OpRecord:
    op: object
    group: int
    results: list[int]                      # tensor ids
    operand_tensors: list[int | None]       # producing tensor id, None for values from elsewhere
    operand_reqs: list[list[TensorSharding] | None]   # per operand: required sharding per group strategy
    heavy: bool = False
    flops: float = 0.0
    descriptions: list[str] | None = None
    loop: bool = False                      # a while or case op: results take their values' layouts
    scope: str = ""                         # the enclosing while loop's label ("" in @main's body)


@dataclass
class EdgeTerm:
    src_group: int
    dst_group: int
    src: list[TensorSharding]               # producer sharding per src-group strategy
    dst: list[TensorSharding]               # required sharding per dst-group strategy
    nbytes: int
    why: str
    scale: float = 1.0                      # loop trip count when inside a while body
    operand: bool = False                   # an op's operand (the plan pins it with a sharding constraint)


class CostGraphError(ValueError):
    pass


class CostGraph:
    def __init__(self, lmesh: LogicalMesh, *, prefer_reduce_scatter=False, batch_axes=(), zero_stage: int = 0,
                 mixed_mesh_shape: bool = False, warn=None, gradient_share: float = 1.0,
                 combiner: CombinerSpec | None = CombinerSpec(), flop_cost: float = 0.0):
        self.lmesh = lmesh
        # Cost (in lmesh's normalized units) of one FLOP on one device; 0: compute is not priced.
        # A dot/convolution strategy pays its per-device FLOPs at this rate (`CostMemo.compute_charges`).
        self.flop_cost = flop_cost
        # Ops marked mw.gradient_sum sum a weight gradient that a pipeline reduces once per step:
        # their all-reduce costs this share (1 / micro-batches) per run; `gradient_charges` keeps
        # (group, strategy, full cost) so a planner can re-price what ends up not partial.
        self.gradient_share = gradient_share
        self.gradient_charges: list[tuple[int, int, float]] = []
        # XLA's all-reduce combiner (None: price every all-reduce alone): see combined_all_reduces.py.
        self.combiner = combiner
        self.sum_steps: list[SumStep] = []
        self.combined: list[CombinedAllReduces] = []
        self.mesh = lmesh.mesh
        self.prefer_reduce_scatter = prefer_reduce_scatter
        self.batch_axes = tuple(batch_axes)   # batch arguments split their batch dim over these axes first
        self.zero_stage = zero_stage          # 2: optimizer state sharded; 3: parameters sharded too
        # Off (Alpa's default): on a mesh of several axes, only a batch dimension (or a ZeRO-sharded
        # argument) takes more than one axis; on: any dimension may use the mesh as 1-D.
        self.mixed_mesh_shape = mixed_mesh_shape or sum(n > 1 for n in lmesh.mesh.shape) < 2
        self.parameters: set[int] = set()
        self.warn = warn or (lambda msg: None)
        self.groups: list[Group] = []
        self.tensors: list[Tensor] = []
        self.ops: list[OpRecord] = []
        self.edges: list[EdgeTerm] = []
        self.value_ids: dict = {}
        self.outputs: list[tuple[int, int | None, int | None]] = []   # (result idx, tensor id, aliased arg)
        self.pinned_outputs: dict[int, TensorSharding] = {}           # result idx -> hand-written layout
        self.num_steps = 0
        self.scale = 1.0                      # cost multiplier (a loop body runs trip-count times)
        self.loops: list[tuple[str, int]] = []
        self.scope = ""                       # label of the while loop being built
        self.unhandled: dict[str, int] = {}
        self.memo = CostMemo(lmesh)           # each op signature (identical layers) costed once
        self._types: dict = {}                # ir.Type -> (shape, bytes)

    # ----------------------------------------------------------------- building
    def _new_group(self, name, kind, strategies, op=None, arg_index=None, op_strategies=None) -> Group:
        g = Group(len(self.groups), name, kind, strategies, np.zeros(len(strategies)),
                  [[] for _ in strategies], op, arg_index, op_strategies)
        self.groups.append(g)
        return g

    def _type_info(self, t: ir.Type) -> tuple[tuple[int, ...], int]:
        hit = self._types.get(t)
        if hit is None:
            hit = self._types[t] = (tuple(ir.RankedTensorType(t).shape), tensor_bytes(t))
        return hit

    def _new_tensor(self, value, name, group, shardings: Layout | None, step) -> int:
        shape, nbytes = self._type_info(value.type)
        t = Tensor(value, name, shape, nbytes, group, shardings, step, step + 1)
        self.tensors.append(t)
        tid = len(self.tensors) - 1
        self.value_ids[value] = tid
        if group >= 0:
            self.groups[group].members.append(tid)
        return tid

    def _charge(self, group: Group, s: int, plan, why: str, record: bool = True):
        """Add `plan`'s cost to strategy s; `record` lists it among the group's own collectives
        (operand resharding is listed per op instead: see `operand_reshards`)."""
        cost = self.lmesh.plan_cost(plan) * self.scale
        group.node_cost[s] += cost
        if record:
            group.node_plans[s] += [(k, ax, b, why) for k, ax, b in plan]

    def build(self, func) -> "CostGraph":
        block = mw.entry_block(func)
        attrs = mw.arg_attr_dicts(func)
        self.parameters = parameter_args(func)
        for i, arg in enumerate(block.arguments):
            self._add_argument(i, arg, attrs[i])
        for step, op in enumerate(block.operations, start=1):
            self.num_steps = step
            name = op.operation.name
            if name == "func.return":
                self._add_return(op, step, func)
                continue
            self._add_op(op, step)
        self.num_steps += 1
        if self.combiner is not None:
            self.combined = combine(self.groups, self.sum_steps, block, ANCHORS, self.lmesh, self.combiner)
        return self

    def _add_argument(self, i, arg, attrs):
        path = mw.attr_value(attrs[mw.ARG_PATH]) if mw.ARG_PATH in attrs else f"arg{i}"
        batch_dim = mw.attr_value(attrs[mw.BATCH_DIM]) if mw.BATCH_DIM in attrs else None
        shape, nbytes = self._type_info(arg.type)
        pinned = (self.pinned(attrs[mw.PINNED_SHARDING], shape, f"argument {path}").dims
                  if mw.PINNED_SHARDING in attrs else None)
        key = (shape, nbytes, batch_dim, i in self.parameters, pinned)
        hit = self.memo.arguments.get(key)
        if hit is None:
            hit = self.memo.arguments[key] = self._argument_strategies(shape, nbytes, batch_dim,
                                                                       i in self.parameters, pinned)
        assigns, shardings, names, tie = hit
        g = self._new_group(path, "arg", list(names), arg_index=i, op_strategies=[OpStrategy(a) for a in assigns])
        tid = self._new_tensor(arg, path, g.id, shardings, 0)
        # Tie-breaker: among equally cheap layouts prefer the one holding fewer bytes per device.
        g.node_cost += tie
        self.tensors[tid].batch_dim = batch_dim

    def _argument_strategies(self, shape, nbytes, batch_dim, parameter: bool, pinned):
        """(assignments, layout, names, memory tie-breaker) of an argument of this signature."""
        rule = sr.Rule.identity(shape)
        all_axes = tuple(a for a, n in zip(self.mesh.axis_names, self.mesh.shape) if n > 1)
        used = lambda a: sum(len(x) for x in a)
        tries = [lambda a: True]
        if batch_dim is not None and self.batch_axes:
            forced = tuple(a for a in self.batch_axes if self.mesh.axis_size(a) > 1)
            tries.insert(0, lambda a: a[batch_dim][:len(forced)] == forced)
        elif self.zero_stage and batch_dim is None:
            replicate = parameter and self.zero_stage < 3
            tries.insert(0, (lambda a: used(a) == 0) if replicate else (lambda a: used(a) == len(all_axes)))
        if not (self.zero_stage and batch_dim is None):     # ZeRO's sharded state may use the mesh as 1-D
            tries = [lambda a, ok=ok: ok(a) and self._mesh_shape_ok(a, batch_dim) for ok in tries] + tries
        assigns = []
        for allowed in tries:       # the policy if any layout meets it, else every layout
            assigns = sr.enumerate_assignments(rule, self.mesh, allowed=allowed)
            if assigns:
                break
        if pinned is not None:       # a hand-written layout (ManualShardingOption): the only strategy
            assigns = [pinned]
        shardings = self.memo.layout(sr.tensor_sharding(rule.results[0], a, self.mesh) for a in assigns)
        tie = np.array([MEMORY_TIE * nbytes / self.mesh.axes_size(sh.used_axes()) for sh in shardings])
        return assigns, shardings, [sh.short() for sh in shardings], tie

    def pinned(self, attr, shape, what: str) -> TensorSharding:
        """A `mw.pinned_sharding` checked against the mesh and the tensor's shape; axes of size 1
        are dropped (they split nothing, and the cost model compares layouts by their axes)."""
        try:
            ts = TensorSharding.from_attr(attr)
        except ValueError as e:
            raise CostGraphError(f"{what}: pinned sharding {attr} is not usable: {e}") from None
        if ts.rank != len(shape):
            raise CostGraphError(f"{what}: pinned sharding {attr} has rank {ts.rank}, the tensor {tuple(shape)} "
                                 f"has rank {len(shape)}")
        for d, axes in enumerate(ts.dims):
            unknown = [a for a in axes if a not in self.mesh.axis_names]
            if unknown:
                raise CostGraphError(f"{what}: pinned sharding {attr} names axes {unknown} that mesh {self.mesh} "
                                     "does not have")
            if shape[d] % self.mesh.axes_size(axes):
                raise CostGraphError(f"{what}: pinned sharding {attr} splits dimension {d} of size {shape[d]} "
                                     f"{self.mesh.axes_size(axes)} ways")
        return TensorSharding(tuple(tuple(a for a in axes if self.mesh.axis_size(a) > 1) for axes in ts.dims),
                              self.mesh.name)

    def _operand_tensor(self, v) -> int | None:
        return self.value_ids.get(v)

    def _touch(self, tid, step):
        if tid is not None:
            t = self.tensors[tid]
            t.end = max(t.end, step + 1)

    def _add_return(self, op, step, func):
        res_attrs = mw.result_attr_dicts(func)
        arg_attrs = mw.arg_attr_dicts(func)
        args = mw.entry_block(func).arguments
        donors = [i for i, d in enumerate(arg_attrs) if "jax.buffer_donor" in d or mw.DONATED in d]
        used = {mw.attr_value(d[mw.KEEPS_ARG]) for d in res_attrs if mw.KEEPS_ARG in d}
        for r, v in enumerate(op.operands):
            tid = self._operand_tensor(v)
            self._touch(tid, step)
            if tid is not None:
                self.tensors[tid].end = step + 1
            alias = mw.attr_value(res_attrs[r][mw.KEEPS_ARG]) if mw.KEEPS_ARG in res_attrs[r] else None
            if alias is None:
                for i in donors:
                    if i not in used and args[i].type == v.type:
                        alias = i
                        used.add(i)
                        break
            if mw.PINNED_SHARDING in res_attrs[r]:    # the result must end in the hand-written layout
                shape = tuple(ir.RankedTensorType(v.type).shape)
                pin = self.pinned(res_attrs[r][mw.PINNED_SHARDING], shape, f"result {r}")
                self.pinned_outputs[r] = pin
                self.outputs.append((r, tid, None))
                if tid is not None and self.tensors[tid].group >= 0:
                    t = self.tensors[tid]
                    g = self.groups[t.group]
                    for s in range(len(g.strategies)):
                        self._charge(g, s, self.lmesh.reshard_plan(t.nbytes, t.shardings[s], pin),
                                     f"result {r} is pinned to {pin}")
                continue
            self.outputs.append((r, tid, alias))
            if alias is not None and tid is not None and self.tensors[tid].group >= 0:
                arg_t = self.value_ids[args[alias]]
                self._edge_or_node(tid, self.tensors[arg_t].group, self.tensors[arg_t].shardings,
                                   f"result {r} keeps {self.tensors[arg_t].name}'s sharding")

    def _edge_or_node(self, src_tid, dst_group, dst_shardings, why, operand=False):
        """Charge resharding src tensor -> dst_shardings (indexed by dst_group's strategies)."""
        src = self.tensors[src_tid]
        if src.group < 0:
            return
        if src.group == dst_group:
            g = self.groups[dst_group]
            for s, cost, plan in self.memo.reshard_charges(src.shardings, dst_shardings, src.nbytes, self.scale):
                g.node_cost[s] += cost
                if not operand:   # operand resharding is listed per op instead: see `operand_reshards`
                    g.node_plans[s] += [(k, ax, b, why) for k, ax, b in plan]
        else:
            self.edges.append(EdgeTerm(src.group, dst_group, src.shardings, dst_shardings, src.nbytes, why,
                                       self.scale, operand))

    def _add_op(self, op, step, sub: int | None = None):
        name = op.operation.name
        operand_tids = [self._operand_tensor(v) for v in op.operands]
        for tid in operand_tids:
            self._touch(tid, step)
        results = list(op.results)
        if not results:
            return
        if name == "stablehlo.case":      # before the constant check: a constant index still runs a branch
            self._add_case(op, step, operand_tids, f"case#{step}" + (f".{sub}" if sub is not None else ""))
            return
        live = [t for t in operand_tids if t is not None and self.tensors[t].group >= 0]
        if not live and name not in ANCHORS:
            for k, r in enumerate(results):       # constant-derived: free
                self._new_tensor(r, f"{name}#{step}", -1, None, step)
            return
        label = f"{name.split('.')[-1]}#{step}" + (f".{sub}" if sub is not None else "")
        if name == "stablehlo.while":
            self._add_while(op, step, operand_tids, label)
            return
        if RULE_ATTR not in op.attributes:
            if name in PASS_THROUGH and len(op.operands) == len(results):
                self._add_pass_through(op, step, operand_tids, label)
            else:
                self._add_replicated(op, step, operand_tids, label)
            return
        rule_attr = op.attributes[RULE_ATTR]
        rule = self.memo.rule(rule_attr)
        if name == "stablehlo.convolution":
            rule = sr.whole_compound_dims(rule)
        if name in ANCHORS or (name == "stablehlo.broadcast_in_dim" and
                               self._type_info(results[0].type)[1] > 2 * self._type_info(op.operands[0].type)[1]) \
                or (self.prefer_reduce_scatter and is_sum_reduce(op, rule)):
            # A broadcast is planned on its own: resharding its small input beats resharding its output.
            # With reduce-scatter preferred, a sum (a bias's or a norm's gradient) may scatter its result.
            self._add_anchor(op, step, rule_attr, rule, operand_tids, label, heavy=name in HEAVY)
        else:
            self._add_follower(op, step, rule_attr, rule, operand_tids, live, label)

    def _mesh_shape_ok(self, a, batch_factor) -> bool:
        """Without mixed mesh shapes, only the batch factor may take several mesh axes."""
        return self.mixed_mesh_shape or all(len(axes) < 2 for f, axes in enumerate(a) if f != batch_factor)

    def _batch_factor(self, rule, operand_tids) -> int | None:
        """The rule factor that carries the batch (from operands' batch dims), if any."""
        for k, tid in enumerate(operand_tids):
            if tid is None or self.tensors[tid].batch_dim is None or k >= len(rule.operands):
                continue
            factors = [f for f in rule.operands[k][self.tensors[tid].batch_dim] if rule.factor_sizes[f] > 1]
            if factors:
                return factors[0]
        return None

    def _set_result_batch_dims(self, rule, res_tids, factor):
        if factor is None:
            return
        for r, tid in enumerate(res_tids):
            for d, factors in enumerate(rule.results[r]):
                if factor in factors:
                    self.tensors[tid].batch_dim = d
                    break

    def _scatter_variants(self, rule, assigns):
        """Reduce-scatter variants: the summed axes also split the result's leading dimension."""
        out = []
        for a in assigns:
            red = sr.reduced_axes(rule, a)
            if not red:
                continue
            for factors in rule.results[0]:
                f = next((f for f in factors if rule.factor_sizes[f] > 1), None)
                if f is None or f in rule.reduction or not rule.shardable(f):
                    continue
                if rule.factor_sizes[f] % self.mesh.axes_size(a[f] + red) == 0:
                    out.append(OpStrategy(a, f, rule))
        return out

    def _anchor_strategies(self, rule, heavy, bf) -> list[OpStrategy]:
        # Without compute in the objective a heavy op must use every mesh axis (replicated compute
        # would look free); with it, the ILP may replicate compute where that saves more communication.
        heavy = heavy and not self.flop_cost
        assigns = []
        forced = tuple(a for a in self.batch_axes if self.mesh.axis_size(a) > 1)
        shape_ok = lambda a: self._mesh_shape_ok(a, bf)
        if bf is not None and forced:   # data-parallel forcing: the batch factor keeps the batch axes
            assigns = sr.enumerate_assignments(rule, self.mesh, use_all_axes=heavy,
                                               allowed=lambda a: a[bf][:len(forced)] == forced and shape_ok(a))
        if not assigns:
            assigns = sr.enumerate_assignments(rule, self.mesh, use_all_axes=heavy, allowed=shape_ok)
        if not assigns:
            assigns = sr.enumerate_assignments(rule, self.mesh, use_all_axes=heavy)
        strategies = [OpStrategy(a) for a in assigns]
        if self.prefer_reduce_scatter:
            strategies += self._scatter_variants(rule, assigns)
        return strategies

    def _add_anchor(self, op, step, rule_attr, rule, operand_tids, label, heavy):
        bf = self._batch_factor(rule, operand_tids)
        plan = self.memo.op_plan((rule_attr, "anchor", heavy, bf), rule,
                                 lambda: self._anchor_strategies(rule, heavy, bf), named=True)
        g = self._new_group(label, "anchor", list(plan.names), op=op, op_strategies=list(plan.strategies))
        res_tids = self._add_results(op, step, plan, g, label)
        reqs = self._charge_op(op, g, plan, operand_tids, res_tids, label)
        self._set_result_batch_dims(rule, res_tids, bf)
        flops = _heavy_flops(op, rule) if heavy else 0.0
        if heavy and self.flop_cost:
            g.compute_cost = self.memo.compute_charges(plan, flops, self.flop_cost * self.scale)
            g.node_cost += g.compute_cost
        self.ops.append(OpRecord(op, g.id, res_tids, operand_tids, reqs, heavy, flops, plan.names, scope=self.scope))

    def _add_results(self, op, step, plan, g, label) -> list[int]:
        results = op.results
        if len(results) == 1:
            return [self._new_tensor(results[0], label, g.id, plan.results[0], step)]
        return [self._new_tensor(v, f"{label}.{r}", g.id, plan.results[r], step) for r, v in enumerate(results)]

    def _charge_op(self, op, g, plan, operand_tids, res_tids, label):
        """Charge an op's partial-sum reductions and its operands' resharding, per strategy of its
        group; returns each operand's required sharding per strategy."""
        if plan.sums:
            result_bytes = tuple(self.tensors[t].nbytes for t in res_tids)
            share = self.gradient_share if mw.GRADIENT_SUM in op.attributes else 1.0
            combinable = self.scale == 1.0 and not self.scope
            for s, cost, step in self.memo.sum_charges(plan, result_bytes, self.scale):
                if share != 1.0 and step[0] == "all-reduce":
                    self.gradient_charges.append((g.id, s, cost))
                    cost *= share
                if combinable and step[0] == "all-reduce" and cost > 0:
                    self.sum_steps.append(SumStep(g.id, s, len(g.node_plans[s]), step[1], step[2], op.results[0],
                                                  reduction_key(op), share))
                g.node_cost[s] += cost
                g.node_plans[s].append(step + (f"{label} sums over {','.join(step[1])}",))
        for k, tid in enumerate(operand_tids):
            if tid is not None:
                self._edge_or_node(tid, g.id, plan.operands[k], f"operand {k} of {label}", operand=True)
        return list(plan.operands)

    def _add_follower(self, op, step, rule_attr, rule, operand_tids, live, label):
        # Follow the biggest operand that is not constant-derived (ties: the first).
        p = max(live, key=lambda t: (self.tensors[t].nbytes, -operand_tids.index(t)))
        pk = operand_tids.index(p)
        src = self.tensors[p]
        g = self.groups[src.group]
        plan = self.memo.op_plan((rule_attr, "follow", pk, src.shardings), rule, lambda: [
            OpStrategy(sr.induced_assignment(rule, pk, sh, self.mesh)) for sh in src.shardings], named=False)
        res_tids = self._add_results(op, step, plan, g, label)
        self._set_result_batch_dims(rule, res_tids, self._batch_factor(rule, operand_tids))
        reqs = self._charge_op(op, g, plan, operand_tids, res_tids, label)
        self.ops.append(OpRecord(op, g.id, res_tids, operand_tids, reqs, scope=self.scope))

    def _add_while(self, op, step, operand_tids, label):
        """Plan a loop body once: carried values keep one layout through every iteration (the body's
        block arguments and the while's results share the init values' groups); what the body pays
        is paid trip-count times; the body must hand back each carry in its layout."""
        body = op.regions[1].blocks[0]
        carried = [self._alias_tensor(arg, f"{label}.carry", tid, step)
                   for arg, tid in zip(body.arguments, operand_tids)]
        trip = trip_count(op)
        if trip is None:
            trip = 1
            self.warn(f"auto-sharding: the trip count of stablehlo.while ({label}) is not a constant; "
                      "its body is costed as running once")
        outer_scale, self.scale = self.scale, self.scale * trip
        outer_scope, self.scope = self.scope, label
        try:
            for k, inner in enumerate(body.operations):
                if inner.operation.name == "stablehlo.return":
                    for i, v in enumerate(inner.operands):
                        tid = self._operand_tensor(v)
                        ct = carried[i]
                        c = self.tensors[ct]
                        if tid is not None and c.group < 0 and self.tensors[tid].group >= 0:
                            # A carry initialized from constants (a scan's output buffer) takes the
                            # layout of what the body writes into it.
                            t = self.tensors[tid]
                            c.group, c.shardings, c.batch_dim = t.group, t.shardings, t.batch_dim
                            self.groups[t.group].members.append(ct)
                            continue
                        if tid is not None and c.group >= 0:
                            self._edge_or_node(tid, self.tensors[ct].group, self.tensors[ct].shardings,
                                               f"{label} carries value {i} around the loop")
                    continue
                self._add_op(inner, step, sub=k)
        finally:
            self.scale, self.scope = outer_scale, outer_scope
        res = [self._alias_tensor(v, f"{label}.{r}", ct, step)
               for r, (v, ct) in enumerate(zip(op.results, carried))]
        self.ops.append(OpRecord(op, -1, res, operand_tids, [None] * len(operand_tids), loop=True))
        self.loops.append((label, trip))

    def _add_case(self, op, step, operand_tids, label):
        """Plan a case (lax.switch / lax.cond) like a loop body run once: every branch's ops are
        planned and costed (which branch runs is known only at run time); result r takes the
        layout of the first branch that returns a planned value for it, and the other branches
        hand theirs back in that layout. Each branch is its own scope (reshards are not shared)."""
        returned = []
        outer_scope = self.scope
        try:
            for b, region in enumerate(op.regions):
                self.scope = f"{label}.{b}"
                for k, inner in enumerate(region.blocks[0].operations):
                    if inner.operation.name == "stablehlo.return":
                        tids = [self._operand_tensor(v) for v in inner.operands]
                        for tid in tids:
                            self._touch(tid, step)
                        returned.append(tids)
                        continue
                    self._add_op(inner, step, sub=f"{b}.{k}")
        finally:
            self.scope = outer_scope
        res = []
        for r, v in enumerate(op.results):
            planned = [tids[r] for tids in returned if tids[r] is not None and self.tensors[tids[r]].group >= 0]
            tid = self._alias_tensor(v, f"{label}.{r}", planned[0] if planned else None, step)
            res.append(tid)
            for other in planned[1:]:
                t = self.tensors[tid]
                self._edge_or_node(other, t.group, t.shardings, f"{label} returns result {r} in its layout")
        self.ops.append(OpRecord(op, -1, res, operand_tids, [None] * len(operand_tids), loop=True))

    def _alias_tensor(self, value, name, src_tid, step) -> int:
        """A tensor for ``value`` that keeps the layout (group, shardings, batch dim) of tensor
        ``src_tid``; a free one when that has no group."""
        if src_tid is None or self.tensors[src_tid].group < 0:
            return self._new_tensor(value, name, -1, None, step)
        t = self.tensors[src_tid]
        tid = self._new_tensor(value, name, t.group, t.shardings, step)
        self.tensors[tid].batch_dim = t.batch_dim
        return tid

    def _add_pass_through(self, op, step, operand_tids, label):
        res = [self._alias_tensor(v, f"{label}.{r}", tid, step)
               for r, (v, tid) in enumerate(zip(op.results, operand_tids))]
        self.ops.append(OpRecord(op, -1, res, operand_tids, [None] * len(operand_tids)))

    def _add_replicated(self, op, step, operand_tids, label):
        name = op.operation.name
        self.unhandled[name] = self.unhandled.get(name, 0) + 1
        if self.unhandled[name] == 1:
            self.warn(f"auto-sharding: no sharding rule for '{name}' ({label}); it runs replicated")
        g = self._new_group(label, "replicated", ["replicated"], op=op, op_strategies=[None])
        res = []
        for r, v in enumerate(op.results):
            rank = len(ir.RankedTensorType(v.type).shape)
            res.append(self._new_tensor(v, f"{label}.{r}", g.id, self._replicated(rank), step))
        reqs = []
        for k, (v, tid) in enumerate(zip(op.operands, operand_tids)):
            rank = len(ir.RankedTensorType(v.type).shape)
            req = self._replicated(rank)
            reqs.append(req)
            if tid is not None:
                self._edge_or_node(tid, g.id, req, f"operand {k} of {label} (replicated)", operand=True)
        self.ops.append(OpRecord(op, g.id, res, operand_tids, reqs, scope=self.scope))

    # ----------------------------------------------------------------- costs
    def _replicated(self, rank: int) -> Layout:
        """The layout of a one-strategy (replicated) group's tensor of this rank."""
        return self.memo.layout([TensorSharding.replicated(rank, self.mesh.name)])

    def edge_matrix(self, e: EdgeTerm) -> np.ndarray:
        """Cost matrix (src strategies x dst strategies), read-only."""
        return self.memo.edge_matrix(e.src, e.dst, e.nbytes, e.scale)

    def operand_reshards(self, choice):
        """Per op (in program order) and operand: the layout the plan pins the operand to, when it
        differs from its producer's, as (record, operand index, tensor id, sharding, first). One
        value resharded to one layout within one block is done once (XLA CSEs the copies), so
        `first` is False for the repeats; the ILP's edges still charge every consumer."""
        seen = set()
        for rec in self.ops:
            if rec.group < 0:
                continue
            s = choice[rec.group]
            for k, (tid, req) in enumerate(zip(rec.operand_tensors, rec.operand_reqs)):
                if tid is None or req is None or self.tensors[tid].group < 0:
                    continue
                t = self.tensors[tid]
                if t.shardings[choice[t.group]] == req[s]:
                    continue
                key = (tid, rec.scope, req[s])
                yield rec, k, tid, req[s], key not in seen
                seen.add(key)

    def marked_gradient_cost(self, choice) -> float:
        """Full cost (normalized) of the chosen gradient sums priced at `gradient_share`, combined as
        XLA's combiner emits them."""
        if not self.gradient_charges:
            return 0.0
        full = sum(cost for g, s, cost in self.gradient_charges if choice[g] == s)
        return full - combined_refund(self.combined, choice, self.gradient_share)

    def memory_terms(self):
        """(group, start, end, per-strategy bytes per device) for every non-free tensor."""
        out, usages = [], {}
        for t in self.tensors:
            if t.group < 0:
                continue
            usage = usages.get((t.shardings, t.nbytes))
            if usage is None:
                usage = usages[(t.shardings, t.nbytes)] = np.array(
                    [t.nbytes / self.mesh.axes_size(sh.used_axes()) for sh in t.shardings])
                usage.flags.writeable = False
            out.append((t.group, t.start, t.end, usage))
        return out

    def stats(self) -> dict:
        return {"groups": len(self.groups), "tensors": len(self.tensors), "edges": len(self.edges),
                "strategies": int(sum(len(g.strategies) for g in self.groups)),
                "heavy_ops": sum(1 for o in self.ops if o.heavy), "steps": self.num_steps,
                "op_signatures": self.memo.op_signatures,
                "unhandled_ops": dict(self.unhandled)}


@contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector (reference counting still frees memory)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _heavy_flops(op, rule: sr.Rule) -> float:
    """A dot's FLOPs are 2 x the product of its rule's factors (batch, free and contracting dims);
    a convolution's rule gives its kernel window size-1 factors, so count from its shapes."""
    if op.name != "stablehlo.convolution":
        return 2.0 * math.prod(rule.factor_sizes)
    from jaxlib.mlir.dialects import stablehlo as hlo

    dn = hlo.ConvDimensionNumbers(op.attributes["dimension_numbers"])
    dilation = op.attributes["lhs_dilation"] if "lhs_dilation" in op.attributes else ()
    return conv_flops(ir.RankedTensorType(op.operands[1].type).shape, ir.RankedTensorType(op.results[0].type).shape,
                      dn.kernel_output_feature_dimension, list(ir.DenseI64ArrayAttr(dilation)) if dilation else ())


def is_sum_reduce(op, rule: sr.Rule) -> bool:
    """A single-result stablehlo.reduce with an add body and a non-scalar result: its partial sums
    may be reduce-scattered (max/min/... reductions may not)."""
    if op.operation.name != "stablehlo.reduce" or len(op.results) != 1 or not rule.reduction:
        return False
    if not ir.RankedTensorType(op.results[0].type).shape:
        return False
    body = [o.operation.name for o in op.regions[0].blocks[0].operations]
    return body == ["stablehlo.add", "stablehlo.return"]


def _constant_int(v) -> int | None:
    owner = v.owner
    if isinstance(owner, ir.Block):
        return None
    op = owner.operation if hasattr(owner, "operation") else owner
    if op.name != "stablehlo.constant":
        return None
    try:
        return int(ir.DenseIntElementsAttr(op.attributes["value"])[0])
    except (ValueError, TypeError, IndexError):
        return None


def _loop_step(while_op, index: int) -> int | None:
    """The constant the body adds to carried value ``index`` each iteration, if it does."""
    body = while_op.regions[1].blocks[0]
    ret = list(body.operations)[-1]
    owner = ret.operands[index].owner
    if isinstance(owner, ir.Block) or owner.name != "stablehlo.add":
        return None
    a, b = owner.operands
    for arg, const in ((a, b), (b, a)):
        if isinstance(arg.owner, ir.Block) and arg.arg_number == index:
            return _constant_int(const)
    return None


def trip_count(while_op) -> int | None:
    """Iterations of a counted loop -- ``i < N`` (or ``<=``, ``!=``) against a constant, ``i``
    starting from a constant and growing by a constant step, as jax's scan and fori_loop
    emit -- or None when the loop is not of that form."""
    for op in while_op.regions[0].blocks[0].operations:
        if op.operation.name != "stablehlo.compare" or len(op.operands) != 2:
            continue
        lhs, rhs = op.operands
        bound = _constant_int(rhs)
        if bound is None or not isinstance(lhs.owner, ir.Block):
            continue
        direction = str(op.attributes["comparison_direction"])
        kind = next((d for d in ("LT", "LE", "NE") if f" {d}>" in direction or direction.endswith(d)), None)
        start = _constant_int(while_op.operands[lhs.arg_number])
        step = _loop_step(while_op, lhs.arg_number)
        if kind is None or start is None or step is None or step <= 0:
            return None
        span = bound - start + (1 if kind == "LE" else 0)
        if kind == "NE" and span % step:
            return None
        return max(-(-span // step), 0)
    return None


def parameter_args(func) -> set[int]:
    """Arguments whose values flow into a dot or convolution (the model's weights and biases, as
    opposed to optimizer state and counters, which only flow into the step's outputs)."""
    block = mw.entry_block(func)
    attrs = mw.arg_attr_dicts(func)
    feeds = set()
    stack = []
    for op in block.operations:
        if op.operation.name in HEAVY:
            stack.extend(op.operands)
    while stack:
        v = stack.pop()
        if v in feeds:
            continue
        feeds.add(v)
        owner = v.owner
        if isinstance(owner, ir.Block):
            continue
        stack.extend(owner.operands)
    return {i for i, a in enumerate(block.arguments) if a in feeds and mw.BATCH_DIM not in attrs[i]}

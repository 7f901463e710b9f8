"""Hand-written parallel plans of the zoo's GPT, BERT and MoE language model, as methods.

Data parallel, ZeRO-2 and ZeRO-3 are meshweave's own methods. Megatron-style dp x tp is written
here as PartitionSpecs on the parameters, their optimizer state and the batch (a
`ManualShardingOption`; the ILP only fills in the layouts between them), on a mesh ("x", "y"):
the batch over x (dp), tensor parallelism over y (tp):
  - attention: q/k/v projections split by head (column-parallel), the output projection by head
    on its input side (row-parallel);
  - MLP: the first kernel column-parallel (and its bias), the second row-parallel;
  - embedding and LM head vocab-parallel; layer norms and position embeddings replicated.
For the MoE model a second hand-written plan is expert parallelism as GShard/DeepSpeed-MoE do it:
attention data parallel over the whole mesh, experts split over y, tokens moved by all-to-all.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
from jax.sharding import PartitionSpec as P

import meshweave as mw
from meshweave.manual_sharding import broadcast_specs

DP, TP = "x", "y"
REPLICATED = P()


def _attention(tp=TP):
    return {"wq": P(None, tp, None), "wk": P(None, tp, None), "wv": P(None, tp, None), "wo": P(tp, None, None),
            "ln1": REPLICATED, "ln2": REPLICATED}


def gpt_megatron(params) -> dict:
    blocks = [{**_attention(), "fc1": {"kernel": P(None, TP), "bias": P(TP)},
               "fc2": {"kernel": P(TP, None), "bias": REPLICATED}} for _ in params["blocks"]]
    return {"embed": P(TP, None), "pos": REPLICATED, "ln_f": REPLICATED, "head": P(None, TP), "blocks": blocks}


def bert_megatron(params) -> dict:
    layers = [{"qkv": {"kernel": P(None, None, TP, None), "bias": P(None, TP, None)},
               "out": {"kernel": P(TP, None, None), "bias": REPLICATED}, "ln_attn": REPLICATED,
               "fc1": {"kernel": P(None, TP), "bias": P(TP)}, "fc2": {"kernel": P(TP, None), "bias": REPLICATED},
               "ln_mlp": REPLICATED} for _ in params["layers"]]
    return {"embed": P(TP, None), "pos": REPLICATED, "ln_embed": REPLICATED,
            "head": {"kernel": P(None, TP), "bias": P(TP)}, "layers": layers}


def moe_megatron(params) -> dict:
    """Attention as GPT's; each expert's FFN split like Megatron's MLP (hidden dimension over tp)."""
    blocks = [{**_attention(), "gate": REPLICATED, "wi": P(None, None, TP), "wo_e": P(None, TP, None)}
              for _ in params["blocks"]]
    return {"embed": P(TP, None), "pos": REPLICATED, "ln_f": REPLICATED, "head": P(None, TP), "blocks": blocks}


def moe_expert_parallel(params) -> dict:
    """Experts over y, everything else replicated (the batch goes over both axes)."""
    blocks = [{"wq": REPLICATED, "wk": REPLICATED, "wv": REPLICATED, "wo": REPLICATED, "ln1": REPLICATED,
               "ln2": REPLICATED, "gate": REPLICATED, "wi": P(TP, None, None), "wo_e": P(TP, None, None)}
              for _ in params["blocks"]]
    return {"embed": REPLICATED, "pos": REPLICATED, "ln_f": REPLICATED, "head": REPLICATED, "blocks": blocks}


def mirror_on_optimizer_state(opt_state, params, param_specs):
    """Specs for an optax state: a leaf whose pytree path ends with a parameter's path and has its
    shape (momentum, Adam's moments) takes that parameter's spec; others (step counts) replicate."""
    by_path = {}
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], broadcast_specs(param_specs, params)):
        by_path[tuple(path)] = (leaf.shape, spec)
    out = []
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_state)
    for path, leaf in leaves:
        spec = REPLICATED
        for k in range(len(path)):
            hit = by_path.get(tuple(path[k:]))
            if hit is not None and hit[0] == leaf.shape:
                spec = hit[1]
                break
        out.append(spec)
    return jax.tree.unflatten(jax.tree.structure(opt_state), out)


@dataclass(frozen=True)
class HandPlan:
    name: str
    describe: str


HAND_PLANS = {
    "data_parallel": HandPlan("data_parallel", "DataParallel: batch over all devices, gradients all-reduced"),
    "zero2": HandPlan("zero2", "Zero2Parallel: batch over all devices, gradients reduce-scattered, optimizer "
                               "state sharded"),
    "zero3": HandPlan("zero3", "Zero3Parallel: as ZeRO-2 and parameters sharded (all-gathered where used)"),
    "megatron": HandPlan("megatron", "Megatron dp x tp: batch over x, attention/MLP column/row-parallel and "
                                     "vocab-parallel embedding/head over y (PartitionSpecs, ManualShardingOption)"),
    "expert_parallel": HandPlan("expert_parallel", "GShard dp x ep (MoE only): experts over y, batch over x and y"),
    "host_data_parallel": HandPlan("host_data_parallel", "data parallel inside each host (batch over y), the step "
                                                         "repeated on every host (replicated over x): no gradient "
                                                         "crosses hosts (2-D meshes only)"),
}


def manual_option(model: str, plan: str, state, batch, tp: int = 1) -> mw.ManualShardingOption:
    """The PartitionSpecs of a hand-written plan for (state, batch) of a zoo (or user model's) train
    step, tensor parallel over axis y of size tp."""
    from benchmarks.user_models import USER_MODELS, megatron_specs

    builders = {("gpt", "megatron"): gpt_megatron, ("bert", "megatron"): bert_megatron,
                ("moe", "megatron"): moe_megatron, ("moe", "expert_parallel"): moe_expert_parallel}
    if plan == "host_data_parallel":
        params_specs = jax.tree.map(lambda _: REPLICATED, state["params"])
    elif model in USER_MODELS and plan == "megatron":
        params_specs = megatron_specs(model, state["params"], tp)
    else:
        params_specs = builders[(model, plan)](state["params"])
    batch_axis = {"expert_parallel": (DP, TP), "host_data_parallel": TP}.get(plan, DP)
    state_specs = {"params": params_specs,
                   "opt_state": mirror_on_optimizer_state(state["opt_state"], state["params"], params_specs)}
    batch_specs = jax.tree.map(lambda _: P(batch_axis), batch)
    return mw.ManualShardingOption(in_axis_resources=(state_specs, batch_specs))


def method_for(plan: str, model: str, mesh_shape, state, batch, auto_sharding: mw.AutoShardingOption):
    """The meshweave method of a plan ("auto" or a HAND_PLANS key) on mesh (x, y)."""
    common = dict(mesh_shape=tuple(mesh_shape), axis_names=(DP, TP))
    if plan == "auto":
        return mw.ShardParallel(**common, auto_sharding=auto_sharding)
    if plan == "data_parallel":
        return mw.DataParallel(**common)
    if plan == "zero2":
        return mw.Zero2Parallel(**common, auto_sharding=auto_sharding)
    if plan == "zero3":
        return mw.Zero3Parallel(**common, auto_sharding=auto_sharding)
    return mw.ShardParallel(**common, auto_sharding=auto_sharding,
                            manual_sharding=manual_option(model, plan, state, batch, tp=int(mesh_shape[1])))


def plans_for(model: str, mesh_shape=(1, 8)) -> tuple[str, ...]:
    base = ("data_parallel", "zero2", "zero3", "megatron") + (("expert_parallel",) if model == "moe" else ())
    return base + (("host_data_parallel",) if mesh_shape[0] > 1 else ())   # on 1 x n it is data parallel

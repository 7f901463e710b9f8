"""Fast repeated planning (issue 13) keeps plans exact: the cost graph costs each op signature once
(identical layers share it), and the solver folds identical layers into one copy. Both must give
what a from-scratch build and an unfolded solve give. No timing here: see benchmarks/ilp_scaling.py."""
import functools
import importlib

import jax
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.models import gpt
from meshweave.passes import cost_graph
from meshweave.passes.cost_memo import CostMemo

solve_module = importlib.import_module("meshweave.passes.solver.solve")   # the module, not the function


def _plan_gpt(layers=4, mesh=(2, 4), **options):
    cfg = gpt.GPTConfig(vocab=256, seq_len=32, d_model=128, heads=4, layers=layers)
    opt = optax.adam(1e-3)
    state = jax.eval_shape(lambda: gpt.init_state(jax.random.PRNGKey(0), cfg, opt))
    batch = jax.eval_shape(lambda: gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 16))
    # mw.plan prices compute at the cluster's rate; at 1e12 FLOP/s this small GPT is worth splitting
    # (at the default rate it runs replicated, an easy problem), so both checks see a real plan.
    options = {"device_flops": 1e12, **options}
    method = mw.ShardParallel(auto_sharding=mw.AutoShardingOption(time_limit=60, **options))
    return mw.plan(gpt.make_train_step(opt), state, batch, method=method,
                   cluster=mw.ClusterSpec(num_hosts=mesh[0], devices_per_host=mesh[1]))


def _same_problem(a, b):
    assert a.node_names == b.node_names and a.strategy_names == b.strategy_names
    assert all(np.array_equal(x, y) for x, y in zip(a.node_costs, b.node_costs))
    assert all(np.array_equal(x, y) for x, y in zip(a.node_usages, b.node_usages))
    assert np.array_equal(a.intervals, b.intervals) and np.array_equal(a.edge_nodes, b.edge_nodes)
    assert len(a.edge_costs) == len(b.edge_costs)
    assert all(np.array_equal(x, y) for x, y in zip(a.edge_costs, b.edge_costs))


@pytest.mark.parametrize("options", [{}, {"prefer_reduce_scatter": True, "memory_budget_per_device": 2**30}],
                         ids=["default", "reduce-scatter+budget"])
def test_shared_signatures_give_the_fresh_build(monkeypatch, options):
    """A 4-layer GPT: the graph built with signatures shared across layers is the graph built op by
    op from scratch (same costs, edges, memory), and the plan is the same."""
    shared = _plan_gpt(**options)
    graph = shared.auto_sharding.graph
    assert graph.stats()["op_signatures"] < len(graph.ops) / 2      # the layers did share
    monkeypatch.setattr(cost_graph, "CostMemo", functools.partial(CostMemo, share=False))
    fresh = _plan_gpt(**options)
    assert fresh.auto_sharding.graph.stats()["op_signatures"] == 0
    _same_problem(shared.problem, fresh.problem)
    assert [g.node_plans for g in graph.groups] == [g.node_plans for g in fresh.auto_sharding.graph.groups]
    assert shared.auto_sharding.choice == fresh.auto_sharding.choice
    assert shared.objective == fresh.objective


def test_folded_layers_give_the_unfolded_optimum(monkeypatch):
    """An 8-layer GPT's problem: the solver folds the layers (one copy per class) and proves the same
    optimum the unfolded exact ILP finds."""
    problem = _plan_gpt(layers=8).problem
    folded = solve_module.solve(problem, 60, workers=1)
    fold = folded.stats["reduction"].get("fold")
    assert fold is not None and fold["folded_nodes"] > fold["nodes"]
    assert folded.status == "optimal"
    monkeypatch.setattr(solve_module, "fold_identical", lambda core: None)
    unfolded = solve_module.solve(problem, 120, workers=1, method="ilp")
    assert "fold" not in unfolded.stats["reduction"]
    assert unfolded.status == "optimal" and unfolded.cost == folded.cost

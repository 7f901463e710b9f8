"""ShardParallel / ZeRO: the ILP finds the known-good plans by itself, XLA emits what it priced,
and every plan computes what single-device jax.jit computes."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.models import gpt, mlp
from conftest import assert_trees_close


def devices(n):
    return tuple(jax.devices()[:n])


def mlp_case(hidden, batch, layers=6, opt=None):
    opt = opt or optax.adam(1e-3)
    sizes = [hidden] * (layers + 1)
    state = mlp.init_state(jax.random.PRNGKey(0), sizes, opt)
    b = mlp.synthetic_batch(jax.random.PRNGKey(1), batch, hidden, hidden)
    step = mlp.make_train_step(opt)
    return step, state, b


def run(step, state, batch, method, rtol=1e-4, atol=1e-5):
    f = mw.parallelize(step, method=method)
    out = f(state, batch)
    assert_trees_close(out, jax.jit(step)(state, batch), rtol=rtol, atol=atol)
    return f.last_executable


def kernel_specs(exe, layers):
    inputs = {p.path: p.spec for p in exe.plan.stages[0].inputs}
    return [inputs[f"state['params'][{i}]['kernel']"] for i in range(layers)]


def kinds(exe):
    return sorted({c.kind for c in exe.collectives()})


def test_mlp_megatron_on_1x4():
    step, state, batch = mlp_case(hidden=256, batch=32)
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(1, 4), devices=devices(4)))
    colls = exe.collectives()
    assert [c.kind for c in colls] == ["all-reduce"] * 5, [(c.kind, c.bytes) for c in colls]
    specs = kernel_specs(exe, 6)
    col, row = "P(None, 'y')", "P('y',)"
    assert specs in ([col, row] * 3, [row, col] * 3), specs
    assert all(r["status"] == "match" for r in exe.plan.stages[0].fidelity), exe.plan.stages[0].fidelity


def test_mlp_small_hidden_is_data_parallel():
    step, state, batch = mlp_case(hidden=32, batch=256)
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(1, 4), devices=devices(4)))
    inputs = {p.path: p.spec for p in exe.plan.stages[0].inputs}
    assert all(spec == "P()" for path, spec in inputs.items() if path.startswith("state['params']"))
    assert inputs["batch['x']"] == "P('y',)"
    assert kinds(exe) == ["all-reduce"]


def test_mlp_2x2_data_parallel_on_slow_axis_megatron_on_fast_axis():
    step, state, batch = mlp_case(hidden=256, batch=512, opt=optax.sgd(1e-2))
    method = mw.ShardParallel(mesh_shape=(2, 2), devices=devices(4),
                              auto_sharding=mw.AutoShardingOption(alpha=(1, 1), beta=(1, 0.1)))
    exe = run(step, state, batch, method)
    # The six forward dots take the batch split on x (the input itself may stay replicated: slicing
    # it is free, and the first layer's weight gradient then needs no all-to-all).
    import re

    strategies = re.findall(r'stablehlo\.dot_general .*?mw\.strategy = "([^"]+)"', exe.ir_after("auto-sharding"))
    assert len(strategies) >= 6 and all(s.startswith("[x,") for s in strategies[:6]), strategies
    # Layers 2-6 alternate column/row-parallel on y. The first kernel's own layout is free for the
    # ILP: it is resharded once per step either way (to [-,y] for the forward dot), and its
    # gradient and update land in [y,x] on both axes.
    specs = kernel_specs(exe, 6)
    col, row = "P(None, 'y')", "P('y',)"
    assert specs[1:] in ([row, col, row, col, row], [col, row, col, row, col]), specs


@pytest.fixture(scope="module")
def gpt_case():
    cfg = gpt.GPTConfig(vocab=128, seq_len=32, d_model=256, heads=4, layers=2)
    opt = optax.sgd(1e-2)
    state = gpt.init_state(jax.random.PRNGKey(0), cfg, opt)
    batch = gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 4)
    return cfg, gpt.make_train_step(opt), state, batch


@pytest.mark.parametrize("mesh_shape", [(1, 4), (4, 1), (2, 2)])
def test_gpt_matches_jit(gpt_case, mesh_shape):
    cfg, step, state, batch = gpt_case
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=mesh_shape, devices=devices(4)),
              rtol=2e-4, atol=2e-5)
    assert exe.plan.stages[0].mesh_shape == list(mesh_shape)


def test_gpt_tensor_parallel_has_megatron_all_reduces(gpt_case):
    cfg, step, state, batch = gpt_case
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(1, 4), devices=devices(4)), rtol=2e-4, atol=2e-5)
    act = 4 * cfg.seq_len * cfg.d_model * 4        # one activation (batch x seq x d_model, f32)
    big = [c for c in exe.collectives() if c.kind == "all-reduce" and c.bytes >= act]
    # Megatron: per layer 2 all-reduces forward (attention out, MLP out) and 2 backward (the
    # inputs of the column-parallel qkv and fc1 projections); a vocab-parallel LM head adds one
    # more (the gradient of its input).
    inputs = {p.path: p.spec for p in exe.plan.stages[0].inputs}
    head = 1 if inputs["state['params']['head']"] == "P(None, 'y')" else 0
    assert len(big) == 4 * cfg.layers + head, [(c.kind, c.bytes) for c in exe.collectives()]
    blk = "state['params']['blocks'][0]"
    assert inputs[f"{blk}['wq']"] == "P(None, 'y')" and inputs[f"{blk}['wo']"] == "P('y',)"
    assert inputs[f"{blk}['fc1']['kernel']"] == "P(None, 'y')" and inputs[f"{blk}['fc2']['kernel']"] == "P('y',)"


def _arg_bytes(exe):
    return exe.plan.stages[0].memory["argument_size_in_bytes"]


def test_zero2_and_zero3_shard_state_and_save_memory():
    step, state, batch = mlp_case(hidden=128, batch=256)
    dp = run(step, state, batch, mw.DataParallel(mesh_shape=(4,), devices=devices(4)))
    z2 = run(step, state, batch, mw.Zero2Parallel(mesh_shape=(4,), devices=devices(4)))
    z3 = run(step, state, batch, mw.Zero3Parallel(mesh_shape=(4,), devices=devices(4)))
    for exe in (z2, z3):
        assert {"reduce-scatter", "all-gather"} <= set(kinds(exe)), kinds(exe)
    ins2 = {p.path: p.spec for p in z2.plan.stages[0].inputs}
    ins3 = {p.path: p.spec for p in z3.plan.stages[0].inputs}
    mu = "state['opt_state'][0].mu[0]['kernel']"
    kernel = "state['params'][0]['kernel']"
    assert ins2[mu] != "P()" and ins2[kernel] == "P()"
    assert ins3[mu] != "P()" and ins3[kernel] != "P()"
    # Per-device argument memory: DP holds params + 2 Adam moments; ZeRO-2 shards the moments,
    # ZeRO-3 the parameters too.
    assert _arg_bytes(z2) < 0.6 * _arg_bytes(dp)
    assert _arg_bytes(z3) < 0.6 * _arg_bytes(z2)


def _entry_and_loop_all_reduces(hlo: str):
    import re

    entry = loop = 0
    for comp in re.split(r"\n(?=\S)", hlo):
        n = len(re.findall(r" all-reduce\(", comp))
        if comp.startswith("ENTRY"):
            entry += n
        else:
            loop += n
    return entry, loop


def test_gradient_accumulation_reduces_once_per_step():
    opt = optax.sgd(1e-2)
    state = mlp.init_state(jax.random.PRNGKey(0), [32] * 4, opt)
    batch = mlp.synthetic_batch(jax.random.PRNGKey(1), 256, 32, 32)
    ref = jax.jit(mlp.make_train_step(opt))(state, batch)
    step = mlp.make_train_step(opt, grad_fn=mw.value_and_grad)
    stats = {}
    for k in (1, 4):
        f = mw.parallelize(step, method=mw.ShardParallel(mesh_shape=(4,), devices=devices(4), num_micro_batches=k))
        assert_trees_close(f(state, batch), ref, rtol=1e-4, atol=1e-6)
        exe = f.last_executable
        stats[k] = (_entry_and_loop_all_reduces(exe.hlo_text()),
                    sum(c.bytes for c in exe.collectives() if c.kind == "all-reduce"))
    assert stats[4] == stats[1], stats          # same all-reduces and bytes, none inside a loop
    assert stats[4][0][1] == 0


def test_gradient_accumulation_needs_meshweave_grad():
    step, state, batch = mlp_case(hidden=32, batch=64, layers=2)
    f = mw.parallelize(step, method=mw.ShardParallel(mesh_shape=(4,), devices=devices(4), num_micro_batches=2))
    with pytest.raises(mw.ParallelizeError, match="meshweave.grad"):
        f(state, batch)


def test_uneven_dimensions_are_never_split():
    # 30 and 6 do not divide by 4: those dims stay whole, numerics still match.
    step, state, batch = mlp_case(hidden=30, batch=6, layers=2)
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(4,), devices=devices(4)))
    for p in exe.plan.stages[0].inputs:
        for dim, axes in zip(p.shape, p.sharding.split("[", 1)[1].split("}")):
            if '"' in axes:
                assert dim % 4 == 0, p


UNKNOWN_OP = """
module {
  func.func public @main(%w: tensor<16x8xf32>, %x: tensor<32x16xf32> {mw.batch_dim = 0 : i64}) -> tensor<32x8xf32> {
    %0 = stablehlo.dot_general %x, %w, contracting_dims = [1] x [0] : (tensor<32x16xf32>, tensor<16x8xf32>) -> tensor<32x8xf32>
    %1 = stablehlo.custom_call @my_fused_kernel(%0) : (tensor<32x8xf32>) -> tensor<32x8xf32>
    %2 = stablehlo.tanh %1 : tensor<32x8xf32>
    return %2 : tensor<32x8xf32>
  }
}
"""


def test_op_without_rule_runs_replicated_with_warning():
    from meshweave.dialects.context import parse_module
    from meshweave.dialects.sharding import MeshSpec
    from meshweave.passes import Pipeline, PipelineState

    module = parse_module(UNKNOWN_OP)
    state = PipelineState(mesh=MeshSpec.from_shape((4,)))
    with pytest.warns(UserWarning, match="no sharding rule for 'stablehlo.custom_call'"):
        Pipeline("install-mesh,auto-sharding").run(module, state)
    text = str(module)
    call = next(line for line in text.splitlines() if "my_fused_kernel" in line)
    assert "sdy.sharding_constraint" in text and '[{}, {}]' in call   # operand gathered, result replicated


def test_infeasible_memory_budget_names_the_smallest_budget():
    step, state, batch = mlp_case(hidden=64, batch=64, layers=2)
    method = mw.ShardParallel(mesh_shape=(4,), devices=devices(4),
                              auto_sharding=mw.AutoShardingOption(memory_budget_per_device=1000))
    with pytest.raises(mw.ParallelizeError, match=r"smallest budget the planner can meet is (\d+) bytes") as e:
        mw.parallelize(step, method=method)(state, batch)
    import re

    floor = int(re.search(r"can meet is (\d+) bytes", str(e.value)).group(1))
    ok = mw.ShardParallel(mesh_shape=(4,), devices=devices(4),
                          auto_sharding=mw.AutoShardingOption(memory_budget_per_device=floor))
    run(step, state, batch, ok)


def test_explain_reports_strategies_costs_and_fidelity():
    step, state, batch = mlp_case(hidden=64, batch=32, layers=2)
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(4,), devices=devices(4)))
    text = exe.explain()
    for needle in ("heavy ops", "dot_general", "predicted collectives", "plan fidelity", "ILP:", "objective"):
        assert needle in text, needle
    assert exe.plan.objective is not None and exe.plan.solver["nodes"] > 0


@pytest.mark.parametrize("mesh_shape", [(4,), (2, 2)])
def test_cnn_with_depthwise_convolution_matches_jit(mesh_shape):
    from meshweave.models import cnn

    opt = optax.sgd(0.1)
    state = cnn.init_state(jax.random.PRNGKey(0), opt)
    batch = cnn.synthetic_batch(jax.random.PRNGKey(1), 16)
    exe = run(cnn.make_train_step(opt), state, batch, mw.ShardParallel(mesh_shape=mesh_shape, devices=devices(4)))
    assert sum(r.heavy for r in exe.state.results["auto-sharding"].graph.ops) >= 8   # convs fwd + bwd, dots


def test_scan_over_layers_is_planned_inside_the_loop():
    layers, hidden = 4, 256

    def apply(params, x):
        def layer(h, w):
            return h + jnp.tanh(h @ w[0]) @ w[1], None

        return jax.lax.scan(layer, x, (params["w1"], params["w2"]))[0]

    def loss(params, batch):
        return jnp.mean((apply(params, batch["x"]) - batch["y"]) ** 2)

    opt = optax.sgd(0.1)

    def step(state, batch):
        value, grads = jax.value_and_grad(loss)(state["params"], batch)
        updates, opt_state = opt.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, value

    k = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k[0], (layers, hidden, hidden)) / 16,
              "w2": jax.random.normal(k[1], (layers, hidden, hidden)) / 16}
    state = {"params": params, "opt_state": opt.init(params)}
    batch = {"x": jax.random.normal(k[2], (32, hidden)), "y": jax.random.normal(k[3], (32, hidden))}
    exe = run(step, state, batch, mw.ShardParallel(mesh_shape=(4,), devices=devices(4)))
    graph = exe.state.results["auto-sharding"].graph
    assert [trip for _, trip in graph.loops] == [layers, layers]        # forward and backward scans
    assert sum(r.heavy for r in graph.ops) == 6                          # dots inside the loop bodies
    assert all(r["status"] == "match" for r in exe.plan.stages[0].fidelity), exe.plan.stages[0].fidelity


def test_solver_time_limit_returns_best_plan_with_warning():
    cfg = gpt.GPTConfig(vocab=1024, seq_len=128, d_model=512, heads=8, layers=6)
    opt = optax.adam(1e-4)
    state = jax.eval_shape(lambda: gpt.init_state(jax.random.PRNGKey(0), cfg, opt))
    batch = jax.eval_shape(lambda: gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 16))
    # the solver proves this plan optimal in about a second: a limit far below that stops it first
    method = mw.ShardParallel(auto_sharding=mw.AutoShardingOption(time_limit=0.02))
    with pytest.warns(UserWarning, match="solver stopped at its 0.02 s limit"):
        result = mw.plan(gpt.make_train_step(opt), state, batch, method=method,
                         cluster=mw.ClusterSpec(num_hosts=4, devices_per_host=8))
    assert result.auto_sharding.solver["status"] in ("feasible", "timeout")
    assert result.objective > 0 and result.auto_sharding.solver["solve_time"] < 3.0

"""PipeshardParallel: stages on sub-meshes, micro-batches, GPipe / 1F1B — numerics against jax.jit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import meshweave as mw
from meshweave.models import gpt, mlp
from conftest import assert_trees_close, abstract_gpt_4x512


def _run(step, state, batch, method, steps=3):
    par = mw.parallelize(step, method=method)
    ref = jax.jit(step)
    s1 = s2 = state
    for _ in range(steps):
        s1, l1 = par(s1, batch)
        s2, l2 = ref(s2, batch)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert_trees_close(s1, s2, rtol=1e-5, atol=1e-6)
    return par


def _mlp():
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 32, 32, 32, 8], opt)
    return mlp.make_train_step(opt, grad_fn=mw.value_and_grad), state, mlp.synthetic_batch(key, 32, 16, 8)


def _gpt():
    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=64, seq_len=16, d_model=32, heads=4, layers=4)
    key = jax.random.PRNGKey(1)
    state = gpt.init_state(key, cfg, opt)
    return gpt.make_train_step(opt, grad_fn=mw.value_and_grad), state, gpt.synthetic_batch(key, cfg, 16)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
@pytest.mark.parametrize("stages", [2, 4])
def test_mlp_pipeline_matches_jit(stages, schedule):
    step, state, batch = _mlp()
    par = _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=stages), pipeline_schedule=schedule))
    exe = par.last_executable
    assert len({f["mesh"] for f in exe.plan.pipeline["fragments"]}) == stages
    devices = [d for s in exe.plan.pipeline["stages"] for d in s["device_ids"]]
    assert sorted(devices) == list(range(8))          # the sub-meshes tile the devices


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_gpt_two_stages_manual_matches_jit(schedule):
    step, state, batch = _gpt()
    _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=4, pipeline_schedule=schedule,
        stage_option=mw.ManualStageOption(forward_stage_layer_ids=((0, 1), (2, 3)),
                                          submesh_physical_shapes=((1, 4), (1, 4)),
                                          submesh_logical_shapes=((2, 2), (4,)))))


def test_gpt_four_stages_matches_jit():
    step, state, batch = _gpt()
    _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=4,
                                                  stage_option=mw.UniformStageOption(num_stages=4)))


def test_explain_and_dump_show_stages(tmp_path):
    step, state, batch = _mlp()
    par = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=2,
                                                        stage_option=mw.UniformStageOption(num_stages=2)), steps=1)
    exe = par.last_executable
    text = exe.explain()
    assert "stage 0: layers 0..1 on mesh0" in text and "stage 1: layers 2..3 on mesh1" in text
    files = exe.dump(str(tmp_path))
    assert "plan.json" in files and "fragments" in files
    hlo = [f for f in files if f.startswith("stage_") and f.endswith(".hlo")]
    assert len(hlo) == len(exe.plan.pipeline["fragments"]) == 6      # forward, backward, apply per stage
    assert any(f.endswith("_stage-outlining.mlir") for f in files)


def test_micro_batches_need_meshweave_grad():
    opt = optax.sgd(0.1)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [8, 8, 8], opt)
    batch = mlp.synthetic_batch(key, 8, 8, 8)
    step = mlp.make_train_step(opt, grad_fn=jax.value_and_grad)
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=2,
                                                           stage_option=mw.UniformStageOption(num_stages=2)))
    with pytest.raises(ValueError, match="meshweave.grad"):
        par(state, batch)


def test_indivisible_batch_is_an_error():
    step, state, batch = _mlp()
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=3,
                                                           stage_option=mw.UniformStageOption(num_stages=2)))
    with pytest.raises(ValueError, match="not divisible by num_micro_batches=3"):
        par(state, batch)


def test_more_stages_than_layers_is_an_error():
    step, state, batch = _mlp()
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=2,
                                                           stage_option=mw.UniformStageOption(num_stages=8)))
    with pytest.raises(Exception, match="at most as many stages as layers"):
        par(state, batch)


def test_manual_stages_must_tile_the_devices():
    step, state, batch = _mlp()
    par = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=2, stage_option=mw.ManualStageOption(((0, 1), (2, 3)), ((1, 2), (1, 4)))))
    with pytest.raises(Exception, match="hold 6 devices but the cluster has 8"):
        par(state, batch)


def test_marker_inside_control_flow_is_an_error():
    opt = optax.sgd(0.1)

    def loss(params, batch):
        def body(x, _):
            return mw.mark_pipeline_boundary(jnp.tanh(x @ params["w"])), None
        x, _ = jax.lax.scan(body, batch["x"], None, length=2)
        return jnp.mean(x ** 2)

    def step(state, batch):
        l, g = mw.value_and_grad(loss)(state["params"], batch)
        u, o = opt.update(g, state["opt_state"])
        return {"params": optax.apply_updates(state["params"], u), "opt_state": o}, l

    params = {"w": jnp.eye(8)}
    state = {"params": params, "opt_state": opt.init(params)}
    batch = {"x": jnp.ones((8, 8))}
    par = mw.parallelize(step, method=mw.PipeshardParallel(num_micro_batches=2,
                                                           stage_option=mw.UniformStageOption(num_stages=1)))
    with pytest.raises(Exception, match="outside loops and conditionals"):
        par(state, batch)


def test_auto_stages_match_jit_and_report_the_dp():
    step, state, batch = _mlp()
    par = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=2), steps=2)
    text = par.last_executable.explain()
    assert "(auto); DP objective" in text


def test_each_crossing_value_is_sent_once_per_micro_batch(tmp_path):
    """Bytes sent between meshes per step = bytes of the values crossing meshes (once per destination
    mesh and micro-batch), counted independently from the outlined fragments."""
    step, state, batch = _mlp()
    k = 4
    par = _run(step, state, batch, mw.PipeshardParallel(num_micro_batches=k,
                                                        stage_option=mw.UniformStageOption(num_stages=2)), steps=1)
    exe = par.last_executable
    program = exe.program
    outlined = exe.state.results["stage-outlining"]
    frags = {f.name: f for f in outlined.fragments}
    desc = {d.name: d for d in program.fragments}
    expected, seen = 0, set()
    for f in outlined.fragments:
        for s in f.inputs:
            if s.fragment is None or frags[s.fragment].mesh == f.mesh:
                continue
            per_mb = frags[s.fragment].phase != "apply" and f.phase != "apply"
            key = (s.fragment, s.index, f.mesh, per_mb)
            if key in seen:
                continue
            seen.add(key)
            sig = desc[s.fragment].outputs[s.index]
            expected += int(np.prod(sig.shape)) * np.dtype(sig.dtype).itemsize * (k if per_mb else 1)
    sent = [ins for lst in program.instructions.values() for ins in lst if ins.op == "send"]
    received = [ins for lst in program.instructions.values() for ins in lst if ins.op == "recv"]
    assert len(sent) == len(received) > 0
    sent_bytes = sum(int(np.prod(i.sig.shape)) * np.dtype(i.sig.dtype).itemsize for i in sent)
    assert sent_bytes == expected
    # Destinations of both kinds occur: replicated and sharded layouts on the receiving mesh.
    assert {any(d for d in i.sig.sharding) for i in received} == {True, False}
    assert exe.plot_schedule(str(tmp_path / "schedule.png")).endswith("schedule.png")
    assert (tmp_path / "schedule.png").stat().st_size > 1000


def test_shard_parallel_step_runs_unchanged_with_one_micro_batch():
    """A step written with jax.value_and_grad (no meshweave markers) pipelines when num_micro_batches=1."""
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 32, 32, 32, 8], opt)
    batch = mlp.synthetic_batch(key, 16, 16, 8)
    step = mlp.make_train_step(opt)
    _run(step, state, batch, mw.PipeshardParallel(stage_option=mw.UniformStageOption(num_stages=2)), steps=2)


def test_replicated_destination_is_sent_once_then_gathered_inside_the_mesh():
    """A RECV into a layout with replicas lands the value split over the whole destination mesh
    first (every byte crosses once), then reshards inside the mesh."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from meshweave.runtime.local_pipeline import _send_once_layout

    mesh = Mesh(np.array(jax.devices()[4:8]).reshape(2, 2), ("x", "y"))
    assert _send_once_layout((8, 3), NamedSharding(mesh, P()), mesh).spec == P(("x", "y"), None)
    assert _send_once_layout((6, 4), NamedSharding(mesh, P("x")), mesh).spec == P(None, ("x", "y"))
    assert _send_once_layout((8, 4), NamedSharding(mesh, P("x", "y")), mesh) is None   # nothing replicated
    assert _send_once_layout((3, 5), NamedSharding(mesh, P()), mesh) is None            # no dimension divides


def test_stage_memory_comes_from_the_planned_layouts_and_a_budget_moves_the_cut():
    """Plan-only (mw.plan): each candidate's memory is what the intra-op plan leaves per device
    (parameters in their chosen layouts, scaled by the optimizer state apply-grad holds, plus the
    activations in flight); a per-device budget below the unconstrained plan's need reshapes it."""
    step, state, batch = abstract_gpt_4x512()

    def plan(budget):
        method = mw.PipeshardParallel(num_micro_batches=4, default_auto_sharding_option=mw.AutoShardingOption(
            memory_budget_per_device=budget))
        return mw.plan(step, state, batch, method=method, cluster=mw.ClusterSpec.preset("h100", 8)).stages.stages

    free = plan(None)
    need = max(s.memory for s in free)
    budget = int(0.75 * need)
    tight = plan(budget)
    assert all(s.memory <= budget for s in tight)
    assert [(s.layers, s.mesh.shape) for s in tight] != [(s.layers, s.mesh.shape) for s in free]


def test_a_user_model_with_auto_layers_keywords_placed_inputs_and_its_own_outputs():
    """Not a zoo model and no hand-placed boundaries: AutoLayerOption cuts it; the step is called
    like a jitted one (batch by keyword, a batch already placed on devices, outputs fed back)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    opt = optax.sgd(0.05, momentum=0.9)
    key = jax.random.PRNGKey(3)
    ks = jax.random.split(key, 4)
    params = {"w": [jax.random.normal(k, (16, 16)) / 4 for k in ks[:3]], "out": jax.random.normal(ks[3], (16, 4))}

    def loss(p, batch):
        h = batch["x"]
        for w in p["w"]:
            h = jnp.tanh(h @ w)
        return jnp.mean((h @ p["out"] - batch["y"]) ** 2)

    def step(state, batch):
        l, g = mw.value_and_grad(loss)(state["params"], batch)
        u, o = opt.update(g, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], u), "opt": o}, l

    state = {"params": params, "opt": opt.init(params)}
    x = jax.random.normal(key, (32, 16))
    batch = {"x": x, "y": jnp.sin(x[:, :4])}
    mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
    placed = jax.device_put(batch, NamedSharding(mesh, P("d")))
    par = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=2, layer_option=mw.AutoLayerOption(2), stage_option=mw.UniformStageOption(num_stages=2)))
    ref = jax.jit(step)
    s1 = s2 = state
    for b in (batch, placed, batch):
        s1, l1 = par(s1, batch=b)
        s2, l2 = ref(s2, b)
        np.testing.assert_allclose(float(l1), float(l2), rtol=1e-5)
    assert_trees_close(s1, s2, rtol=1e-5, atol=1e-6)
    assert par.last_executable.state.results["layer-clustering"].num_layers == 2


def test_donation_under_pipelines_is_announced_not_silently_dropped():
    step, state, batch = _mlp()
    par = mw.parallelize(step, donate_argnums=(0,), method=mw.PipeshardParallel(
        num_micro_batches=2, stage_option=mw.UniformStageOption(num_stages=2)))
    with pytest.warns(UserWarning, match="does not donate buffers yet"):
        _, loss = par(state, batch)
    np.testing.assert_allclose(float(loss), float(jax.jit(step)(state, batch)[1]), rtol=1e-5)


def test_pipeshard_refuses_a_mesh_shape_it_would_ignore():
    with pytest.raises(ValueError, match="chooses each stage's sub-mesh itself"):
        mw.PipeshardParallel(mesh_shape=(2, 4))
    with pytest.raises(ValueError, match="num_hosts must be a positive int"):
        mw.PipeshardParallel(num_hosts=0)


def _wide_batch_mlp():
    """Many examples, narrow layers: the data-parallel plan sums every weight gradient over the batch."""
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 16, 16, 16, 8], opt)
    return mlp.make_train_step(opt, grad_fn=mw.value_and_grad), state, mlp.synthetic_batch(key, 1024, 16, 8)


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_weight_gradients_are_reduced_once_per_step_in_apply_grad(schedule):
    """Backward fragments leave their weight gradients partial over the data-parallel axis (no
    all-reduce per micro-batch); the accumulator adds them locally; apply-grad reduces once."""
    step, state, batch = _wide_batch_mlp()
    par = _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2), pipeline_schedule=schedule,
        default_auto_sharding_option=mw.AutoShardingOption(force_batch_dim_to_mesh_dim=0)), steps=2)
    exe = par.last_executable
    kinds = {f.name: f.kind for f in exe.program.fragments}
    for frag, sp in zip(exe.program.fragments, exe.plan.stages):
        if frag.kind == "backward":
            assert "all-reduce" not in sp.collectives, (frag.name, sp.collectives)
            partial = [o for o in frag.outputs if o.unreduced]
            assert len(partial) == 4 and all(o.unreduced == ("x",) for o in partial)   # 2 kernels + 2 biases
            assert sum("unreduced" in p.sharding for p in sp.outputs) == 4
        elif frag.kind == "apply":
            assert sp.collectives.get("all-reduce", {}).get("count", 0) >= 1, (frag.name, sp.collectives)
    assert sorted(kinds.values()).count("backward") == 2


def test_per_micro_batch_reduction_is_kept_where_the_gradient_leaves_its_mesh():
    """Only values read by apply-grad on the producer's mesh stay partial (pure dataflow check)."""
    from meshweave.passes.stage_outlining import Fragment, OutliningResult, Source
    from meshweave.passes.partial_gradients import partial_candidates

    bwd0 = Fragment("s0_backward", 0, "backward", "mesh0", num_outputs=3)
    bwd1 = Fragment("s1_backward", 1, "backward", "mesh1", num_outputs=2)
    apply0 = Fragment("s0_apply", 0, "apply", "mesh0", inputs=[
        Source(fragment="s0_backward", index=0, accumulated=True),
        Source(fragment="s1_backward", index=1, accumulated=True)])       # crosses meshes: reduced first
    fwd1 = Fragment("s1_forward", 1, "forward", "mesh1", inputs=[Source(fragment="s0_backward", index=2)])
    apply1 = Fragment("s1_apply", 1, "apply", "mesh1", inputs=[
        Source(fragment="s1_backward", index=0, accumulated=True), Source(fragment="s0_backward", index=2)])
    outlined = OutliningResult([bwd0, bwd1, apply0, apply1, fwd1], [Source(fragment="s0_backward", index=1)])
    assert partial_candidates(outlined) == {"s0_backward": [0], "s1_backward": [0]}


def test_each_pipeline_fragment_compiles_to_the_collectives_its_ilp_priced():
    """Issue 14: a GPT pipeline of 2 stages on 2x2 sub-meshes; per fragment (forward, backward,
    apply-grad), compiled collectives equal the fragment ILP's prediction. Root causes fixed:
    apply-grad planned its partial-gradient inputs in a layout other than the one they arrive in
    (unpriced all-to-alls and permutes), the prediction did not move the gradient all-reduces that
    partial-gradients defers from backward to apply-grad, and the loss (a sum over dims split on x
    and on y) is all-reduced once per axis by XLA, not once over both."""
    step, state, batch = _gpt()
    par = _run(step, state, batch, mw.PipeshardParallel(
        num_micro_batches=2, stage_option=mw.ManualStageOption(
            forward_stage_layer_ids=((0, 1), (2, 3)), submesh_physical_shapes=((1, 4), (1, 4)),
            submesh_logical_shapes=((2, 2), (2, 2)))), steps=1)
    exe = par.last_executable
    phases = set()
    for frag, sp in zip(exe.plan.pipeline["fragments"], exe.plan.stages):
        assert sp.fidelity, frag["name"]
        assert {r["status"] for r in sp.fidelity} <= {"match", "combined"}, (frag["name"], sp.fidelity)
        assert "all-gather" not in sp.collectives, (frag["name"], sp.collectives)
        phases.add(frag["kind"])
    assert phases == {"forward", "backward", "apply"}


def test_cpu_runtime_finishes_each_fragment_before_the_next(monkeypatch):
    """XLA's CPU client runs the collectives of executables in flight on one thread pool: fragments
    dispatched back to back could leave simulated devices in two different all-reduces until XLA's
    40 s rendezvous timeout aborts (about half the runs of a two-stage embedding model). No
    numerics test catches that deterministically; this checks the wait that prevents it: on CPU
    every fragment's outputs are ready before the runtime issues its next instruction."""
    from meshweave.runtime import local_pipeline

    step, state, batch = _mlp()
    par = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2)))
    par(state, batch)                                      # compile outside the count
    program = par.last_executable.program
    runs = sum(1 for lst in program.instructions.values() for i in lst if i.op == "run")
    real, waited = jax.block_until_ready, []
    monkeypatch.setattr(local_pipeline.jax, "block_until_ready", lambda x: (waited.append(len(x)), real(x))[1])
    par(state, batch)
    assert runs > 2 and len(waited) >= runs

"""Steps compiled by meshweave, run on the Ray backend: 3 steps equal jax.jit, with the state
staying on the workers between steps (handles fed back) — through `mw.init(cluster="ray")`
and through `RayProgramExecutor` directly."""
import jax
import numpy as np
import optax
import pytest

import meshweave as mw
from conftest import assert_trees_close
from meshweave.models import gpt, mlp

pytest.importorskip("ray")
from meshweave.runtime import ray as mw_ray  # noqa: E402


@pytest.fixture(scope="module")
def mlp_case():
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 32, 32, 32, 8], opt)
    step = mlp.make_train_step(opt, grad_fn=mw.value_and_grad)
    batch = mlp.synthetic_batch(key, 32, 16, 8)
    exe = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2), pipeline_schedule="1f1b",
    )).get_executable(state, batch)
    return step, state, batch, exe


def _run_on_ray(step, state, batch, exe, steps=3):
    program = exe.program
    ex = mw_ray.RayProgramExecutor(program)
    ref = jax.jit(step)
    s_ray, s_ref = state, state
    for _ in range(steps):
        outs = ex.run_flat(jax.tree.leaves(([s_ray, batch], {})))
        assert all(isinstance(o, mw_ray.RemoteArray) for o in outs)
        s_ray, loss = jax.tree.unflatten(exe.traced.lowered.out_tree, outs)
        s_ref, loss_ref = ref(s_ref, batch)
        np.testing.assert_allclose(float(np.asarray(loss)), float(loss_ref), rtol=1e-5)
    assert_trees_close(jax.device_get(s_ray), s_ref, rtol=1e-5, atol=1e-6)
    ex.close()
    return program


def test_mlp_pipeshard_on_ray_matches_jit(ray_runtime, mlp_case):
    program = _run_on_ray(*mlp_case)
    assert len(program.meshes) == 2 and program.num_micro_batches == 4


def test_backend_runs_a_step_as_a_pytree(ray_runtime, mlp_case):
    """`Backend` is what meshweave.init(cluster="ray") loads: StepArtifacts in, a step executor out."""
    from types import SimpleNamespace

    step, state, batch, exe = mlp_case
    backend = mw_ray.Backend(num_hosts=2, devices_per_host=4)        # joins the session's runtime
    run = backend.executor(SimpleNamespace(program=exe.program, out_tree=exe.traced.lowered.out_tree))
    new_state, loss = run.run(run.place(jax.tree.leaves(([state, batch], {}))))
    ref_state, ref_loss = jax.jit(step)(state, batch)
    np.testing.assert_allclose(float(np.asarray(loss)), float(ref_loss), rtol=1e-5)
    assert_trees_close(jax.device_get(new_state), ref_state, rtol=1e-5, atol=1e-6)
    assert "HloModule" in run.stage_text(0)
    run.close()


def test_mw_init_ray_runs_shard_and_pipeshard_steps(ray_runtime, mlp_case):
    step, state, batch, _ = mlp_case
    mw.init("ray", num_hosts=2, devices_per_host=4)          # joins the session's runtime
    try:
        ref = jax.jit(step)
        for method in (mw.ShardParallel(mesh_shape=(2, 4)),   # one mesh over both hosts' workers
                       mw.PipeshardParallel(num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2))):
            f = mw.parallelize(step, method=method)
            s_ray, s_ref = state, state
            for _ in range(3):
                s_ray, loss = f(s_ray, batch)
                s_ref, loss_ref = ref(s_ref, batch)
                assert isinstance(loss, mw_ray.RemoteArray)
                np.testing.assert_allclose(float(np.asarray(loss)), float(loss_ref), rtol=1e-5)
            assert_trees_close(jax.device_get(s_ray), s_ref, rtol=1e-5, atol=1e-6)
            assert "HloModule" in f.last_executable.hlo_text(0)
    finally:
        mw.init("local")                 # the Ray backend joined the runtime, so this leaves it up
    assert mw_ray.current() is not None


def test_gpt_pipeshard_on_ray_matches_jit(ray_runtime):
    opt = optax.adam(1e-3)
    cfg = gpt.GPTConfig(vocab=64, seq_len=16, d_model=32, heads=4, layers=4)
    key = jax.random.PRNGKey(1)
    state = gpt.init_state(key, cfg, opt)
    step, batch = gpt.make_train_step(opt, grad_fn=mw.value_and_grad), gpt.synthetic_batch(key, cfg, 16)
    exe = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=4, pipeline_schedule="1f1b",
        stage_option=mw.ManualStageOption(forward_stage_layer_ids=((0, 1), (2, 3)),
                                          submesh_physical_shapes=((1, 4), (1, 4)),
                                          submesh_logical_shapes=((2, 2), (4,))))).get_executable(state, batch)
    _run_on_ray(step, state, batch, exe)


def test_partial_gradients_accumulate_on_ray_workers(ray_runtime):
    """Backward fragments leave weight gradients partial (unreduced); the workers accumulate
    them as such and apply-grad reduces once per step: numerics as jax.jit."""
    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 16, 16, 16, 8], opt)
    step = mlp.make_train_step(opt, grad_fn=mw.value_and_grad)
    batch = mlp.synthetic_batch(key, 1024, 16, 8)
    exe = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2),
        default_auto_sharding_option=mw.AutoShardingOption(force_batch_dim_to_mesh_dim=0),
    )).get_executable(state, batch)
    program = exe.program
    assert any(o.unreduced for f in program.fragments if f.kind == "backward" for o in f.outputs)
    _run_on_ray(step, state, batch, exe, steps=2)


def test_rematerialized_pipeline_on_ray_matches_jit(ray_runtime, mlp_case):
    """The same MLP with every stage rematerialized: the backward fragments recompute the forward
    on the workers, and the forward fragments send the backward nothing but boundaries."""
    step, state, batch, _ = mlp_case
    exe = mw.parallelize(step, method=mw.PipeshardParallel(
        num_micro_batches=4, stage_option=mw.UniformStageOption(num_stages=2), remat=True)).get_executable(state, batch)
    assert exe.state.results["rematerialize"].layers
    _run_on_ray(step, state, batch, exe)

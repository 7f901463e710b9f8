"""The compile spine: parallelize -> trace -> passes -> XLA -> run, on 8 simulated CPU devices."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding

import meshweave as mw
from meshweave.models import mlp
from conftest import assert_trees_close

SIZES = [16, 64, 64, 8]


@pytest.fixture(scope="module")
def mlp_case():
    opt = optax.adam(1e-2)
    state = mlp.init_state(jax.random.PRNGKey(0), SIZES, opt)
    batch = mlp.synthetic_batch(jax.random.PRNGKey(1), 32, SIZES[0], SIZES[-1])
    step = mlp.make_train_step(opt, grad_fn=mw.value_and_grad)
    return step, state, batch, jax.jit(step)(state, batch)


@pytest.mark.parametrize("mesh_shape", [(8,), (1, 8), (2, 4)])
def test_data_parallel_matches_jit(mlp_case, mesh_shape):
    step, state, batch, ref = mlp_case
    f = mw.parallelize(step, method=mw.DataParallel(mesh_shape=mesh_shape))
    out = f(state, batch)
    assert_trees_close(out, ref, rtol=2e-5, atol=2e-6)
    for leaf in jax.tree.leaves(out):
        assert isinstance(leaf, jax.Array) and isinstance(leaf.sharding, NamedSharding)
    exe = f.last_executable
    placements = {p.path: p for p in exe.plan.stages[0].inputs}
    assert placements["batch['x']"].spec != "P()"
    assert all(p.spec == "P()" for k, p in placements.items() if k.startswith("state"))
    kinds = {c.kind for c in exe.collectives()}
    assert kinds == {"all-reduce"}, f"expected only the gradient all-reduce, got {kinds}"


def test_cache_per_signature(mlp_case):
    step, state, batch, _ = mlp_case
    f = mw.parallelize(step, method=mw.DataParallel())
    e1 = f.get_executable(state, batch)
    f(state, batch)
    assert f.get_executable(state, batch) is e1
    small = jax.tree.map(lambda a: a[:16], batch)
    assert f.get_executable(state, small) is not e1


def test_dump_directory(mlp_case, tmp_path):
    step, state, batch, _ = mlp_case
    f = mw.parallelize(step, method=mw.DataParallel(mesh_shape=(2, 4)))
    exe = f.get_executable(state, batch)
    files = exe.dump(str(tmp_path))
    assert "00_input.mlir" in files and "plan.json" in files and "stage_0.hlo" in files
    passes = [name for name in files if name.endswith(".mlir")]
    assert [p.split("_", 1)[1][:-5] for p in sorted(passes)][1:] == [r.name for r in exe.pass_records[1:]]
    hlo = (tmp_path / "stage_0.hlo").read_text()
    assert " all-reduce(" in hlo, "the gradient all-reduce must be in the partitioned HLO"
    plan = json.loads((tmp_path / "plan.json").read_text())
    st = plan["stages"][0]
    assert st["mesh_shape"] == [2, 4] and st["device_ids"] == list(range(8))
    assert any(i["path"] == "batch['x']" and '"x", "y"' in i["sharding"] for i in st["inputs"])
    assert st["collectives"]["all-reduce"]["count"] >= 1
    dp = (tmp_path / [p for p in passes if "data-parallel" in p][0]).read_text()
    assert 'sdy.sharding = #sdy.sharding<@mesh, [{"x", "y"}, {}]>' in dp


def test_dump_dir_environment(mlp_case, tmp_path, monkeypatch):
    step, state, batch, _ = mlp_case
    monkeypatch.setenv("MESHWEAVE_DUMP_DIR", str(tmp_path))
    mw.parallelize(step, method=mw.DataParallel()).get_executable(state, batch)
    assert (tmp_path / "stage_0.hlo").exists() and (tmp_path / "plan.json").exists()


def test_grad_marker_is_stripped(mlp_case):
    step, state, batch, _ = mlp_case
    exe = mw.parallelize(step, method=mw.DataParallel()).get_executable(state, batch)
    assert "mw.marker = \"grad\"" in exe.ir_after("input")
    assert exe.state.results["strip-markers"].removed >= 1
    assert "mw.marker" not in exe.ir_after("data-parallel")


def test_static_and_donate_argnums():
    def step(params, x, mode):
        y = x @ params["w"]
        return {"w": params["w"] - 0.1 * (y.sum() if mode == "sum" else y.mean())}, y

    params = {"w": jnp.ones((4, 4))}
    x = jnp.arange(32.0).reshape(8, 4)
    ref = jax.jit(step, static_argnums=2)(params, x, "sum")
    f = mw.parallelize(step, method=mw.DataParallel(), static_argnums=(2,), donate_argnums=(0,))
    out = f({"w": jnp.ones((4, 4))}, x, "sum")
    assert_trees_close(out, ref)
    out2 = f({"w": jnp.ones((4, 4))}, x, "mean")
    assert not np.allclose(out2[0]["w"], out[0]["w"])


def test_explain_mentions_passes_and_collectives(mlp_case):
    step, state, batch, _ = mlp_case
    text = mw.parallelize(step, method=mw.DataParallel()).get_executable(state, batch).explain()
    assert "data-parallel" in text and "all-reduce" in text


# ------------------------------------------------------------------ bad input
def test_untraceable_argument_names_it():
    f = mw.parallelize(lambda p, b: p * 2, method=mw.DataParallel())
    with pytest.raises(mw.ArgumentError, match=r"argument b\['name'\] has type str.*static_argnums=\(1,\)"):
        f(jnp.ones(8), {"name": "hello"})


def test_static_argnums_out_of_range():
    f = mw.parallelize(lambda a, b: a, method=mw.DataParallel(), static_argnums=(3,))
    with pytest.raises(mw.ArgumentError, match=r"static_argnums=\(3,\).*2 positional"):
        f(jnp.ones(8), jnp.ones(8))


def test_unhashable_static_argument():
    f = mw.parallelize(lambda a, b: a, method=mw.DataParallel(), static_argnums=(1,))
    with pytest.raises(mw.ArgumentError, match="unhashable type list"):
        f(jnp.ones(8), [1, 2])


def test_mesh_shape_must_match_devices():
    with pytest.raises(mw.MethodError, match="needs 12 devices but only 8"):
        mw.parallelize(lambda a, b: a, method=mw.DataParallel(mesh_shape=(3, 4)))(jnp.ones(8), jnp.ones(8))
    with pytest.raises(mw.MethodError, match="devices= holds 4"):
        mw.DataParallel(mesh_shape=(2, 4), devices=tuple(jax.devices()[:4])).resolve_mesh()


def test_batch_not_divisible(mlp_case):
    step, state, batch, _ = mlp_case
    odd = jax.tree.map(lambda a: a[:12], batch)
    f = mw.parallelize(step, method=mw.DataParallel())
    with pytest.raises(mw.ParallelizeError, match=r"batch\['x'\]: batch size 12 is not divisible by .* 8"):
        f(state, odd)


def test_smaller_mesh_uses_first_devices(mlp_case):
    step, state, batch, ref = mlp_case
    f = mw.parallelize(step, method=mw.DataParallel(mesh_shape=(4,)))
    assert_trees_close(f(state, batch), ref, rtol=2e-5, atol=2e-6)
    assert f.last_executable.plan.stages[0].device_ids == [0, 1, 2, 3]


def test_init_local_and_unknown_cluster():
    mw.init()
    mw.init(cluster="local")           # cluster="ray": tests/test_ray_pipeshard.py
    with pytest.raises(ValueError, match="expected one of 'local', 'ray'"):
        mw.init(cluster="slurm")
    mw.shutdown()

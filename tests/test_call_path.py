"""A parallelized step is called like a jax.jit step: placed inputs, keyword arguments, donation,
gradient accumulation with aux outputs and randomness, no silent fallbacks (issue 9).
Every numeric check is against single-device jax.jit on the same inputs."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import meshweave as mw
from conftest import assert_trees_close

TOL = dict(rtol=2e-5, atol=2e-6)


def _params(key, sizes=(8, 32, 4)):
    ks = jax.random.split(key, len(sizes) - 1)
    return {f"w{i}": jax.random.normal(k, (a, b)) / np.sqrt(a) for i, (k, a, b) in enumerate(zip(ks, sizes, sizes[1:]))}


def _forward(params, x):
    h = jnp.tanh(x @ params["w0"])
    return h @ params["w1"]


def _loss(params, batch):
    return jnp.mean((_forward(params, batch["x"]) - batch["y"]) ** 2)


def _batch(key, n):
    kx, ky = jax.random.split(key)
    return {"x": jax.random.normal(kx, (n, 8)), "y": jax.random.normal(ky, (n, 4))}


OPT = optax.sgd(0.1)


def sgd_step(state, batch):
    loss, g = mw.value_and_grad(_loss)(state["params"], batch)
    updates, opt_state = OPT.update(g, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss


def _state():
    p = _params(jax.random.PRNGKey(0))
    return {"params": p, "opt_state": OPT.init(p)}


# ------------------------------------------------------------------ Flax TrainState
@pytest.mark.parametrize("method", [mw.ShardParallel(mesh_shape=(2, 4)), mw.Zero3Parallel()],
                         ids=["shard-2x4", "zero3"])
def test_flax_train_state_three_steps(method):
    import flax.linen as nn
    from flax.training import train_state

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.tanh(nn.Dense(32)(x)))

    model = MLP()
    params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))

    def step(state, batch):
        def loss(p):
            return jnp.mean((state.apply_fn(p, batch["x"]) - batch["y"]) ** 2)

        value, grads = jax.value_and_grad(loss)(state.params)
        return state.apply_gradients(grads=grads), value

    f, ref = mw.parallelize(step, method=method), jax.jit(step)
    s_par = s_ref = state   # step 0 has a Python-int `step`; later steps an int32 array: a second signature
    for i in range(3):
        batch = _batch(jax.random.PRNGKey(10 + i), 32)
        s_par, l_par = f(s_par, batch)
        s_ref, l_ref = ref(s_ref, batch)
        assert_trees_close((s_par.params, s_par.opt_state, l_par), (s_ref.params, s_ref.opt_state, l_ref), **TOL)
        assert int(s_par.step) == int(s_ref.step) == i + 1
    assert len(f._cache) == 2


# ------------------------------------------------------------------ placement
def test_eval_step_on_the_train_steps_outputs():
    train = mw.parallelize(sgd_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    evaluate = mw.parallelize(lambda state, batch: _loss(state["params"], batch), method=mw.ShardParallel())
    batch = _batch(jax.random.PRNGKey(1), 32)
    new_state, _ = train(_state(), batch)
    ref_state, _ = jax.jit(sgd_step)(_state(), batch)
    np.testing.assert_allclose(evaluate(new_state, batch), jax.jit(lambda s, b: _loss(s["params"], b))(ref_state, batch),
                               **TOL)


def test_partial_last_batch():
    f = mw.parallelize(sgd_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    state = _state()
    for n in (32, 20):      # 20 = a partial last batch: a new signature, planned for its own shape
        batch = _batch(jax.random.PRNGKey(n), n)
        assert_trees_close(f(state, batch), jax.jit(sgd_step)(state, batch), **TOL)


def test_batch_placed_by_a_data_loader():
    mesh = Mesh(np.array(jax.devices()), ("x",))
    batch = jax.device_put(_batch(jax.random.PRNGKey(2), 32), NamedSharding(mesh, P("x")))
    f = mw.parallelize(sgd_step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    assert_trees_close(f(_state(), batch), jax.jit(sgd_step)(_state(), batch), **TOL)


def test_state_moved_between_two_meshes():
    first = mw.parallelize(sgd_step, method=mw.ShardParallel(mesh_shape=(4,), devices=tuple(jax.devices()[:4])))
    second = mw.parallelize(sgd_step, method=mw.ShardParallel(mesh_shape=(2, 2), devices=tuple(jax.devices()[4:])))
    ref = jax.jit(sgd_step)
    batch = _batch(jax.random.PRNGKey(3), 32)
    s1, _ = first(_state(), batch)
    r1, _ = ref(_state(), batch)
    s2, l2 = second(s1, batch)          # state lives on devices 0-3; the second step runs on 4-7
    r2, lr2 = ref(r1, batch)
    assert_trees_close((s2, l2), (r2, lr2), **TOL)
    assert {d.id for d in jax.tree.leaves(s2)[0].sharding.device_set} <= {4, 5, 6, 7}


# ------------------------------------------------------------------ keyword arguments
def test_keyword_arguments():
    def step(state, batch, scale=1.0):
        new, loss = sgd_step(state, batch)
        return new, loss * scale

    f = mw.parallelize(step, method=mw.ShardParallel(mesh_shape=(2, 4)))
    batch = _batch(jax.random.PRNGKey(4), 32)
    ref = jax.jit(step)(_state(), batch, scale=2.0)
    assert_trees_close(f(_state(), batch=batch, scale=2.0), ref, **TOL)
    assert_trees_close(f(state=_state(), batch=batch, scale=2.0), ref, **TOL)
    # the batch passed by keyword keeps its role (mw.batch_dim on its leaves)
    traced = f.last_executable.traced
    roles = dict(zip(traced.arg_paths, traced.batch_dims))
    assert roles["batch['x']"] == 0 and roles["batch['y']"] == 0 and roles["scale"] is None, roles


def test_batch_argnames():
    def step(batch, state):
        return sgd_step(state, batch)

    f = mw.parallelize(step, method=mw.Zero2Parallel(), batch_argnums=(), batch_argnames=("batch",))
    batch = _batch(jax.random.PRNGKey(5), 32)
    assert_trees_close(f(batch, _state()), jax.jit(step)(batch, _state()), **TOL)
    with pytest.raises(mw.ArgumentError, match="batch_argnames names \\['data'\\]"):
        mw.parallelize(step, batch_argnames=("data",))


# ------------------------------------------------------------------ donation
def test_donating_an_argument_passed_twice_is_a_clean_error():
    f = mw.parallelize(lambda a, b: a * 2 + b, method=mw.ShardParallel(), donate_argnums=(0,))
    x = jnp.arange(32.0)
    with pytest.raises(mw.ArgumentError, match=r"a is donated .* also passed as b"):
        f(x, x)
    assert float(x.sum()) == 496.0            # the array is untouched and still usable
    np.testing.assert_allclose(f(jnp.ones(32), x), 2 + np.arange(32.0))


# ------------------------------------------------------------------ gradient accumulation
def _aux_loss(params, batch):
    pred = _forward(params, batch["x"])
    correct = jnp.sum(jnp.argmax(pred, -1) == jnp.argmax(batch["y"], -1)).astype(jnp.int32)
    return jnp.mean((pred - batch["y"]) ** 2), (pred, correct)


def test_accumulation_aux_concat_and_sum():
    params = _params(jax.random.PRNGKey(6))
    batch = _batch(jax.random.PRNGKey(7), 32)

    def step(params, batch):
        (loss, (pred, correct)), g = mw.value_and_grad(_aux_loss, has_aux=True,
                                                       aux_reduction=("concat", "sum"))(params, batch)
        return loss, g, pred, correct

    ref = jax.jit(step)(params, batch)
    out = mw.parallelize(step, method=mw.ShardParallel(mesh_shape=(4,), num_micro_batches=2,
                                                       devices=tuple(jax.devices()[:4])))(params, batch)
    loss, g, pred, correct = out
    assert pred.shape == (32, 4) and pred.dtype == ref[2].dtype
    assert correct.dtype == jnp.int32 and int(correct) == int(ref[3])
    assert_trees_close((loss, g, pred), ref[:3], **TOL)


def test_accumulation_scalar_aux_needs_a_declared_reduction():
    def step(params, batch):
        (loss, (_, correct)), g = mw.value_and_grad(_aux_loss, has_aux=True)(params, batch)
        return loss, correct

    f = mw.parallelize(step, method=mw.ShardParallel(num_micro_batches=2))
    with pytest.raises(mw.ParallelizeError, match="aux_reduction='sum' or 'mean'"):
        f(_params(jax.random.PRNGKey(6)), _batch(jax.random.PRNGKey(7), 32))


def _dropout_loss(params, batch, key):
    h = jnp.tanh(batch["x"] @ params["w0"])
    keep = jax.random.bernoulli(key, 0.5, h.shape)
    return jnp.mean(((jnp.where(keep, h / 0.5, 0.0) @ params["w1"]) - batch["y"]) ** 2)


def test_dropout_under_accumulation_draws_per_slice():
    """Documented semantics: each micro-batch m and replica r uses fold_in(fold_in(key, m), r);
    the reference computes exactly that with jax.jit."""
    params, batch, key = _params(jax.random.PRNGKey(8)), _batch(jax.random.PRNGKey(9), 32), jax.random.key(3)
    k, r = 2, 4

    def step(params, batch, key):
        return mw.value_and_grad(_dropout_loss)(params, batch, key)

    @jax.jit
    def reference(params, batch, key):
        parts = jax.tree.map(lambda x: x.reshape((k, r, -1) + x.shape[1:]), batch)
        losses, grads = [], []
        for m in range(k):
            for j in range(r):
                sl = jax.tree.map(lambda x: x[m, j], parts)
                v, g = jax.value_and_grad(_dropout_loss)(params, sl, jax.random.fold_in(jax.random.fold_in(key, m), j))
                losses.append(v)
                grads.append(g)
        return jnp.mean(jnp.stack(losses)), jax.tree.map(lambda *g: sum(g) / len(g), *grads)

    f = mw.parallelize(step, method=mw.ShardParallel(mesh_shape=(4,), num_micro_batches=k,
                                                     devices=tuple(jax.devices()[:4])))
    out = f(params, batch, key)
    assert_trees_close(out, reference(params, batch, key), **TOL)
    whole = jax.jit(step)(params, batch, key)      # same distribution, not the same bits
    assert not np.allclose(out[0], whole[0])


def test_raw_uint32_key_under_accumulation_is_refused():
    def step(params, batch, key):
        return mw.value_and_grad(lambda p, b, k: _dropout_loss(p, b, jax.random.wrap_key_data(k)))(params, batch, key)

    f = mw.parallelize(step, method=mw.ShardParallel(num_micro_batches=2))
    with pytest.raises(mw.ParallelizeError, match="raw uint32 random key.*jax.random.key"):
        f(_params(jax.random.PRNGKey(8)), _batch(jax.random.PRNGKey(9), 32), jax.random.PRNGKey(3))


# ------------------------------------------------------------------ no silent fallbacks
@pytest.mark.parametrize("method", [mw.Zero2Parallel(), mw.Zero3Parallel(),
                                    mw.ShardParallel(auto_sharding=mw.AutoShardingOption(force_batch_dim_to_mesh_dim=0))],
                         ids=["zero2", "zero3", "forced-batch"])
def test_indivisible_batch_is_an_error(method):
    f = mw.parallelize(sgd_step, method=method)
    with pytest.raises(mw.ParallelizeError, match=r"batch\['x'\] has batch size 12.*not divisible by the "
                                                  r"data-parallel degree 8.*multiple of 8"):
        f(_state(), _batch(jax.random.PRNGKey(0), 12))


def test_fully_replicated_plan_is_a_warning_and_in_explain():
    f = mw.parallelize(lambda w, b: (w * b.sum()).sum(), method=mw.ShardParallel(mesh_shape=(8,)))
    with pytest.warns(UserWarning, match="fully replicated"):
        exe = f.get_executable(jnp.ones(3), jnp.ones((3,)))
    assert "fully replicated" in exe.explain()


@pytest.mark.parametrize("kw", [{"static_argnums": "2"}, {"donate_argnums": 1.5}, {"batch_argnums": [True]},
                                {"batch_argnames": 3}])
def test_argument_parameters_are_validated(kw):
    with pytest.raises(mw.ArgumentError, match="must be"):
        mw.parallelize(lambda a, b, c: a, **kw)


def test_fractional_memory_budget_is_refused():
    with pytest.raises(mw.MethodError, match="memory_budget_per_device=1.5: expected a positive whole number"):
        mw.AutoShardingOption(memory_budget_per_device=1.5)
    assert mw.AutoShardingOption(memory_budget_per_device=2.0**30).memory_budget_per_device == 2**30


def test_donating_a_whole_state_pytree_works_like_jax_jit():
    """donate_argnums names a pytree argument (a train state of many leaves), as with jax.jit."""
    from meshweave.models import mlp

    opt = optax.adam(1e-2)
    key = jax.random.PRNGKey(0)
    state = mlp.init_state(key, [16, 32, 8], opt)
    batch = mlp.synthetic_batch(key, 16, 16, 8)
    step = mlp.make_train_step(opt)
    par = mw.parallelize(step, donate_argnums=(0,), method=mw.ShardParallel(mesh_shape=(2, 4)))
    ref_state, ref_loss = jax.jit(step)(state, batch)
    new_state, loss = par(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    assert_trees_close(new_state, ref_state)

"""ManualShardingOption: hand-written PartitionSpecs pinned in the ILP (the solver fills in the
rest), checked against jax.jit; bad specs are errors naming the argument path."""
import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

import meshweave as mw
from meshweave.models import mlp
from meshweave.planning import ClusterSpec
from meshweave.step_time import estimate_executable

from conftest import assert_trees_close

# Megatron's MLP on a (dp=2, tp=4) mesh: the first kernel column-parallel, the second row-parallel.
MEGATRON = [{"kernel": P(None, "tp"), "bias": P("tp")}, {"kernel": P("tp", None), "bias": P()}]


def _case():
    opt = optax.sgd(1e-2)
    state = mlp.init_state(jax.random.PRNGKey(0), [64, 256, 64], opt)
    batch = mlp.synthetic_batch(jax.random.PRNGKey(1), 16, 64, 64)
    return mlp.make_train_step(opt), state, batch


def _method(in_specs, out_specs=None):
    return mw.ShardParallel(mesh_shape=(2, 4), axis_names=("dp", "tp"),
                            manual_sharding=mw.ManualShardingOption(in_specs, out_specs))


def test_megatron_mlp_is_pinned_and_matches_jit():
    step, state, batch = _case()
    specs = ({"params": MEGATRON, "opt_state": None}, {"x": P("dp"), "y": P("dp")})
    f = mw.parallelize(step, method=_method(specs))
    exe = f.get_executable(state, batch)
    placed = {p.path: p.spec for p in exe.plan.stages[0].inputs}
    assert placed["state['params'][0]['kernel']"] == str(P(None, "tp"))
    assert placed["state['params'][0]['bias']"] == str(P("tp"))
    assert placed["state['params'][1]['kernel']"] == str(P("tp"))
    assert placed["state['params'][1]['bias']"] == str(P())
    assert placed["batch['x']"] == str(P("dp"))
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=1e-5, atol=1e-6)
    # the row-parallel kernel's partial sums are all-reduced over tp (inside a host), and the
    # kernels' gradients over dp
    est = estimate_executable(exe, ClusterSpec(num_hosts=2, devices_per_host=4))
    reduced = {c.axes for c in est.collectives if c.kind == "all-reduce"}
    assert ("tp",) in reduced and ("dp",) in reduced
    assert not any(c.inter_host for c in est.collectives if c.axes == ("tp",))


def test_unpinned_leaves_and_pinned_outputs():
    step, state, batch = _case()
    # only the batch pinned, by parameter name; the loss result pinned replicated
    f = mw.parallelize(step, method=_method({"batch": P("dp")}, (None, P())))
    exe = f.get_executable(state, batch)
    placed = {p.path: p.spec for p in exe.plan.stages[0].inputs}
    assert placed["batch['x']"] == str(P("dp"))
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params, message", [
    ([{"kernel": P(None, "tp", None), "bias": P("tp")}, MEGATRON[1]],
     r"state\['params'\]\[0\]\['kernel'\].*3 entries but the array has rank 2"),
    ([{"kernel": P(None, "model"), "bias": P("tp")}, MEGATRON[1]],
     r"state\['params'\]\[0\]\['kernel'\].*mesh axis 'model'.*has axes \('dp', 'tp'\)"),
    ([{"kernel": P(("tp", "tp")), "bias": P("tp")}, MEGATRON[1]], r"uses mesh axis 'tp' twice"),
    ([{"kernel": P(None, "tp"), "bias": P("tp"), "scale": P()}, MEGATRON[1]],
     r"in_axis_resources\[0\]\['params'\]\[0\]\['scale'\].*matches no array"),
])
def test_bad_specs_name_the_argument(params, message):
    step, state, batch = _case()
    f = mw.parallelize(step, method=_method(({"params": params, "opt_state": None}, P("dp"))))
    with pytest.raises(mw.MethodError, match=message):
        f.get_executable(state, batch)


def test_indivisible_dimension_is_named():
    opt = optax.sgd(1e-2)
    state = mlp.init_state(jax.random.PRNGKey(0), [64, 256, 6], opt)
    batch = mlp.synthetic_batch(jax.random.PRNGKey(1), 16, 64, 6)
    bad = [MEGATRON[0], {"kernel": P("tp", None), "bias": P("tp")}]
    f = mw.parallelize(mlp.make_train_step(opt), method=_method(({"params": bad, "opt_state": None}, None)))
    with pytest.raises(mw.MethodError, match=r"state\['params'\]\[1\]\['bias'\].*dimension 0 of shape \(6,\) "
                                             r"is 6, not divisible by 4"):
        f.get_executable(state, batch)


def test_wrong_number_of_arguments_and_types():
    step, state, batch = _case()
    with pytest.raises(mw.MethodError, match="one entry per positional argument"):
        mw.parallelize(step, method=_method((None,))).get_executable(state, batch)
    with pytest.raises(mw.MethodError, match="names \\['btach'\\]"):
        mw.parallelize(step, method=_method({"btach": P("dp")})).get_executable(state, batch)
    with pytest.raises(mw.MethodError, match="manual_sharding must be a ManualShardingOption"):
        mw.ShardParallel(manual_sharding=(P("dp"),))


def test_benchmark_megatron_specs_cover_gpt_and_its_optimizer_state():
    from benchmarks.hand_plans import manual_option
    from meshweave.models import gpt

    opt = optax.sgd(1e-2, momentum=0.9)
    cfg = gpt.GPTConfig(vocab=64, seq_len=8, d_model=32, heads=4, layers=1)
    state = jax.eval_shape(lambda k: gpt.init_state(k, cfg, opt), jax.random.PRNGKey(0))
    batch = jax.eval_shape(lambda: gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 16))
    option = manual_option("gpt", "megatron", state, batch)
    result = mw.plan(gpt.make_train_step(opt), state, batch, cluster=ClusterSpec(num_hosts=2, devices_per_host=4),
                     method=mw.ShardParallel(mesh_shape=(2, 4), axis_names=("x", "y"), manual_sharding=option))
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path((state, batch))[0]]
    placed = dict(zip((jax.tree_util.keystr(p) for p in paths), result.arg_shardings))
    assert placed["[0]['params']['embed']"] == "[y,-]"                    # vocab-parallel
    assert placed["[0]['opt_state'][0].trace['embed']"] == "[y,-]"        # momentum mirrors it
    assert placed["[0]['params']['blocks'][0]['wq']"] == "[-,y,-]"        # heads over tp
    assert placed["[0]['params']['blocks'][0]['fc2']['kernel']"] == "[y,-]"
    assert placed["[1]['tokens']"] == "[x,-]"


def test_user_step_fed_its_own_outputs_with_a_keyword_batch():
    """A step written outside the zoo, called as people call jax.jit: the batch by keyword, the
    state it returned fed back, the second call with inputs already placed by the first."""
    import jax.numpy as jnp

    def step(params, *, batch):
        def loss(p):
            h = jnp.tanh(batch["x"] @ p["w1"])
            return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)
        l, g = jax.value_and_grad(loss)(params)
        return jax.tree.map(lambda a, b: a - 0.1 * b, params, g), l

    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"w1": jax.random.normal(k[0], (32, 64)) * 0.1, "w2": jax.random.normal(k[1], (64, 8)) * 0.1}
    batch = {"x": jax.random.normal(k[2], (16, 32)), "y": jax.random.normal(k[3], (16, 8))}
    specs = {"params": {"w1": P(None, "tp"), "w2": P("tp", None)}, "batch": P("dp")}
    f = mw.parallelize(step, method=_method(specs))
    ref = jax.jit(step)
    p_mw, p_ref = params, params
    for _ in range(3):
        p_mw, l_mw = f(p_mw, batch=batch)
        p_ref, l_ref = ref(p_ref, batch=batch)
        assert_trees_close((p_mw, l_mw), (p_ref, l_ref), rtol=1e-5, atol=1e-6)
    assert p_mw["w1"].sharding.spec == P(None, "tp")

"""Megatron's dp x tp x pp layout as a meshweave program: ManualStageOption stages on (dp, tp)
meshes with the parameters pinned by PipeshardParallel(manual_sharding=...), equal to jax.jit."""
import os
import sys

import jax
import optax
import pytest
from jax.sharding import PartitionSpec as P

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # the repo root: `benchmarks` package

import meshweave as mw  # noqa: E402
from benchmarks import megatron_programs  # noqa: E402
from meshweave.dialects import meshweave as mwd  # noqa: E402
from meshweave.dialects.context import parse_module  # noqa: E402
from meshweave.dialects.sharding import TensorSharding  # noqa: E402
from meshweave.models import gpt, moe_lm, wresnet  # noqa: E402

from conftest import assert_trees_close  # noqa: E402


def _pinned_layouts(program):
    """{(stage, argument path): the layout its fragment compiled with} over every fragment."""
    out = {}
    for d in program.fragments:
        module = parse_module(d.mlir)               # keep it alive while its @main is read
        main = mwd.main_func(module)
        for attrs in mwd.arg_attr_dicts(main):
            if mwd.ARG_PATH in attrs and mwd.SDY_SHARDING in attrs:
                path = str(attrs[mwd.ARG_PATH]).strip('"')
                out[(d.stage, d.kind, path)] = TensorSharding.from_attr(attrs[mwd.SDY_SHARDING]).dims
    return out


def test_megatron_pipeline_keeps_the_pins_and_matches_jit():
    cfg = gpt.GPTConfig(vocab=128, seq_len=16, d_model=64, heads=4, layers=4)
    opt = optax.adam(1e-3)
    state = gpt.init_state(jax.random.PRNGKey(0), cfg, opt)
    batch = gpt.synthetic_batch(jax.random.PRNGKey(1), cfg, 8)
    step = gpt.make_train_step(opt, grad_fn=mw.value_and_grad)
    stages = megatron_programs.megatron_stages(cfg.layers, dp=2, tp=2, pp=2)
    assert [s.layers for s in stages] == [(0, 2), (2, 4)]
    method = mw.PipeshardParallel(
        num_micro_batches=2, manual_sharding=megatron_programs.megatron_sharding("gpt", state, batch),
        stage_option=mw.ManualStageOption(tuple(tuple(range(*s.layers)) for s in stages), ((1, 4), (1, 4)),
                                          tuple(s.logical_shape for s in stages)))
    f = mw.parallelize(step, method=method)
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=2e-4, atol=2e-5)
    layouts = _pinned_layouts(f.last_executable.program)
    y = ("y",)
    assert layouts[(0, "forward", "state['params']['blocks'][0]['wq']")] == ((), y, ())       # column-parallel
    assert layouts[(0, "forward", "state['params']['blocks'][1]['wo']")] == (y, (), ())       # row-parallel
    assert layouts[(0, "forward", "state['params']['embed']")] == (y, ())                     # vocabulary-parallel
    assert layouts[(1, "forward", "state['params']['head']")] == ((), y)
    assert layouts[(1, "backward", "state['params']['blocks'][3]['fc2']['kernel']")] == (y, ())
    assert layouts[(0, "forward", "batch['tokens']")] == (("x",), ())                         # batch over dp
    mu = [v for (s, kind, path), v in layouts.items() if kind == "apply" and "mu" in path and path.endswith("['wq']")]
    assert mu and all(v == ((), y, ()) for v in mu)                                            # state like its parameter


def _stage_method(stages, shapes, micro_batches, sharding):
    return mw.PipeshardParallel(num_micro_batches=micro_batches, manual_sharding=sharding,
                                stage_option=mw.ManualStageOption(tuple(tuple(range(*s.layers)) for s in stages),
                                                                  shapes, tuple(s.logical_shape for s in stages)))


def test_megatron_moe_pipeline_keeps_the_pins_and_matches_jit():
    """Attention as GPT's, experts' wi column- and wo_e row-parallel on f, the gate replicated."""
    cfg = moe_lm.MoELMConfig(vocab=128, seq_len=16, d_model=64, heads=4, layers=4, experts=4, group_size=32)
    # Adam's first update is g / (|g| + eps): at the default eps an expert weight whose gradient is
    # ~1e-9 (few tokens routed to it) turns summation-order noise into a 1e-4 change; eps=1e-4
    # bounds that amplification while a wrong layout still changes every update.
    opt = optax.adam(1e-3, eps=1e-4)
    state = moe_lm.init_state(jax.random.PRNGKey(0), cfg, opt)
    batch = moe_lm.synthetic_batch(jax.random.PRNGKey(1), cfg, 8)
    step = moe_lm.make_train_step(cfg, opt, grad_fn=mw.value_and_grad)
    stages = megatron_programs.megatron_stages(cfg.layers, dp=2, tp=2, pp=2)
    f = mw.parallelize(step, method=_stage_method(stages, ((1, 4), (1, 4)), 2,
                                                  megatron_programs.megatron_sharding("moe", state, batch)))
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=2e-4, atol=2e-5)
    layouts = _pinned_layouts(f.last_executable.program)
    y = ("y",)
    assert layouts[(0, "forward", "state['params']['blocks'][0]['wq']")] == ((), y, ())
    assert layouts[(0, "forward", "state['params']['blocks'][1]['wo']")] == (y, (), ())
    assert layouts[(0, "forward", "state['params']['blocks'][0]['wi']")] == ((), (), y)      # (E, d, f) on f
    assert layouts[(1, "backward", "state['params']['blocks'][3]['wo_e']")] == ((), y, ())   # (E, f, d) on f
    assert layouts[(1, "forward", "state['params']['blocks'][2]['gate']")] == ((), ())       # replicated
    assert layouts[(0, "forward", "state['params']['embed']")] == (y, ())
    assert layouts[(1, "forward", "state['params']['head']")] == ((), y)
    assert layouts[(0, "forward", "batch['tokens']")] == (("x",), ())
    nu = [v for (s, kind, path), v in layouts.items() if kind == "apply" and "nu" in path and path.endswith("['wi']")]
    assert nu and all(v == ((), (), y) for v in nu)


def test_megatron_wresnet_layout_is_data_parallel_per_stage_and_matches_jit():
    """tp=1 (the analytic model has no tensor parallelism for convolutions): each stage's weights
    and optimizer state replicated over its dp axis, the batch split over it."""
    cfg = wresnet.WResNetConfig(image_size=16, layers=8, channels=4, width_factor=2, classes=8)
    opt = optax.adam(1e-3, eps=1e-4)           # as in the MoE test: near-zero gradients flip sign
    state = wresnet.init_state(jax.random.PRNGKey(0), cfg, opt)
    batch = wresnet.synthetic_batch(jax.random.PRNGKey(1), cfg, 8)
    step = wresnet.make_train_step(cfg, opt, grad_fn=mw.value_and_grad)
    sharding = megatron_programs.megatron_sharding("wresnet", state, batch)
    specs = jax.tree.leaves(sharding.in_axis_resources, is_leaf=lambda x: isinstance(x, P))
    assert specs.count(P("x")) == 2 and all(s == P() for s in specs if s != P("x"))
    stages = megatron_programs.megatron_stages(4, dp=4, tp=1, pp=2)
    # One micro-batch: batch norm takes the statistics of the batch it sees, so micro-batching
    # changes the model; a batch split over dp does not (the mean is over the whole batch).
    f = mw.parallelize(step, method=_stage_method(stages, ((1, 4), (1, 4)), 1, sharding))
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=2e-4, atol=2e-5)
    layouts = _pinned_layouts(f.last_executable.program)
    assert layouts[(0, "forward", "batch['images']")] == (("x",), (), (), ())
    assert layouts[(1, "forward", "state['params']['head']")] == ((), ())


def test_pipeline_manual_sharding_errors():
    with pytest.raises(mw.MethodError, match="in_axis_resources only"):
        mw.PipeshardParallel(manual_sharding=mw.ManualShardingOption(None, P()))
    with pytest.raises(ValueError, match="not a Megatron configuration"):
        megatron_programs.parse_config("dp=2 tp=4")
    with pytest.raises(ValueError, match="Megatron layouts are written for gpt, bert, moe, wresnet"):
        megatron_programs.megatron_sharding("vit", {}, {})
    assert megatron_programs.parse_config("dp=2 tp=4 pp=8 mb=512") == (2, 4, 8, 512)
    assert megatron_programs.parse_config("dp=2 tp=4 pp=8 mb=512 remat") == (2, 4, 8, 512)
    assert megatron_programs.recomputes("dp=2 tp=4 pp=8 mb=512 remat") and not megatron_programs.recomputes("dp=1 tp=1 pp=1 mb=1")
    with pytest.raises(ValueError, match="expects 3 dimensions"):     # a listed leaf of another rank is not replicated
        megatron_programs.megatron_sharding("gpt", {"params": {"wq": jax.numpy.zeros((4, 4))}}, {"tokens": jax.numpy.zeros((2, 3))})


def test_plan_prices_hand_given_stages_with_their_pins():
    """mw.plan with a ManualStageOption prices the stages as the stage DP prices candidates (ILPs on
    each stage's mesh with the cluster's α-β); Megatron's pins can only cost what the free choice
    costs or more."""
    from benchmarks import suite

    case = suite.make_case("gpt", "tiny", 32, 2)
    cluster = mw.ClusterSpec.preset("h100", 8)
    stages = megatron_programs.megatron_stages(4, dp=2, tp=2, pp=2)
    option = megatron_programs.stage_option(stages, cluster)
    assert option.submesh_physical_shapes == ((1, 4), (1, 4))

    def plan(manual):
        return mw.plan(case.step, case.state, case.batch, cluster=cluster, method=mw.PipeshardParallel(
            num_micro_batches=2, stage_option=option, manual_sharding=manual))

    pinned = plan(megatron_programs.megatron_sharding("gpt", case.state, case.batch))
    free = plan(None)
    lat = [s.latency for s in pinned.stages.stages]
    assert all(x > 0 for x in lat)
    assert pinned.predicted_step_time >= sum(lat) + max(lat) * (2 - 1) - 1e-12     # 1F1B over 2 micro-batches
    assert pinned.predicted_step_time >= free.predicted_step_time * (1 - 1e-6)


def test_plan_only_ranks_megatron_configurations_by_mw_plan():
    """--plan-only's ranking on a tiny MoE row: the formula's fastest configurations in its order,
    one sequence per micro-batch a failed try (the dispatch groups two), the chosen one the fastest
    by mw.plan's price that fits by mw.plan's memory count."""
    import dataclasses
    import json

    from benchmarks import suite

    case = suite.moe_case("tiny", global_batch=16, micro_batches=2)
    cluster = mw.ClusterSpec.preset("h100", 4)
    row = json.loads(json.dumps(dataclasses.asdict(suite.run_row(case, cluster, nb_factors=(1,)))))
    ranking = megatron_programs.rank_row("moe", "h100", row, top=3, log=lambda *_: None)
    formula = [t.analytic_step_time for t in ranking.tries]
    assert formula == sorted(formula)
    failed = [t for t in ranking.tries if t.error]
    assert failed and all("does not trace at 1 sample(s) per micro-batch" in t.error for t in failed)
    assert all(megatron_programs.parse_config(t.config)[3] == 16 for t in failed)      # dp=1: 16 micro-batches
    priced = [t for t in ranking.tries if t.planned_step_time is not None]
    assert len(priced) == 3 and all(t.memory_per_device > 0 and t.fits for t in priced)
    assert ranking.chosen == min(priced, key=lambda t: t.planned_step_time)
    # A capacity below the first plan's memory (by mw.plan's count): with top=1 the walk goes on past
    # it in the formula's order and stops at the first that fits.
    small = dataclasses.replace(cluster, device_memory=priced[0].memory_per_device * 0.999)
    tight = megatron_programs.rank_row("moe", "h100", row, top=1, memory_slack=1e6, log=lambda *_: None,
                                       cluster=small)
    tight_priced = [t for t in tight.tries if t.planned_step_time is not None]
    assert tight_priced[0].config == priced[0].config and not tight_priced[0].fits
    assert 1 < len(tight_priced) <= megatron_programs.EXTEND and not any(t.fits for t in tight_priced[:-1])
    assert tight.chosen is tight_priced[-1] and tight.chosen.memory_per_device <= small.device_memory
    fastest = ranking.chosen
    entry = megatron_programs.planned_entry(ranking, 1.0)
    assert entry["config"] == fastest.config and len(entry["tries"]) == len(ranking.tries)
    best, ratio = megatron_programs.planned_comparison(row, entry, cluster.peak_flops)
    assert best["step_time"] <= fastest.planned_step_time and ratio == best["step_time"] / row["auto"]["step_time"]
    json.dumps(entry)

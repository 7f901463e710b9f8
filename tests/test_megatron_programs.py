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
from meshweave.models import gpt  # noqa: E402

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


def test_pipeline_manual_sharding_errors():
    with pytest.raises(mw.MethodError, match="in_axis_resources only"):
        mw.PipeshardParallel(manual_sharding=mw.ManualShardingOption(None, P()))
    with pytest.raises(ValueError, match="not a Megatron configuration"):
        megatron_programs.parse_config("dp=2 tp=4")
    assert megatron_programs.parse_config("dp=2 tp=4 pp=8 mb=512") == (2, 4, 8, 512)
    assert megatron_programs.parse_config("dp=2 tp=4 pp=8 mb=512 remat") == (2, 4, 8, 512)
    assert megatron_programs.recomputes("dp=2 tp=4 pp=8 mb=512 remat") and not megatron_programs.recomputes("dp=1 tp=1 pp=1 mb=1")


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

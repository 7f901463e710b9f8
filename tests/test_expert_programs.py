"""Expert parallel + ZeRO-2 as a meshweave program (benchmarks/expert_programs.py): one stage over
all devices, experts split over "x", optimizer state over every device, equal to jax.jit."""
import os
import sys

import jax
import optax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # the repo root: `benchmarks` package

import meshweave as mw  # noqa: E402
from benchmarks import expert_programs  # noqa: E402
from meshweave.models import moe_lm  # noqa: E402

from conftest import assert_trees_close  # noqa: E402
from test_megatron_programs import _pinned_layouts  # noqa: E402


def test_ep_zero2_program_keeps_the_pins_and_matches_jit():
    cfg = moe_lm.MoELMConfig(vocab=128, seq_len=16, d_model=64, heads=4, layers=2, experts=4, group_size=32)
    opt = optax.adam(1e-3, eps=1e-4)           # see test_megatron_programs: near-zero gradients flip sign
    state = moe_lm.init_state(jax.random.PRNGKey(0), cfg, opt)
    batch = moe_lm.synthetic_batch(jax.random.PRNGKey(1), cfg, 16)
    step = moe_lm.make_train_step(cfg, opt, grad_fn=mw.value_and_grad)
    method = mw.PipeshardParallel(num_micro_batches=2, manual_sharding=expert_programs.ep_zero2_sharding(state, batch, 8),
                                  stage_option=mw.ManualStageOption(((0, 1),), ((1, 8),), ((4, 2),)))
    f = mw.parallelize(step, method=method)
    assert_trees_close(f(state, batch), jax.jit(step)(state, batch), rtol=2e-4, atol=2e-5)
    layouts = _pinned_layouts(f.last_executable.program)
    x, both = ("x",), ("x", "y")
    assert layouts[(0, "forward", "state['params']['blocks'][0]['wi']")] == (x, (), ())        # experts over x
    assert layouts[(0, "backward", "state['params']['blocks'][1]['wo_e']")] == (x, (), ())
    assert layouts[(0, "forward", "state['params']['blocks'][0]['wq']")] == ((), (), ())       # replicated
    assert layouts[(0, "forward", "batch['tokens']")] == (both, ())
    apply = {p: v for (s, kind, p), v in layouts.items() if kind == "apply"}
    mu_wq = [v for p, v in apply.items() if "mu" in p and p.endswith("[0]['wq']")]
    mu_wi = [v for p, v in apply.items() if "mu" in p and p.endswith("[0]['wi']")]
    assert mu_wq == [(both, (), ())] and mu_wi == [(x, (), ())]       # ZeRO: (d=64, h, k) split over all 8


def test_ep_config_errors():
    assert expert_programs.parse_config("ep=8 dp=16 mb=4") == (8, 16, 4)
    with pytest.raises(ValueError, match="not an expert-parallel configuration"):
        expert_programs.parse_config("dp=16 mb=4")

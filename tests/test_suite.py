"""The benchmark suite's pieces: cluster presets, the analytic baselines, and one tiny GPT row
through the same code path `python -m benchmarks.suite` runs (plan-only, no devices)."""
import dataclasses
import json
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))   # the repo root: `benchmarks` package

import meshweave as mw  # noqa: E402
from benchmarks import baselines, suite  # noqa: E402


def test_presets_tile_whole_hosts_and_carry_capacity():
    c = mw.ClusterSpec.preset("h100", 16)
    assert (c.num_hosts, c.devices_per_host, c.device_memory) == (2, 8, 80e9)
    assert c.device_flops < c.peak_flops
    shape, alpha, beta = c.logical_mesh()
    assert shape == (2, 8)
    assert alpha[0] == c.inter_host_latency and alpha[1] == c.latency
    assert beta[0] == 1 / c.inter_host_bandwidth and beta[1] == 1 / c.intra_host_bandwidth
    small = mw.ClusterSpec.preset("p3", 4)
    assert (small.num_hosts, small.devices_per_host, small.device_memory) == (1, 4, 16e9)
    with pytest.raises(ValueError, match="multiple of 8"):
        mw.ClusterSpec.preset("p3", 12)
    with pytest.raises(ValueError, match="known: h100, p3"):
        mw.ClusterSpec.preset("a100", 8)


def _stats(param_bytes, layers=8, **kw):
    base = dict(step_flops=1e15, param_bytes=param_bytes, layer_param_bytes=(param_bytes / layers,) * layers,
                activation_bytes_per_sample=1e6, boundary_bytes_per_sample=1e5, tp_allreduce_bytes_per_sample=4e5,
                num_layers=layers, global_batch=64)
    base.update(kw)
    return baselines.ModelStats(**base)


def test_data_parallel_is_compute_plus_one_gradient_all_reduce():
    c = mw.ClusterSpec.preset("h100", 8)
    s = _stats(1e9)
    plan = baselines.data_parallel(s, c)
    ring = 2 * 7 / 8 * 1e9 / c.intra_host_bandwidth + c.latency
    assert plan.fits and plan.config == "dp=8 mb=1"
    assert plan.step_time == pytest.approx(1e15 / 8 / c.device_flops + ring, rel=1e-3)
    # Across hosts the same all-reduce runs at the inter-host bandwidth.
    c16 = mw.ClusterSpec.preset("h100", 16)
    assert baselines.data_parallel(s, c16).communication_time == pytest.approx(
        2 * 15 / 16 * 1e9 / c16.inter_host_bandwidth + c16.inter_host_latency, rel=1e-3)


def test_memory_capacity_rules_out_replicated_state():
    c = mw.ClusterSpec.preset("p3", 8)            # 16 GB per device
    s = _stats(8e9)                               # 4 x 8 GB of replicated state does not fit
    dp, z2, z3 = baselines.data_parallel(s, c), baselines.zero2(s, c), baselines.zero3(s, c)
    assert not dp.fits and dp.step_time is None
    assert z3.fits and z3.memory_per_device < c.device_memory
    mega, tried = baselines.megatron(s, c)
    assert mega.fits and tried > 10
    dp_deg, tp, pp = (int(x.split("=")[1]) for x in mega.config.split()[:3])
    assert dp_deg * tp * pp == 8 and tp * pp > 1     # the state must be split by tp or pp to fit


def test_megatron_search_returns_the_fastest_fitting_configuration():
    c = mw.ClusterSpec.preset("h100", 16)
    s = _stats(4e9, layers=16)
    best, tried = baselines.megatron(s, c)
    configs = list(baselines.megatron_configs(s, c))
    assert best.fits and tried == 2 * len(configs)              # each with and without recomputation
    assert {(tp, pp) for _, tp, pp, _ in configs} >= {(1, 1), (8, 2), (2, 8), (1, 16)}
    times = [baselines.megatron_config(s, c, *cfg, remat=r).step_time for cfg in configs for r in (False, True)]
    assert best.step_time == min(t for t in times if t is not None)
    no_tp, _ = baselines.megatron(dataclasses.replace(s, tensor_parallel=False), c)
    assert " tp=1 " in f" {no_tp.config} " and no_tp.step_time >= best.step_time


def test_megatron_full_recomputation_trades_a_forward_for_activation_memory():
    """Recomputation: compute x 4/3 and the forward's tp all-reduces again; activations kept = each
    layer's input per micro-batch in flight (replicated over tp) + one layer's activations. The
    search takes it only where the plain layout does not fit."""
    c = mw.ClusterSpec.preset("p3", 8)
    s = _stats(1e9, activation_bytes_per_sample=4e8, boundary_bytes_per_sample=1e7)
    plain = baselines.megatron_config(s, c, 1, 4, 2, 2)
    remat = baselines.megatron_config(s, c, 1, 4, 2, 2, remat=True)
    assert remat.compute_time == pytest.approx(plain.compute_time * 4 / 3)
    samples, layers = 64 // 2, 4
    held_plain = 2 * samples * 4e8 / 8 * layers / 4
    held_remat = 2 * layers * samples * 1e7 + samples * 4e8 / 8 / 4
    assert plain.memory_per_device - remat.memory_per_device == pytest.approx(held_plain - held_remat)
    assert remat.config.endswith(" remat") and not plain.config.endswith(" remat")
    best, _ = baselines.megatron(s, c)          # plain layouts fit: recomputation would only cost time
    assert best.fits and not best.config.endswith(" remat")
    huge = _stats(1e9, activation_bytes_per_sample=3e11, boundary_bytes_per_sample=1e7)   # 1 sample > 16 GB / 8
    only_plain, _ = baselines.megatron(huge, c, remat=(False,))
    best, _ = baselines.megatron(huge, c)
    assert not only_plain.fits and best.fits and best.config.endswith(" remat")


def test_tiny_gpt_row_through_the_suite():
    case = suite.gpt_case("tiny", global_batch=32, micro_batches=2)
    cluster = mw.ClusterSpec.preset("h100", 4)
    row = suite.run_row(case, cluster, nb_factors=(1, 2))
    auto = row.auto_detail
    tries = [n for n in row.notes if n.startswith("micro-batches")]
    assert len(tries) == 2 and auto.micro_batches in (2, 4)
    assert sum(s["devices"] for s in auto.stages) == 4
    assert [s["layers"] for s in auto.stages][0][0] == 0 and auto.stages[-1]["layers"][1] == 4
    # Every method is at least as slow as its compute at the achievable rate.
    floor = row.step_matmul_tflop * 1e12 / 4 / cluster.device_flops
    for m in [row.auto] + row.baselines:
        assert m.step_time is None or m.step_time >= floor * 0.999, m
    assert set(auto.timings) == {"trace", "passes", "stage_ilps", "stage_dp", "micro_batch_search"}
    # Identical blocks share their solves: 3 distinct layers (embedding + block, block, block + head)
    # x forward/backward x 4 logical shapes on 4 devices ((1,), (2,), (4,), (2, 2)), not 4 x 2 x 4.
    assert auto.ilp_solves == 3 * 2 * 4
    # Each parameter is counted once, in the layer that reads it.
    assert sum(row.model_stats.layer_param_bytes) == pytest.approx(suite.tree_bytes(case.state["params"]))
    json.dumps(dataclasses.asdict(row))
    text = suite.table([row])
    assert "meshweave auto" in text and "Megatron" in text and "planning" in text
    assert math.isfinite(row.auto_vs_best_baseline)


def test_compute_term_counts_convolutions_like_xla():
    import jax
    import jax.numpy as jnp
    import optax

    from meshweave.models import wresnet
    from meshweave.passes.stage_profiling import _flops

    cfg = wresnet.WResNetConfig()
    opt = optax.sgd(1e-2)
    state = jax.eval_shape(lambda k: wresnet.init_state(k, cfg, opt), jax.random.PRNGKey(0))
    batch = {"images": jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
             "labels": jax.ShapeDtypeStruct((8,), jnp.int32)}
    lowered = jax.jit(wresnet.make_train_step(cfg, opt)).lower(state, batch)
    ours, xla = _flops(lowered.as_text()), lowered.cost_analysis()["flops"]
    assert 0.9 * xla < ours < 1.1 * xla        # XLA also counts elementwise ops; convolutions dominate
    stem = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), "SAME",
                                                             dimension_numbers=("NHWC", "HWIO", "NHWC")))
    text = stem.lower(jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32),
                      jax.ShapeDtypeStruct((7, 7, 3, 16), jnp.float32)).as_text()
    assert _flops(text) == 2 * (8 * 16 * 16 * 16) * (7 * 7 * 3)


def test_moe_and_wresnet_cases_match_alpa_sizes():
    from meshweave.models import alpa_configs

    for suite_name, size, billions in (("moe", "70B", 69.4), ("wresnet", "13B", 12.6), ("gpt", "39B", 39.1)):
        table = {"moe": alpa_configs.MOE_WEAK_SCALING, "wresnet": alpa_configs.WRESNET_WEAK_SCALING,
                 "gpt": alpa_configs.GPT_WEAK_SCALING}[suite_name]
        case = suite.weak_scaling_case(suite_name, 64)
        assert case.model == size == table[64].model
        params = sum(math.prod(x.shape) for x in __import__("jax").tree.leaves(case.state["params"]))
        assert params / 1e9 == pytest.approx(billions, rel=0.02)


def test_tiny_bert_row_through_the_suite():
    case = suite.make_case("bert", "tiny", global_batch=32, micro_batches=2)
    cluster = mw.ClusterSpec.preset("h100", 4)
    row = suite.run_row(case, cluster)
    stages = row.auto_detail.stages
    assert stages[0]["layers"][0] == 0 and stages[-1]["layers"][1] == 4      # a pipeline layer per encoder layer
    assert sum(s["devices"] for s in stages) == 4
    floor = row.step_matmul_tflop * 1e12 / 4 / cluster.device_flops
    for m in [row.auto] + row.baselines:
        assert m.step_time is None or m.step_time >= floor * 0.999, m
    assert row.megatron_configs_priced > 1 and any(m.method.startswith("Megatron") for m in row.baselines)
    json.dumps(dataclasses.asdict(row))


def test_planned_stages_compile_on_simulated_devices_and_are_judged(tmp_path):
    """The --emit-plans path: a planned row's stages compiled in a process with the row's devices,
    stage_<k>.hlo.gz written, collectives counted from it and judged by the α-β evaluator."""
    import gzip

    from benchmarks import stage_programs
    from meshweave.plugin import hlo_stats
    from meshweave.dialects.sharding import default_axis_names
    from meshweave.step_time import estimate_compiled_step

    case = suite.make_case("gpt", "tiny", global_batch=32, micro_batches=2)
    cluster = mw.ClusterSpec.preset("h100", 4)
    row = dataclasses.asdict(suite.run_row(case, cluster, nb_factors=(1,)))
    results = tmp_path / "gpt_h100.json"
    results.write_text(json.dumps({"rows": [row]}))
    stage_programs.main([str(results), "--plans-dir", str(tmp_path / "plans")])
    compiled = json.loads(results.read_text())["rows"][0]["compiled"]
    out = tmp_path / "plans" / "gpt_h100_4"
    plan = json.loads((out / "plan.json").read_text())
    assert [s["layers"] for s in compiled["stages"]] == [s["layers"] for s in row["auto_detail"]["stages"]]
    assert compiled["evaluator"].endswith("estimate_compiled_step")
    for s, planned in zip(plan["stages"], row["auto_detail"]["stages"]):
        text = gzip.open(out / s["hlo_file"], "rt").read()
        modules = text.split("// fragment ")[1:]
        assert [m.split()[1] for m in modules] == ["(forward)", "(backward)", "(apply)"]
        assert all("HloModule" in m for m in modules)
        sub = stage_programs.stage_cluster(cluster, s["logical_shape"])
        judged = 0.0
        for m, frag in zip(modules, s["fragments"]):
            hlo = m.split("\n", 1)[1]
            assert frag["collectives"] == hlo_stats.summarize(hlo_stats.collectives(hlo))
            est = estimate_compiled_step(hlo, s["logical_shape"], default_axis_names(len(s["logical_shape"])), sub)
            assert frag["judged"]["total_s"] == pytest.approx(est.total_s)
            judged += est.total_s if frag["phase"] != "apply" else 0.0
        assert s["judged_latency"] == pytest.approx(judged) and judged > 0
        assert s["ilp_latency"] > 0 and s["predicted_latency"] == planned["latency"]
        if s["logical_shape"] == [1]:              # one device: nothing to communicate
            assert all(not f["collectives"] for f in s["fragments"])


@pytest.mark.parametrize("suite_name, batch", [("gpt", 32), ("wresnet", 16)])
def test_compiled_stages_cost_what_the_stage_dp_priced(suite_name, batch):
    """Issue 14: per stage, the compiled fragments' own ILPs equal the stage DP's price and the α-β
    judgement of what XLA compiled agrees with both. On a device slow enough that compute decides
    layouts: the fragment ILPs must price FLOPs as the DP's do (unpriced, GPT's ILPs chose other
    layouts than the DP's), and a strided convolution's input gradient (lhs-dilated in the HLO)
    must not be judged at 4x its FLOPs (Wide-ResNet stages were judged 13-28% over the plan)."""
    from benchmarks import stage_programs

    case = suite.make_case(suite_name, "tiny", global_batch=batch, micro_batches=2)
    cluster = dataclasses.replace(mw.ClusterSpec.preset("h100", 4), device_flops=1e9)
    plan, _ = suite.plan_auto(case, cluster, micro_batches=2)
    layouts = stage_programs.layouts_of_row({"auto_detail": dataclasses.asdict(plan)})
    compiled = stage_programs.compile_stages(case.step, case.state, case.batch, layouts, plan.micro_batches, cluster)
    for s, layout in zip(compiled.stages, layouts):
        if not layout.remat:            # remat stages are priced from their layers' sums
            assert s.ilp_latency == pytest.approx(s.predicted_latency, rel=1e-3), s
        assert s.judged_latency == pytest.approx(s.ilp_latency, rel=0.03), s


def test_compiling_stages_needs_their_devices():
    from benchmarks import stage_programs

    case = suite.make_case("gpt", "tiny", global_batch=32, micro_batches=2)
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count=16"):
        stage_programs.compile_stages(case.step, case.state, case.batch,
                                      [stage_programs.StageLayout((0, 4), (16,))], 2, mw.ClusterSpec.preset("h100", 16))


def test_merging_a_replanned_row_keeps_the_other_rows_and_keys(tmp_path):
    """--merge replaces only the re-planned GPU counts; a replaced row keeps what other tools added
    (megatron_planned) but not `compiled`, which described the old plan's stages."""
    path = tmp_path / "moe_p3.json"
    old = {"command": "python -m benchmarks.suite --suite moe", "machine": "x", "rows": [
        {"gpus": 8, "auto": {"step_time": 11.4}, "compiled": {"stages": []}, "megatron_planned": {"s": 1.0}},
        {"gpus": 16, "auto": {"step_time": 9.4}, "compiled": {"stages": []}}]}
    path.write_text(json.dumps(old))
    doc = suite.merge_rows(str(path), [{"gpus": 8, "auto": {"step_time": 8.9}}], "python -m benchmarks.suite --gpus 8")
    assert json.loads(path.read_text()) == doc
    assert doc["command"] == old["command"] and doc["machine"] == "x"
    assert doc["rows"][0] == {"gpus": 8, "auto": {"step_time": 8.9}, "megatron_planned": {"s": 1.0}}
    assert doc["rows"][1] == old["rows"][1]
    assert [(c["command"], c["gpus"]) for c in doc["merged_commands"]] == [("python -m benchmarks.suite --gpus 8", [8])]

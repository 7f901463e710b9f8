"""The α-β evaluator of compiled programs (meshweave.step_time) on hand-made HLO and on one
compiled jax program: collectives, bytes, device groups, link levels, loops, FLOPs."""
import dataclasses

import pytest

from meshweave.planning import ClusterSpec
from meshweave.plugin import hlo_program as hp
from meshweave.step_time import estimate_compiled_step

# 2 hosts x 4 devices of the h100 preset: mesh (2, 4), axis x crosses hosts, y stays inside one.
H100_2X4 = dataclasses.replace(ClusterSpec.preset("h100", 8), num_hosts=2, devices_per_host=4)
INTRA_A, INTRA_B = 3e-6, 1 / 450e9
INTER_A, INTER_B = 8e-6, 1 / 50e9

HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused_dot (p0: f32[8,64], p1: f32[64,32]) -> f32[8,32] {
  %p0 = f32[8,64]{1,0} parameter(0)
  %p1 = f32[64,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[8,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (t: (s32[], f32[8,32])) -> (s32[], f32[8,32]) {
  %t = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %v = f32[8,32]{1,0} get-tuple-element(%t), index=1
  %a2a = f32[8,32]{1,0} all-to-all(%v), channel_id=5, replica_groups=[2,4]<=[8], dimensions={0}
  ROOT %r = (s32[], f32[8,32]{1,0}) tuple(%i, %a2a)
}

%cond (t: (s32[], f32[8,32])) -> pred[] {
  %t = (s32[], f32[8,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,64], w: f32[64,32], img: f32[2,10,10,3], k: f32[3,3,3,16]) -> f32[8,32] {
  %x = f32[8,64]{1,0} parameter(0)
  %w = f32[64,32]{1,0} parameter(1)
  %img = f32[2,10,10,3]{3,2,1,0} parameter(2)
  %k = f32[3,3,3,16]{3,2,1,0} parameter(3)
  %conv = f32[2,8,8,16]{3,2,1,0} convolution(%img, %k), window={size=3x3}, dim_labels=b01f_01io->b01f
  %f = f32[8,32]{1,0} fusion(%x, %w), kind=kOutput, calls=%fused_dot
  %ar = f32[8,32]{1,0} all-reduce(%f), channel_id=1, replica_groups=[2,4]<=[8], use_global_device_ids=true, to_apply=%add
  %ag = f32[16,32]{1,0} all-gather(%ar), channel_id=2, replica_groups={{0,4},{1,5},{2,6},{3,7}}, dimensions={0}, use_global_device_ids=true
  %rs = f32[2,32]{1,0} reduce-scatter(%ar), channel_id=3, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, dimensions={0}, use_global_device_ids=true, to_apply=%add
  %cp = f32[8,32]{1,0} collective-permute(%ar), channel_id=4, source_target_pairs={{0,1},{1,2},{2,3},{3,0},{4,5},{5,6},{6,7},{7,4}}
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,32]{1,0}) tuple(%zero, %cp)
  %loop = (s32[], f32[8,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[8,32]{1,0} get-tuple-element(%loop), index=1
}
"""

NB = 8 * 32 * 4     # bytes of an f32[8,32]


def by_name(est):
    return {c.name: c for c in est.collectives}


def test_collectives_groups_axes_and_link_levels():
    est = estimate_compiled_step(HLO, (2, 4), ("x", "y"), H100_2X4)
    c = by_name(est)
    assert (c["ar"].group_size, c["ar"].axes, c["ar"].inter_host) == (4, ("y",), False)
    assert (c["ag"].group_size, c["ag"].axes, c["ag"].inter_host) == (2, ("x",), True)
    assert (c["rs"].group_size, c["rs"].axes, c["rs"].inter_host) == (4, ("y",), False)
    assert (c["cp"].group_size, c["cp"].axes, c["cp"].inter_host) == (2, ("y",), False)
    assert (c["a2a"].runs, c["a2a"].computation) == (5, "body")
    # seconds: the α-β formulas of passes/cost_model.py written out by hand
    assert c["ar"].seconds == pytest.approx(INTRA_A + INTRA_B * 2 * 3 / 4 * NB, rel=1e-6)
    assert c["ag"].seconds == pytest.approx(INTER_A + INTER_B * 1 / 2 * 16 * 32 * 4, rel=1e-6)
    assert c["rs"].seconds == pytest.approx(INTRA_A + INTRA_B * 3 / 4 * NB, rel=1e-6)   # bytes before scatter
    assert c["cp"].seconds == pytest.approx(INTRA_A + INTRA_B * NB, rel=1e-6)
    assert c["a2a"].seconds == pytest.approx(INTRA_A + INTRA_B * 3 / 8 * NB, rel=1e-6)


def test_kind_totals_loops_and_flops():
    est = estimate_compiled_step(HLO, (2, 4), ("x", "y"), H100_2X4)
    assert (est.count("all-to-all"), est.kind("all-to-all").static_count, est.bytes("all-to-all")) == (5, 1, 5 * NB)
    assert (est.count("all-reduce"), est.bytes("all-reduce")) == (1, NB)
    assert est.bytes("reduce-scatter") == 2 * 32 * 4
    assert est.count("send") == 0
    dot = 2 * 8 * 32 * 64
    conv = 2 * (2 * 8 * 8 * 16) * (3 * 3 * 3)
    assert est.flops == dot + conv
    assert est.compute_s == pytest.approx(est.flops / H100_2X4.device_flops)
    assert est.communication_s == pytest.approx(sum(c.seconds * c.runs for c in est.collectives))
    assert est.total_s == pytest.approx(est.compute_s + est.communication_s)
    assert est.inter_host_s == pytest.approx(by_name(est)["ag"].seconds)
    assert est.notes == ()


def test_one_host_prices_every_group_on_nvlink():
    one_host = ClusterSpec.preset("p3", 8)
    est = estimate_compiled_step(HLO, (2, 4), ("x", "y"), one_host)
    assert not any(c.inter_host for c in est.collectives)
    p3_2x4 = dataclasses.replace(one_host, num_hosts=2, devices_per_host=4)
    assert estimate_compiled_step(HLO, (2, 4), ("x", "y"), p3_2x4).total_s > est.total_s


def test_bad_inputs_and_unknowns_are_named():
    with pytest.raises(ValueError, match="has 8 devices but cluster"):
        estimate_compiled_step(HLO, (2, 4), ("x", "y"), ClusterSpec.preset("h100", 16))
    with pytest.raises(hp.HloParseError, match="no ENTRY"):
        estimate_compiled_step("HloModule m\n", (8,), ("x",), ClusterSpec.preset("h100", 8))
    unknown = HLO.replace(', backend_config={"known_trip_count":{"n":"5"}}', "").replace(
        "replica_groups=[2,4]<=[8], use_global", "replica_groups=weird, use_global")
    est = estimate_compiled_step(unknown, (2, 4), ("x", "y"), H100_2X4)
    assert by_name(est)["a2a"].runs == 1 and by_name(est)["ar"].group_size == 8
    assert any("trip count unknown" in n for n in est.notes)
    assert any("%ar: device groups unreadable" in n for n in est.notes)


def test_replica_group_syntaxes():
    assert hp.device_groups("replica_groups=[4,2]<=[2,4]T(1,0)", 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert hp.device_groups("replica_groups={}", 4) == [[0, 1, 2, 3]]
    mesh = "replica_groups=mesh['a'=2,'b'=4] {'a'}"
    assert hp.device_groups(mesh, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    # 'b':(2)2 is the minor size-2 digit of b: pairs (0,1), (2,3), ...
    assert hp.device_groups("replica_groups=mesh['a'=2,'b'=4] {'b':(2)2}", 8) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert hp.device_groups("replica_groups=mesh['a'=2,'b'=4] {'b':(1)2}", 8) == [[0, 2], [1, 3], [4, 6], [5, 7]]


def test_a_compiled_program_matches_its_collective_list():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from meshweave.plugin import hlo_stats

    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("x", "y"))
    w = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P(None, "y")))
    x = jax.device_put(jnp.ones((16, 64)), NamedSharding(mesh, P("x", None)))

    def step(w, x):
        return jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w)))(w)

    text = jax.jit(step).lower(w, x).compile().as_text()
    est = estimate_compiled_step(text, (2, 4), ("x", "y"), H100_2X4)
    listed = hlo_stats.summarize(hlo_stats.collectives(text))
    assert {k.kind: (k.static_count, k.bytes) for k in est.kinds} == {k: (v["count"], v["bytes"]) for k, v in listed.items()}
    # x @ w forward and the gradient's x^T @ dy: 2 * 8*16*64 each per device
    assert est.flops == 2 * (2 * 8 * 16 * 64)
    # the weight gradient is summed over the batch axis x, across hosts
    assert any(c.kind == "all-reduce" and c.axes == ("x",) and c.inter_host for c in est.collectives)


def test_mesh_syntax_with_a_device_order():
    # XLA's own mesh (1, 4, 2) over devices iota([2,4]).T: mesh position (0, j, k) holds device 4k + j
    text = "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_1'}"
    assert hp.device_groups(text, 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    text = "replica_groups=mesh['axis_0'=1,'axis_1'=4,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_2'}"
    assert hp.device_groups(text, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_a_strided_convolutions_gradients_are_judged_at_the_planners_flops():
    """The input gradient of a stride-2 convolution is an lhs-dilated convolution in the compiled
    HLO; its dilation zeros are not multiplied (XLA's cost analysis skips them, the planner's
    cost_model.conv_flops does not count them): forward, input and weight gradients cost the same."""
    import jax
    import jax.numpy as jnp

    def loss(w, x):
        y = jax.lax.conv_general_dilated(x, w, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    w, x = jnp.ones((3, 3, 8, 16)), jnp.ones((4, 16, 16, 8))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(w, x).compile().as_text()
    assert "lhs_dilate=2x2" in text
    est = estimate_compiled_step(text, (1,), ("x",), ClusterSpec.preset("h100", 1))
    forward = 2.0 * (4 * 8 * 8 * 16) * (3 * 3 * 8)
    assert est.flops == pytest.approx(3 * forward)

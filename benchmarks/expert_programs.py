"""Expert parallel + ZeRO-2 (DeepSpeed-MoE's layout) for the MoE LM as a meshweave program.

The analytic baseline (`baselines.expert_parallel_zero2`) prices the layout with a formula; here it
is written down for `mw.plan`: one stage over all devices on an (ep, n / ep) logical mesh, ep =
gcd(experts, devices) as the formula takes it. Pins: the experts' weights (wi, wo_e) and their
optimizer state split on the expert dimension over "x"; every other parameter replicated (ZeRO-2
keeps whole parameters) with its optimizer state split over both axes on its first dimension they
divide (ZeRO-2's sharded optimizer state; the ILP chooses how gradients reach it, a reduce-scatter
where that is cheapest); the batch over both axes. The ILP chooses the rest, including the token
all-to-alls around the experts.

    python -m benchmarks.expert_programs benchmarks/results/moe_h100.json [--gpus 8,16]
        -> each row's "ep_zero2_planned" entry (every micro-batch count tried, the chosen one)
"""
from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import time
from dataclasses import dataclass, field

from benchmarks import stage_programs as sp

EXPERT_LEAVES = ("wi", "wo_e")


def parse_config(config: str) -> tuple[int, int, int]:
    """'ep=8 dp=8 mb=16' -> (8, 8, 16)."""
    m = re.fullmatch(r"ep=(\d+) dp=(\d+) mb=(\d+)", config.strip())
    if not m:
        raise ValueError(f"not an expert-parallel configuration: {config!r} (expected 'ep=.. dp=.. mb=..')")
    return tuple(int(x) for x in m.groups())


def ep_zero2_sharding(state, batch, devices: int):
    """ManualShardingOption of expert parallel + ZeRO-2 on an ("x" = experts, "y") mesh of `devices`."""
    import jax
    from jax.sharding import PartitionSpec as P
    from jax.tree_util import DictKey

    import meshweave as mw

    both = ("x", "y")

    def spec(path, leaf):
        keys = [k.key for k in path if isinstance(k, DictKey)]
        if keys and keys[-1] in EXPERT_LEAVES:
            return P("x")                             # (E, ...) on the expert dimension
        if "opt_state" in keys:                       # ZeRO: optimizer state split over every device
            dim = next((d for d, size in enumerate(leaf.shape) if size % devices == 0), None)
            return P(*([None] * dim + [both])) if dim is not None else P()
        return P()

    state_specs = jax.tree_util.tree_map_with_path(spec, state)
    batch_specs = jax.tree.map(lambda x: P(both) if len(x.shape) else P(), batch)
    return mw.ManualShardingOption(in_axis_resources=(state_specs, batch_specs))


@dataclass
class EPTry:
    config: str
    planned_step_time: float | None = None
    memory_per_device: float | None = None     # mw.plan's count (bytes); None: unknown
    fits: bool | None = None
    planning_seconds: float = 0.0
    error: str = ""


@dataclass
class EPRanking:
    formula_config: str
    analytic_step_time: float | None
    tries: list[EPTry] = field(default_factory=list)
    chosen: EPTry | None = None


def plan_config(row: dict, cluster, config: str):
    """mw.plan of the MoE row's step in the expert parallel + ZeRO-2 layout at `config`."""
    import meshweave as mw
    from benchmarks import suite

    ep, dp, k = parse_config(config)
    n = cluster.num_devices
    case = suite.make_case("moe", row["model"], row["global_batch"], k)
    layers = tuple(range(row["model_stats"]["num_layers"]))
    physical = (n // cluster.devices_per_host, cluster.devices_per_host) if n > cluster.devices_per_host else (1, n)
    stage = mw.ManualStageOption((layers,), (physical,), ((ep, n // ep),))
    return mw.plan(case.step, case.state, case.batch, cluster=cluster, method=mw.PipeshardParallel(
        num_micro_batches=k, layer_option=case.layer_option, stage_option=stage,
        manual_sharding=ep_zero2_sharding(case.state, case.batch, n)))


def rank_row(row: dict, cluster, max_tries: int = 3, log=print) -> EPRanking:
    """The formula's micro-batch count first, then twice as many (less activation memory) until one
    fits by mw.plan's memory count or `max_tries` counts were planned; the fastest that fits wins."""
    from benchmarks import megatron_programs

    base = next(b for b in row["baselines"] if b["method"] == "expert parallel + ZeRO-2")
    ep, dp, k = parse_config(base["plan"])
    out = EPRanking(base["plan"], base["step_time"])
    per_device = row["global_batch"] // dp
    while k <= per_device and len(out.tries) < max_tries:
        t, t0 = EPTry(f"ep={ep} dp={dp} mb={k}"), time.perf_counter()
        out.tries.append(t)
        planned, t.error, _ = megatron_programs.plan_or_reason(lambda: plan_config(row, cluster, t.config),
                                                               row["global_batch"] // k)
        if planned is not None:
            t.planned_step_time = planned.predicted_step_time
            t.memory_per_device, t.fits = megatron_programs.memory_fit(planned, cluster.device_memory)
        t.planning_seconds = round(time.perf_counter() - t0, 1)
        log(f"  {t.config}: mw.plan " + megatron_programs.try_summary(t))
        if t.fits:
            break
        k *= 2
        while k <= per_device and per_device % k:
            k += 1
    out.chosen = min((t for t in out.tries if t.fits), key=lambda t: t.planned_step_time, default=None)
    return out


def planned_entry(ranking: EPRanking) -> dict:
    c = ranking.chosen
    return {"config": c.config if c else None, "planned_step_time": c.planned_step_time if c else None,
            "memory_per_device": c.memory_per_device if c else None,
            "formula_config": ranking.formula_config, "analytic_step_time": ranking.analytic_step_time,
            "tries": [dataclasses.asdict(t) for t in ranking.tries]}


def main(argv=None):
    import meshweave as mw
    from benchmarks import megatron_programs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", nargs="?", help="a MoE suite JSON (benchmarks/results/moe_<cluster>.json)")
    p.add_argument("--gpus", default=None, help="only these rows (e.g. 8,16)")
    args = p.parse_args(argv)
    doc, want = sp.load_suite_json(p, args)
    cmd = "python -m benchmarks.expert_programs " + " ".join(sys.argv[1:] if argv is None else argv)
    for row in doc["rows"]:
        if (want and row["gpus"] not in want) or row["suite"] != "moe":
            continue
        cluster = mw.ClusterSpec.preset(row["cluster"].split("x")[0], row["gpus"])
        print(f"{row['suite']} {row['cluster']} {row['model']}: expert parallel + ZeRO-2 through mw.plan")
        entry = planned_entry(rank_row(row, cluster))
        row["ep_zero2_planned"] = entry
        updates = {"ep_zero2_planned": entry}
        if "megatron_planned" in row:            # the best baseline re-ranked with this price
            best, ratio = megatron_programs.planned_comparison(row, row["megatron_planned"], cluster.peak_flops)
            updates.update(best_baseline_planned=best, auto_vs_best_planned=ratio)
        sp.record(args.results, row["gpus"], updates, cmd)
        print(f"  chosen {entry['config']} (formula's {entry['formula_config']})")


if __name__ == "__main__":
    main()

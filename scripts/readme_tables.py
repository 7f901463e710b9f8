"""Regenerate the benchmark tables in README.md and passes/solver/README.md from the JSON results.

Each table sits between ``<!-- BEGIN name -->`` and ``<!-- END name -->`` markers and is
rewritten from ``benchmarks/results/*.json``; nothing in those blocks is edited by hand.

    python scripts/readme_tables.py           # rewrite the blocks
    python scripts/readme_tables.py --check   # exit 1 if a block is stale (CI / tests)
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
FILES = [REPO / "README.md", REPO / "passes" / "solver" / "README.md"]


def _load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def _n(x) -> str:
    return "–" if x is None else f"{x:,}"


def _source(d: dict, name: str) -> str:
    load = d.get("load_average_before") or d.get("machine", {}).get("load_average")
    load_s = f"; load average at start {load[0]:.1f}" if load else ""
    return f"\n`{d['command']}` → `benchmarks/results/{name}`{load_s}.\n"


def iopddl_table() -> str:
    d = _load("iopddl.json")
    if d is None:
        return "(no benchmarks/results/iopddl.json yet)\n"
    rows = ["| instance | cost | best known | points | vs XLA | first feasible | time used / limit | status |",
            "|---|---:|---:|---:|---|---:|---:|---|"]
    for r in d["instances"]:
        vs = {"lower": f"{r.get('xla_over_ours', 0):.2f}x lower", "equal": "equal",
              "higher": f"higher ({r.get('xla_over_ours', 0):.3f})"}.get(r.get("vs_xla"), "XLA: no plan")
        ff = r.get("time_to_first_feasible_s")
        rows.append(f"| {r['instance']} | {_n(r.get('cost'))} | {_n(r['best_known_cost'])} | "
                    f"{r['points']:.4f} | {vs} | {'–' if ff is None else f'{ff:.1f} s'} | "
                    f"{r['time_used_s']:.1f} / {r['time_limit_s']:g} s | {r.get('status')} |")
    rows.append(f"| total | | | {d['total_points']:.4f} of {d['max_points']} | | | | |")
    return "\n".join(rows) + "\n" + _source(d, "iopddl.json")


def yardstick_table() -> str:
    d = _load("yardstick.json")
    if d is None:
        return "(no benchmarks/results/yardstick.json yet)\n"
    rows = ["| instance | cost | best known | points | status | time used / limit |",
            "|---|---:|---:|---:|---|---:|"]
    for r in d["instances"]:
        bk = _n(r["best_known_cost"]) + ("" if r.get("best_known_proven") else " (not proven)")
        rows.append(f"| {r['instance']} | {_n(r.get('cost'))} | {bk} | {r['points']:.4f} | "
                    f"{r.get('status')} | {r['time_used_s']:.1f} / {r['time_limit_s']:g} s |")
    rows.append(f"| average | | | {d['average_points']:.4f} (min {d['min_points']:.4f}) | | |")
    return "\n".join(rows) + "\n" + _source(d, "yardstick.json")


def scaling_table() -> str:
    d = _load("ilp_scaling.json")
    if d is None:
        return "(no benchmarks/results/ilp_scaling.json yet)\n"
    rows = ["| layers | hidden | mesh | ILP nodes / edges | strategies | graph build (CPU) | solve (CPU) | status "
            "| nodes folded | load |",
            "|---:|---:|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in d["rows"]:
        load = r.get("load_average_before") or r.get("load_average") or [float("nan")]
        rows.append(f"| {r['layers']} | {r['hidden']} | {'x'.join(map(str, r['mesh']))} | "
                    f"{r['ilp_nodes']:,} / {r['ilp_edges']:,} | {r['strategy_choices']:,} | "
                    f"{r['build_time_s']:.2f} s ({r.get('build_cpu_s', float('nan')):.2f} s) | "
                    f"{r['solve_time_s']:.2f} s ({r.get('solve_cpu_s', float('nan')):.2f} s) | {r['status']} | "
                    f"{r.get('folded_nodes', 0):,} | {load[0]:.1f} |")
    return "\n".join(rows) + "\n" + _source(d, "ilp_scaling.json")


def first_call_table() -> str:
    d = _load("first_call.json")
    if d is None:
        return "(no benchmarks/results/first_call.json yet)\n"
    rows = ["| model | mesh | first call (CPU) | XLA compiles | auto-sharding pass | solve | solver status "
            "| plain jax.jit trace + compile (CPU) | load |",
            "|---|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in d["rows"]:
        ref = r.get("plain_jit_trace_compile") or {}
        xla = (r.get("jax_compile_events_s") or {}).get("backend_compile_duration", float("nan"))
        count = f" ({r['xla_compiles']})" if "xla_compiles" in r else ""
        rows.append(f"| GPT {r['layers']} layers, hidden {r['hidden']} | {r['mesh']} | {r['first_call_s']:.2f} s "
                    f"({r.get('first_call_cpu_s', float('nan')):.2f} s) | {xla:.2f} s{count} | "
                    f"{r['passes_s'].get('auto-sharding', 0):.2f} s | {r['solve_time_s']:.2f} s | "
                    f"{r['solver_status']} | {ref.get('wall_s', float('nan')):.2f} s ({ref.get('cpu_s', float('nan')):.2f} s) "
                    f"| {r['load_average_before'][0]:.1f} |")
    return "\n".join(rows) + "\n" + _source(d, "first_call.json")


SUITES = [(s, c) for s in ("gpt", "moe", "wresnet") for c in ("h100", "p3")]


def _tf(m: dict) -> str:
    if m.get("tflops_per_gpu") is None:
        return "OOM" if not m.get("fits", True) or m.get("step_time") is None else "–"
    return f"{m['tflops_per_gpu']:.0f} ({m['percent_of_peak']:.0f}%)"


def _ratio(x) -> str:
    """Two decimals, four where two would round a ratio below 1 up to 1.00."""
    if not x:
        return "–"
    return f"{x:.4f}" if 0.995 <= x < 1 else f"{x:.2f}"


def _best_planned(r: dict) -> tuple[str, str, str]:
    """(best baseline with Megatron as the program mw.plan chose, its TFLOP/s/GPU, auto / it)."""
    if "best_baseline_planned" not in r:
        return "not ranked by mw.plan", "", "–"
    b = r["best_baseline_planned"]
    if b is None:
        return "none fits", "", "–"
    return f"{b['method']} ({b['plan']}; {b['priced_by']})", _tf(b), _ratio(r.get("auto_vs_best_planned"))


def suite_table() -> str:
    """benchmarks.suite rows: the automatic plan against the best baseline (Megatron as a meshweave
    program priced by mw.plan; the other baselines analytic), and the formula's Megatron for reference."""
    rows = ["| suite | cluster | GPUs | model | auto plan | auto TFLOP/s/GPU (% peak) | auto GB/dev | best baseline "
            "(plan; priced by) | its TFLOP/s/GPU | auto / it | formula's Megatron (plan): TFLOP/s/GPU, auto / it "
            "| planning s: total (ILPs / DP) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    sources = []
    for suite, cluster in SUITES:
        name = f"{suite}_{cluster}.json"
        d = _load(name)
        if d is None:
            continue
        sources.append(f"`{d['command']}`" + "".join(f"; `{c}`" for c in d.get("compiled_commands", [])
                                                     if "--plan-only" in c or "expert_programs" in c))
        sources[-1] += "".join(f" (rows {', '.join(map(str, m['gpus']))} re-planned: `{m['command']}`)"
                               for m in d.get("merged_commands", []))
        for r in d["rows"]:
            a, det = r["auto"], r["auto_detail"]
            best, best_tf, ratio = _best_planned(r)
            mega = next((b for b in r["baselines"] if b["method"].startswith("Megatron")), None)
            mega_s = "–" if mega is None else f"{mega['plan']}: {_tf(mega)}, " + _ratio(
                mega["step_time"] / a["step_time"] if mega.get("step_time") and a.get("step_time") else None)
            t = det["timings"]
            rows.append(f"| {suite} | {cluster} | {r['gpus']} | {r['model']} | {a['plan'].split(' ', 2)[-1]} | {_tf(a)} "
                        f"| {a['memory_per_device_gb']:.0f} | {best} | {best_tf} | {ratio} | {mega_s} "
                        f"| {det['planning_seconds']:.0f} ({t.get('stage_ilps', 0):.0f} / {t.get('stage_dp', 0):.0f}) |")
    return "\n".join(rows) + "\n\n" + "; ".join(sources) + (" (commands in each JSON).\n" if sources else "\n")


BLOCKS = {"suite-table": suite_table, "iopddl-table": iopddl_table, "yardstick-table": yardstick_table,
          "ilp-scaling-table": scaling_table, "first-call-table": first_call_table}


def rewrite(text: str) -> str:
    for name, make in BLOCKS.items():
        pat = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        text = pat.sub(lambda m, make=make: m.group(1) + make() + m.group(2), text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only report stale blocks")
    args = ap.parse_args(argv)
    stale = []
    for path in FILES:
        old = path.read_text()
        new = rewrite(old)
        if new != old:
            stale.append(str(path.relative_to(REPO)))
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print("stale benchmark tables in: " + ", ".join(stale) + " (run python scripts/readme_tables.py)")
        return 1
    print(("rewrote " if stale else "up to date: ") + ", ".join(stale or [str(p.relative_to(REPO)) for p in FILES]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

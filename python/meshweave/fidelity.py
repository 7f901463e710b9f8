"""Plan fidelity: do the collectives XLA emitted match what the auto-sharding ILP paid for?

Per collective kind, the predicted count and per-device bytes are compared with the compiled,
partitioned HLO. XLA's combiners merge independent collectives of one kind into one op, so
equal bytes with fewer ops is reported as "combined", not as a mismatch.
"""
from __future__ import annotations

BYTES_TOLERANCE = 0.01


def compare(predicted: dict, compiled: dict, shardy: dict | None = None) -> list[dict]:
    """Per kind: predicted (the ILP), shardy (Shardy's own partitioning of the plan, optional) and
    compiled (XLA); `status` compares predicted with compiled."""
    rows = []
    shardy = shardy or {}
    for kind in sorted(set(predicted) | set(compiled) | set(shardy)):
        p = predicted.get(kind, {"count": 0, "bytes": 0})
        c = compiled.get(kind, {"count": 0, "bytes": 0})
        sh = shardy.get(kind, {"count": 0, "bytes": 0})
        same_bytes = abs(p["bytes"] - c["bytes"]) <= BYTES_TOLERANCE * max(p["bytes"], c["bytes"], 1)
        if same_bytes and p["count"] == c["count"]:
            status = "match"
        elif same_bytes and 0 < c["count"] < p["count"]:
            status = "combined"
        else:
            status = "mismatch"
        rows.append({"kind": kind, "predicted_count": p["count"], "predicted_bytes": p["bytes"],
                     "shardy_count": sh["count"], "shardy_bytes": sh["bytes"],
                     "compiled_count": c["count"], "compiled_bytes": c["bytes"], "status": status})
    return rows


def report(rows: list[dict], compiled=None, top: int = 6) -> str:
    if not rows:
        return "no collectives predicted or compiled"
    lines = [f"  {'kind':15s} {'predicted (ILP)':>22s} {'Shardy partitioner':>22s} {'compiled (XLA)':>22s}  status"]
    for r in rows:
        lines.append(f"  {r['kind']:15s} {r['predicted_count']:5d} x {r['predicted_bytes']:12d} B "
                     f"{r['shardy_count']:5d} x {r['shardy_bytes']:12d} B "
                     f"{r['compiled_count']:5d} x {r['compiled_bytes']:12d} B  {r['status']}")
    bad = [r["kind"] for r in rows if r["status"] == "mismatch"]
    lines.append("  mismatches (ILP vs XLA): " + (", ".join(bad) if bad else "none"))
    model = [r["kind"] for r in rows if (r["predicted_count"], r["predicted_bytes"]) != (r["shardy_count"], r["shardy_bytes"])]
    lines.append("  ILP vs Shardy's explicit collectives: " + ("identical" if not model else "differ in " + ", ".join(model)))
    for kind in bad:
        biggest = sorted((c for c in compiled or () if c.kind == kind), key=lambda c: -c.bytes)[:top]
        if biggest:
            lines.append(f"  largest compiled {kind}s (bytes, source op):")
            lines += [f"    {c.bytes:12d} B  {_short(c.source or c.name)}" for c in biggest]
    return "\n".join(lines)


def _short(text: str, width: int = 110) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."

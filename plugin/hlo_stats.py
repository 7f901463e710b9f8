"""Reading compiled (SPMD-partitioned) HLO text: the collectives XLA emitted, with bytes and groups.

Handles tuple-shaped collectives, async `-start` forms and the three replica-group syntaxes
XLA prints (iota `[g,s]<=[n]`, explicit `{{0,1},{2,3}}`, mesh `mesh['a'=2,'b'=4] {'a'}`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
         "collective-permute", "collective-broadcast")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s+(?P<op>"
                   + "|".join(KINDS) + r")(?P<start>-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")


@dataclass(frozen=True)
class Collective:
    kind: str
    name: str
    bytes: int          # per device, of the result
    group_size: int | None
    source: str | None = None   # XLA metadata op_name: the jax op (name stack) it came from


def _array_bytes(shape: str) -> list[int]:
    return [_DTYPE_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dt, dims in _ARRAY.findall(shape)]


def _group_size(rest: str) -> int | None:
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", rest):
        return int(m.group(2))
    if m := re.search(r"replica_groups=\{\{([0-9,]*)\}", rest):
        return len(m.group(1).split(","))
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?\s*\{([^}]*)\}", rest):
        sizes = {k.strip("' "): int(v) for k, v in (kv.split("=") for kv in m.group(1).split(","))}
        return int(np.prod([_axis_size(a, sizes) for a in m.group(2).split(",") if a.strip()]))
    return None


def _axis_size(axis: str, sizes: dict) -> int:
    """A mesh axis's size, or a sub-axis's: 'axis_1':(2)2 is the size-2 slice after 2 (XLA's notation)."""
    if sub := re.fullmatch(r"'?([^':]+)'?:\((\d+)\)(\d+)", axis.strip()):
        return int(sub.group(3))
    return sizes[axis.strip("' ")]


def collectives(hlo_text: str) -> list[Collective]:
    out = []
    for line in hlo_text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        sizes = _array_bytes(m.group("shape"))
        if m.group("start") and m.group("shape").startswith("(") and m.group("op") != "all-reduce":
            sizes = sizes[len(sizes) // 2:]   # async start returns (operands, results)
        src = re.search(r'op_name="([^"]*)"', m.group("rest"))
        out.append(Collective(m.group("op"), m.group("name"), sum(sizes), _group_size(m.group("rest")),
                              src.group(1) if src else None))
    return out


def summarize(colls: list[Collective]) -> dict[str, dict[str, int]]:
    """{kind: {"count": n, "bytes": total}} over the given collectives."""
    out: dict[str, dict[str, int]] = {}
    for c in colls:
        s = out.setdefault(c.kind, {"count": 0, "bytes": 0})
        s["count"] += 1
        s["bytes"] += c.bytes
    return dict(sorted(out.items()))

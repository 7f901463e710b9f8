"""A structural reader of compiled HLO text: computations, instructions, how often each runs.

`plugin/hlo_stats.py` lists a module's collectives line by line; judging a compiled program's
step time needs more: which devices each collective groups (not only how many), the matmul FLOPs
inside fusions, and loops (a while body runs trip-count times). This module parses the text
into computations of instructions with their result shapes, expands every replica-group syntax
XLA prints into explicit device groups, and counts each computation's executions from ENTRY.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from meshweave.passes.cost_model import conv_flops
from meshweave.plugin.hlo_stats import _DTYPE_BYTES, KINDS

_HEADER = re.compile(r"^\s*(?P<entry>ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<tail>.*)$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_CALLED = re.compile(r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"\bbranch_computations=\{([^}]*)\}")


class HloParseError(ValueError):
    """The text is not HLO this reader understands; the message names the line."""


@dataclass(frozen=True)
class Instruction:
    name: str
    shape: str            # result shape text, e.g. "f32[8,16]{1,0}" or a tuple "(s32[], f32[8]{0})"
    opcode: str           # e.g. "dot", "all-reduce-start", "fusion"
    operands: tuple[str, ...]
    attributes: str       # everything after the operand list


@dataclass(frozen=True)
class Computation:
    name: str
    instructions: tuple[Instruction, ...]
    is_entry: bool

    def shapes(self) -> dict[str, str]:
        return {i.name: i.shape for i in self.instructions}


def array_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(dtype, dims)] of every array in a shape (one for an array, several for a tuple)."""
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape)]


def shape_bytes(shape: str) -> list[int]:
    return [_DTYPE_BYTES.get(dt, 4) * math.prod(dims) for dt, dims in array_dims(shape)]


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start] (quoted strings skipped)."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack, i = [], start
    while i < len(text):
        c = text[i]
        if c == '"':
            i = text.find('"', i + 1)
            if i < 0:
                break
        elif c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    raise HloParseError(f"unbalanced brackets in: {text[:200]}")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    out, depth, cur = [], 0, []
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
    if "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def parse_instruction(line: str) -> Instruction | None:
    m = _INSTR.match(line)
    if not m:
        return None
    tail = m.group("tail")
    if tail.startswith("("):
        end = _balanced(tail, 0)
        shape, rest = tail[:end], tail[end:].lstrip()
    else:
        shape, _, rest = tail.partition(" ")
    op = re.match(r"([a-z][\w\-]*)\(", rest)
    if not op:
        return None
    end = _balanced(rest, op.end() - 1)
    operands = tuple(o.split()[-1].lstrip("%") for o in _split_top(rest[op.end():end - 1]) if o)
    return Instruction(m.group("name"), shape, op.group(1), operands, rest[end:].lstrip(", "))


def parse_module(text: str) -> dict[str, Computation]:
    """Computations by name, in the order the text lists them."""
    comps: dict[str, Computation] = {}
    current, body, entry = None, [], False
    for line in text.splitlines():
        if current is None:
            h = _HEADER.match(line)
            if h:
                current, body, entry = h.group("name"), [], bool(h.group("entry"))
            continue
        if line.strip() == "}":
            comps[current] = Computation(current, tuple(body), entry)
            current = None
            continue
        ins = parse_instruction(line)
        if ins is not None:
            body.append(ins)
    if current is not None:
        raise HloParseError(f"computation %{current} is not closed by '}}'")
    if not any(c.is_entry for c in comps.values()):
        raise HloParseError("no ENTRY computation: pass the compiled module's HLO text (compiled.as_text())")
    return comps


# ----------------------------------------------------------------------------- executions
def trip_count(ins: Instruction) -> int | None:
    """A while loop's trip count, as XLA records it in backend_config (known_trip_count)."""
    m = re.search(r"backend_config=(\{.*\})\s*$", ins.attributes)
    if m:
        try:
            n = json.loads(m.group(1)).get("known_trip_count", {}).get("n")
            return int(n) if n is not None else None
        except (ValueError, AttributeError):
            pass
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', ins.attributes)
    return int(m.group(1)) if m else None


def called(ins: Instruction) -> list[str]:
    names = [name for _, name in _CALLED.findall(ins.attributes)]
    if b := _BRANCHES.search(ins.attributes):
        names += [n.strip().lstrip("%") for n in b.group(1).split(",") if n.strip()]
    return names


def executions(comps: dict[str, Computation]) -> tuple[dict[str, int], list[str]]:
    """How many times each computation runs per call of ENTRY (a while body: its trip count; every
    branch of a conditional counted once, an upper bound), and notes on loops of unknown count."""
    runs = {c.name: 0 for c in comps.values()}
    notes = []
    order = [c.name for c in comps.values() if c.is_entry]
    runs[order[0]] = 1
    k = 0
    while k < len(order):          # callees are listed before callers, so visit from ENTRY down
        comp = comps[order[k]]
        k += 1
        for ins in comp.instructions:
            trips = 1
            if ins.opcode == "while":
                trips = trip_count(ins)
                if trips is None:
                    trips = 1
                    notes.append(f"while %{ins.name}: trip count unknown, counted once")
            for callee in called(ins):
                if callee in runs:
                    runs[callee] += runs[comp.name] * trips
                    if callee not in order:
                        order.append(callee)
    return runs, notes


# ----------------------------------------------------------------------------- FLOPs
def _dims_attr(attrs: str, key: str) -> tuple[int, ...]:
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attrs)
    return tuple(int(x) for x in m.group(1).split(",") if x) if m else ()


def matmul_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    """2 x multiply-adds of a dot or convolution (0 for any other op). A convolution counts as
    `cost_model.conv_flops`, the planner's own count: the zeros an lhs dilation inserts (the input
    gradient of a strided convolution, `lhs_dilate=2x2`) are not multiplied, as in XLA's cost analysis."""
    if ins.opcode not in ("dot", "convolution") or not ins.operands:
        return 0.0
    out = array_dims(ins.shape)
    lhs = array_dims(shapes.get(ins.operands[0], ""))
    if not out or not lhs:
        raise HloParseError(f"%{ins.name}: cannot find the shapes of its result or operand %{ins.operands[0]}")
    out_elems = math.prod(out[0][1])
    if ins.opcode == "dot":
        contracted = math.prod(lhs[0][1][d] for d in _dims_attr(ins.attributes, "lhs_contracting_dims"))
        return 2.0 * out_elems * contracted
    rhs = array_dims(shapes.get(ins.operands[1], ""))
    labels = re.search(r"dim_labels=\w+_(\w+)->", ins.attributes)
    if not rhs or not labels:
        raise HloParseError(f"%{ins.name}: convolution without a kernel shape or dim_labels")
    dilate = re.search(r"\blhs_dilate=([0-9x]+)", ins.attributes)
    return conv_flops(rhs[0][1], out[0][1], labels.group(1).index("o"),
                      [int(d) for d in dilate.group(1).split("x")] if dilate else ())


# ----------------------------------------------------------------------------- device groups
def collective_kind(opcode: str) -> str | None:
    base = opcode[:-len("-start")] if opcode.endswith("-start") else opcode
    return base if base in KINDS else None


def _iota(dims, perm=None) -> np.ndarray:
    ids = np.arange(math.prod(dims)).reshape(dims)
    return ids.transpose(perm) if perm else ids


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def device_groups(attrs: str, num_devices: int) -> list[list[int]] | None:
    """The device groups of a collective (partition ids), from any of XLA's replica-group syntaxes,
    or from source_target_pairs for a collective-permute (each pair a group); None if absent."""
    if m := re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs):
        return [list(p) for p in zip(*[iter(_ints(m.group(1)))] * 2)]
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", attrs):
        perm = _ints(m.group(4)) if m.group(4) else None
        return _iota(_ints(m.group(3)), perm).reshape(int(m.group(1)), int(m.group(2))).tolist()
    if m := re.search(r"replica_groups=\{((?:\{[0-9,]*\},?)*)\}", attrs):
        groups = [_ints(g) for g in re.findall(r"\{([0-9,]*)\}", m.group(1))]
        return groups if groups else [list(range(num_devices))]
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]((?:,\s*device_ids=\((?:[^()]|\([^()]*\))*\))?)\s*\{([^}]*)\}",
                      attrs):
        return _mesh_groups(m.group(1), m.group(2), m.group(3))
    return None


def _device_ids(text: str, n: int) -> np.ndarray:
    """A mesh's device order: absent (iota), an iota `([2,4]T(1,0))` / `([8]<=[2,4]T(1,0))`, or a list."""
    if not text.strip():
        return np.arange(n)
    if m := re.search(r"\(\[([0-9,]+)\](?:<=\[([0-9,]+)\])?(?:T\(([0-9,]+)\))?\)", text):
        dims = _ints(m.group(2) or m.group(1))
        return _iota(dims, _ints(m.group(3)) if m.group(3) else None).reshape(-1)
    return np.array(_ints(text), dtype=np.int64)


def _mesh_groups(axes_text: str, ids_text: str, listed_text: str) -> list[list[int]]:
    """Groups of the mesh syntax `mesh['a'=2,'b'=4] {'b'}`: devices that agree on every coordinate
    not listed; a listed sub-axis 'b':(pre)size is the size-`size` digit of b after `pre`."""
    axes = [(k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in axes_text.split(","))]
    n = math.prod(s for _, s in axes)
    ids = _device_ids(ids_text, n)
    if ids.size != n:
        raise HloParseError(f"mesh[{axes_text}]: device_ids {ids_text!r} do not list {n} devices")
    listed: dict[str, list[tuple[int, int]]] = {}
    for item in filter(None, (x.strip() for x in listed_text.split(","))):
        if sub := re.fullmatch(r"'?([^':]+)'?:\((\d+)\)(\d+)", item):
            listed.setdefault(sub.group(1), []).append((int(sub.group(2)), int(sub.group(3))))
        else:
            name = item.strip("' ")
            listed.setdefault(name, []).append((1, dict(axes)[name]))
    coords = np.indices([s for _, s in axes]).reshape(len(axes), -1).T     # row-major device order
    keys = []
    for pos in coords:
        key = []
        for (name, size), i in zip(axes, pos):
            cuts = sorted({1, size} | {p for p, _ in listed.get(name, [])} | {p * s for p, s in listed.get(name, [])})
            for lo, hi in zip(cuts, cuts[1:]):
                inside = any(p <= lo and hi <= p * s for p, s in listed.get(name, []))
                if not inside:
                    key.append((name, lo, (i // (size // hi)) % (hi // lo)))
        keys.append(tuple(key))
    groups: dict[tuple, list[int]] = {}
    for k, dev in zip(keys, ids.tolist()):
        groups.setdefault(k, []).append(dev)
    return list(groups.values())

"""Read and write the IOPDDL contest JSON format (plain or gzipped).

The format (google/iopddl) is ``{"problem": {"name", "nodes": {"intervals",
"costs", "usages"}, "edges": {"nodes", "costs"}, "usage_limit"?}}`` with edge
cost matrices flattened row-major. Reading converts whole fields at once with
numpy (the big instances have millions of values) and checks every field,
naming the offending one, so a bad file fails loudly instead of mis-solving.
meshweave's optional labels travel in extra keys (``nodes.names``,
``nodes.strategy_names``) that other readers ignore.
"""

from __future__ import annotations

import gzip
import json
import os
from itertools import chain

import numpy as np

from .problem import INT64_MAX, ShardingProblem, check_int


def _flat_ints(lists, field: str, lengths: np.ndarray) -> np.ndarray:
    """Concatenate a list of integer lists into one int64 array, or name the bad entry."""
    total = int(lengths.sum())
    flat = list(chain.from_iterable(lists))
    arr = np.array(flat) if flat else np.zeros(0, dtype=np.int64)
    if arr.dtype.kind in "iu" and arr.shape == (total,):
        if arr.dtype.kind == "u" and arr.size and int(arr.max()) > INT64_MAX:
            arr = np.array(flat, dtype=object)  # fall through to the scan below
        else:
            arr = arr.astype(np.int64, copy=False)
            if arr.size and int(arr.min()) < 0:
                pos = int(np.argmin(arr))
                i = int(np.searchsorted(np.cumsum(lengths), pos, side="right"))
                j = pos - (int(lengths[:i].sum()) if i else 0)
                raise ValueError(f"{field}[{i}][{j}]: negative value {int(arr[pos])}")
            return arr
    for i, row in enumerate(lists):  # slow path, only to name the bad entry
        for j, v in enumerate(row):
            check_int(v, f"{field}[{i}][{j}]")
    raise ValueError(f"{field}: could not read as integers")


def _list_of_lists(obj, field: str, n: int | None = None) -> list:
    if not isinstance(obj, list):
        raise ValueError(f"{field}: expected a list, got {type(obj).__name__}")
    if n is not None and len(obj) != n:
        raise ValueError(f"{field}: {len(obj)} entries, expected {n} (one per node)")
    for i, row in enumerate(obj):
        if not isinstance(row, list):
            raise ValueError(f"{field}[{i}]: expected a list, got {type(row).__name__}")
    return obj


def problem_from_json_dict(d: dict) -> ShardingProblem:
    """Build a ShardingProblem from the parsed contest JSON (the whole file or its ``problem``)."""
    if not isinstance(d, dict):
        raise ValueError("problem: expected a JSON object")
    p = d["problem"] if "problem" in d else d
    if not isinstance(p, dict):
        raise ValueError("problem: expected a JSON object")
    for key in ("nodes", "edges"):
        if not isinstance(p.get(key), dict):
            raise ValueError(f"problem.{key}: missing or not an object")
    nodes, edges = p["nodes"], p["edges"]
    for key in ("intervals", "costs", "usages"):
        if key not in nodes:
            raise ValueError(f"problem.nodes.{key}: missing")
    name = p.get("name", "")
    if not isinstance(name, str):
        raise ValueError("problem.name: expected a string")

    costs = _list_of_lists(nodes["costs"], "problem.nodes.costs")
    n = len(costs)
    if n == 0:
        raise ValueError("problem.nodes.costs: the problem has no nodes")
    usages = _list_of_lists(nodes["usages"], "problem.nodes.usages", n)
    intervals = _list_of_lists(nodes["intervals"], "problem.nodes.intervals", n)
    ks = np.fromiter(map(len, costs), dtype=np.int64, count=n)
    if int(ks.min()) == 0:
        raise ValueError(f"problem.nodes.costs[{int(np.argmin(ks))}]: node has no strategies")
    uks = np.fromiter(map(len, usages), dtype=np.int64, count=n)
    if not np.array_equal(ks, uks):
        i = int(np.nonzero(ks != uks)[0][0])
        raise ValueError(f"problem.nodes.usages[{i}]: {uks[i]} usages for {ks[i]} strategies "
                         f"(problem.nodes.costs[{i}])")
    ivl = np.fromiter(map(len, intervals), dtype=np.int64, count=n)
    if (ivl != 2).any():
        i = int(np.nonzero(ivl != 2)[0][0])
        raise ValueError(f"problem.nodes.intervals[{i}]: expected [lower, upper], got {intervals[i]!r}")
    flat_c = _flat_ints(costs, "problem.nodes.costs", ks)
    flat_u = _flat_ints(usages, "problem.nodes.usages", ks)
    iv = _flat_ints(intervals, "problem.nodes.intervals", ivl).reshape(n, 2)
    bad = np.nonzero(iv[:, 0] > iv[:, 1])[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"problem.nodes.intervals[{i}]: lower {iv[i, 0]} > upper {iv[i, 1]}")

    for key in ("nodes", "costs"):
        if key not in edges:
            raise ValueError(f"problem.edges.{key}: missing")
    enodes = _list_of_lists(edges["nodes"], "problem.edges.nodes")
    ecosts = _list_of_lists(edges["costs"], "problem.edges.costs")
    num_e = len(enodes)
    if len(ecosts) != num_e:
        raise ValueError(f"problem.edges.costs: {len(ecosts)} cost lists for {num_e} edges "
                         "(problem.edges.nodes)")
    enl = np.fromiter(map(len, enodes), dtype=np.int64, count=num_e)
    if (enl != 2).any():
        e = int(np.nonzero(enl != 2)[0][0])
        raise ValueError(f"problem.edges.nodes[{e}]: {enl[e]} nodes; only edges between exactly "
                         "2 nodes are supported")
    en = _flat_ints(enodes, "problem.edges.nodes", enl).reshape(num_e, 2)
    if num_e and int(en.max()) >= n:
        e = int(np.nonzero(en.max(axis=1) >= n)[0][0])
        raise ValueError(f"problem.edges.nodes[{e}]: node index {int(en[e].max())} out of range "
                         f"[0, {n})")
    ecl = np.fromiter(map(len, ecosts), dtype=np.int64, count=num_e)
    want = ks[en[:, 0]] * ks[en[:, 1]] if num_e else np.zeros(0, dtype=np.int64)
    if (ecl != want).any():
        e = int(np.nonzero(ecl != want)[0][0])
        a, b = int(en[e, 0]), int(en[e, 1])
        raise ValueError(f"problem.edges.costs[{e}]: {ecl[e]} entries, expected k_a*k_b = "
                         f"{ks[a]}*{ks[b]} = {want[e]} for nodes [{a}, {b}]")
    flat_e = _flat_ints(ecosts, "problem.edges.costs", ecl)

    limit = p.get("usage_limit")
    if limit is not None:
        limit = check_int(limit, "problem.usage_limit")

    off = np.cumsum(ks)[:-1]
    node_costs = np.split(flat_c, off)
    node_usages = np.split(flat_u, off)
    edge_costs = np.split(flat_e, np.cumsum(ecl)[:-1]) if num_e else []
    kb = ks[en[:, 1]].tolist() if num_e else []
    edge_costs = [m.reshape(-1, k) for m, k in zip(edge_costs, kb)]
    names = nodes.get("names")
    snames = nodes.get("strategy_names")
    prob = ShardingProblem(name=name, node_costs=node_costs, node_usages=node_usages,
                           intervals=iv, edge_nodes=en, edge_costs=edge_costs,
                           usage_limit=limit, node_names=names, strategy_names=snames)
    if names is not None or snames is not None:
        if names is not None and (not isinstance(names, list) or len(names) != n):
            raise ValueError("problem.nodes.names: expected one name per node")
        if snames is not None:
            if not isinstance(snames, list) or len(snames) != n:
                raise ValueError("problem.nodes.strategy_names: expected one list per node")
            for i, s in enumerate(snames):
                if not isinstance(s, list) or len(s) != ks[i]:
                    raise ValueError(f"problem.nodes.strategy_names[{i}]: expected {ks[i]} names")
    return prob


def problem_to_json_dict(problem: ShardingProblem) -> dict:
    """The contest JSON object (``{"problem": ...}``) for ``problem``."""
    nodes = {
        "intervals": np.asarray(problem.intervals, dtype=np.int64).tolist(),
        "costs": [np.asarray(c).tolist() for c in problem.node_costs],
        "usages": [np.asarray(u).tolist() for u in problem.node_usages],
    }
    if problem.node_names is not None:
        nodes["names"] = list(problem.node_names)
    if problem.strategy_names is not None:
        nodes["strategy_names"] = [list(s) for s in problem.strategy_names]
    edges = {
        "nodes": np.asarray(problem.edge_nodes, dtype=np.int64).reshape(-1, 2).tolist(),
        "costs": [np.asarray(m).ravel().tolist() for m in problem.edge_costs],
    }
    p = {"name": problem.name, "nodes": nodes, "edges": edges}
    if problem.usage_limit is not None:
        p["usage_limit"] = int(problem.usage_limit)
    return {"problem": p}


def _open_text(path, mode: str):
    path = os.fspath(path)
    if path.endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def read_iopddl(path_or_file) -> ShardingProblem:
    """Read an IOPDDL problem from a path (``.json`` or ``.json.gz``) or an open file."""
    try:
        if hasattr(path_or_file, "read"):
            data = path_or_file.read()
            if isinstance(data, bytes):
                if data[:2] == b"\x1f\x8b":
                    data = gzip.decompress(data)
                data = data.decode("utf-8")
            d = json.loads(data)
        else:
            path = os.fspath(path_or_file)
            with open(path, "rb") as fb:
                gz = fb.read(2) == b"\x1f\x8b"
            opener = gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")
            with opener as f:
                d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"malformed JSON ({e}); is the file truncated?") from e
    except (EOFError, gzip.BadGzipFile) as e:
        raise ValueError(f"malformed gzip data ({e}); is the file truncated?") from e
    return problem_from_json_dict(d)


def write_iopddl(problem: ShardingProblem, path) -> None:
    """Write ``problem`` in the contest format; gzipped when ``path`` ends with ``.gz``."""
    problem.validate()
    d = problem_to_json_dict(problem)
    with _open_text(path, "w") as f:
        json.dump(d, f, separators=(",", ":"))
        f.write("\n")


"""The intra-operator sharding problem as a plain data object.

One object serves the compiler (the auto-sharding pass builds it), the IOPDDL
files (``iopddl.py`` reads and writes it), the evaluator and the solvers, so a
problem from a real model can be saved, shared and re-solved outside the
compiler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INF_COST = 10**18
"""A cost at or above this value forbids a strategy or a strategy pair (IOPDDL convention)."""

INT64_MAX = 2**63 - 1


def check_int(value, field_name: str) -> int:
    """``value`` as a non-negative int that fits int64, or ValueError naming the field."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{field_name}: expected an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{field_name}: negative value {value}")
    if value > INT64_MAX:
        raise ValueError(f"{field_name}: value {value} overflows int64")
    return int(value)


def _check_int_array(arr, field_name: str, *, ndim: int | None = None) -> np.ndarray:
    """Return ``arr`` as int64, or raise ValueError naming the field."""
    a = np.asarray(arr)
    if a.dtype == object or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"{field_name}: expected integers, got {a.dtype} values")
    if a.dtype.kind == "u" and a.size and int(a.max()) > INT64_MAX:
        raise ValueError(f"{field_name}: value {int(a.max())} overflows int64")
    a = a.astype(np.int64, copy=False)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{field_name}: expected a {ndim}-d array, got shape {a.shape}")
    if a.size and int(a.min()) < 0:
        raise ValueError(f"{field_name}: negative value {int(a.min())}")
    return a


def _normalise_list(items, field_name: str, ndim: int | None) -> list[np.ndarray]:
    """int64 arrays for every entry, checked; fast when they already are."""
    items = list(items)
    fast = all(type(a) is np.ndarray and a.dtype == np.int64 and (ndim is None or a.ndim == ndim)
               for a in items)
    if not fast:
        items = [_check_int_array(a, f"{field_name}[{i}]", ndim=ndim) for i, a in enumerate(items)]
        return items
    if items:
        flat = np.concatenate([a.ravel() for a in items])
        if flat.size and int(flat.min()) < 0:
            for i, a in enumerate(items):
                if a.size and int(a.min()) < 0:
                    raise ValueError(f"{field_name}[{i}]: negative value {int(a.min())}")
    return items


@dataclass
class ShardingProblem:
    """Pick one strategy per node; minimise node + edge costs under a memory limit.

    ``node_costs[i][s]`` / ``node_usages[i][s]``: cost and memory of strategy s of
    node i; node i is live on the half-open interval ``intervals[i] = [lo, hi)``.
    ``edge_costs[e][sa, sb]`` is the resharding cost of edge ``edge_nodes[e] = (a, b)``
    (rows belong to the first node). At every time t the summed usage of the live
    nodes must be at most ``usage_limit`` (None: unlimited). Costs at or above
    ``INF_COST`` forbid that choice.
    """

    name: str
    node_costs: list[np.ndarray]
    node_usages: list[np.ndarray]
    intervals: np.ndarray
    edge_nodes: np.ndarray
    edge_costs: list[np.ndarray]
    usage_limit: int | None = None
    node_names: list[str] | None = None
    strategy_names: list[list[str]] | None = None

    @property
    def num_nodes(self) -> int:
        return len(self.node_costs)

    @property
    def num_edges(self) -> int:
        return len(self.edge_costs)

    @property
    def num_strategies(self) -> np.ndarray:
        """k_i for every node (int64 array)."""
        return np.fromiter(map(len, self.node_costs), dtype=np.int64, count=self.num_nodes)

    def validate(self) -> None:
        """Check shapes, types and ranges; raise ValueError naming the bad field.

        Entries are normalised in place to int64 numpy arrays (edge matrices to
        2-d); already-normalised problems are checked with whole-array operations.
        """
        if not isinstance(self.name, str):
            raise ValueError("name: expected a string")
        n = len(self.node_costs)
        if n == 0:
            raise ValueError("node_costs: the problem has no nodes")
        if len(self.node_usages) != n:
            raise ValueError(f"node_usages: {len(self.node_usages)} entries for {n} nodes")
        self.node_costs = _normalise_list(self.node_costs, "node_costs", ndim=1)
        self.node_usages = _normalise_list(self.node_usages, "node_usages", ndim=1)
        ks = np.fromiter(map(len, self.node_costs), dtype=np.int64, count=n)
        if int(ks.min()) == 0:
            i = int(np.argmin(ks))
            raise ValueError(f"node_costs[{i}]: node {i} has no strategies")
        ku = np.fromiter(map(len, self.node_usages), dtype=np.int64, count=n)
        if not np.array_equal(ks, ku):
            i = int(np.nonzero(ks != ku)[0][0])
            raise ValueError(f"node_usages[{i}]: {ku[i]} usages for {ks[i]} strategies (node_costs[{i}])")
        iv = _check_int_array(self.intervals, "intervals", ndim=2)
        if iv.shape != (n, 2):
            raise ValueError(f"intervals: expected shape ({n}, 2), got {iv.shape}")
        bad = np.nonzero(iv[:, 0] > iv[:, 1])[0]
        if bad.size:
            i = int(bad[0])
            raise ValueError(f"intervals[{i}]: lower {iv[i, 0]} > upper {iv[i, 1]}")
        self.intervals = iv
        en = np.asarray(self.edge_nodes)
        if en.size == 0:
            en = np.zeros((0, 2), dtype=np.int64)
        en = _check_int_array(en, "edge_nodes", ndim=2)
        if en.shape[1] != 2:
            raise ValueError(f"edge_nodes: expected shape (E, 2), got {en.shape}")
        if len(self.edge_costs) != en.shape[0]:
            raise ValueError(
                f"edge_costs: {len(self.edge_costs)} matrices for {en.shape[0]} edges (edge_nodes)")
        if en.size and int(en.max()) >= n:
            e = int(np.argmax(en.max(axis=1)))
            raise ValueError(f"edge_nodes[{e}]: node index {int(en[e].max())} out of range [0, {n})")
        self.edge_nodes = en
        self.edge_costs = _normalise_list(self.edge_costs, "edge_costs", ndim=None)
        E = en.shape[0]
        if E:
            want_a, want_b = ks[en[:, 0]], ks[en[:, 1]]
            sizes = np.fromiter((m.size for m in self.edge_costs), dtype=np.int64, count=E)
            bad = np.nonzero(sizes != want_a * want_b)[0]
            if bad.size == 0:
                shapes_ok = all(m.ndim == 2 and m.shape[1] == kb
                                for m, kb in zip(self.edge_costs, want_b.tolist()))
                if not shapes_ok:
                    self.edge_costs = [m.reshape(ka, kb) for m, ka, kb in
                                       zip(self.edge_costs, want_a.tolist(), want_b.tolist())]
            else:
                e = int(bad[0])
                a, b = int(en[e, 0]), int(en[e, 1])
                raise ValueError(
                    f"edge_costs[{e}]: shape {self.edge_costs[e].shape}, expected "
                    f"({want_a[e]}, {want_b[e]}) for nodes {a} (k={want_a[e]}) and {b} (k={want_b[e]})")
        if self.usage_limit is not None:
            self.usage_limit = check_int(self.usage_limit, "usage_limit")
        if self.node_names is not None and len(self.node_names) != n:
            raise ValueError(f"node_names: {len(self.node_names)} names for {n} nodes")
        if self.strategy_names is not None:
            if len(self.strategy_names) != n:
                raise ValueError(f"strategy_names: {len(self.strategy_names)} lists for {n} nodes")
            for i, names in enumerate(self.strategy_names):
                if len(names) != ks[i]:
                    raise ValueError(
                        f"strategy_names[{i}]: {len(names)} names for {int(ks[i])} strategies")

    def min_usage_assignment(self) -> np.ndarray:
        """Per node, the strategy of least usage (lowest index on ties).

        Usage is separable per node and non-negative, so this assignment reaches the
        smallest load at every time point at once: its peak is the smallest peak any
        assignment can reach.
        """
        return np.array([int(np.argmin(u)) for u in self.node_usages], dtype=np.int64)


@dataclass
class FlatProblem:
    """The problem in concatenated arrays, for vectorized evaluation and solving.

    Strategy s of node i lives at ``node_off[i] + s`` in ``cost``/``usage``; entry
    (sa, sb) of edge e at ``edge_off[e] + sa * ks[edge_b[e]] + sb`` in ``edge_cost``.
    """

    ks: np.ndarray
    node_off: np.ndarray
    cost: np.ndarray
    usage: np.ndarray
    intervals: np.ndarray
    edge_a: np.ndarray
    edge_b: np.ndarray
    edge_off: np.ndarray
    edge_cost: np.ndarray
    usage_limit: int | None

    @property
    def num_nodes(self) -> int:
        return len(self.ks)

    @property
    def num_edges(self) -> int:
        return len(self.edge_a)


def flatten(problem: ShardingProblem) -> FlatProblem:
    """Concatenate a (validated) problem's arrays; see FlatProblem."""
    ks = problem.num_strategies
    node_off = np.zeros(len(ks) + 1, dtype=np.int64)
    np.cumsum(ks, out=node_off[1:])
    cost = np.concatenate([np.asarray(c, dtype=np.int64).ravel() for c in problem.node_costs])
    usage = np.concatenate([np.asarray(u, dtype=np.int64).ravel() for u in problem.node_usages])
    en = np.asarray(problem.edge_nodes, dtype=np.int64).reshape(-1, 2)
    sizes = np.fromiter((np.size(m) for m in problem.edge_costs), dtype=np.int64,
                        count=len(problem.edge_costs))
    edge_off = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=edge_off[1:])
    if len(sizes):
        edge_cost = np.concatenate([np.asarray(m, dtype=np.int64).ravel() for m in problem.edge_costs])
    else:
        edge_cost = np.zeros(0, dtype=np.int64)
    return FlatProblem(ks=ks, node_off=node_off, cost=cost, usage=usage,
                       intervals=np.asarray(problem.intervals, dtype=np.int64).reshape(-1, 2),
                       edge_a=en[:, 0].copy(), edge_b=en[:, 1].copy(), edge_off=edge_off,
                       edge_cost=edge_cost, usage_limit=problem.usage_limit)

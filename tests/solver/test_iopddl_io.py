"""Reading and writing the IOPDDL format, and the errors bad files get."""

import gzip
import io
import json

import numpy as np
import pytest

from _problems import EXAMPLE, instance, random_problem
from meshweave.passes.solver import INF_COST, ShardingProblem, read_iopddl, write_iopddl
from meshweave.passes.solver.iopddl import problem_from_json_dict


def example_dict():
    with open(EXAMPLE) as f:
        return json.load(f)


def test_read_example():
    p = read_iopddl(EXAMPLE)
    assert p.name == "example"
    assert p.num_nodes == 5 and p.num_edges == 5
    assert p.usage_limit == 50
    assert [len(c) for c in p.node_costs] == [1, 2, 3, 2, 1]
    assert p.intervals.tolist() == [[30, 70], [40, 70], [50, 120], [110, 140], [110, 150]]
    # row-major: edge (1, 3) has k_1 = 2 rows, k_3 = 2 columns
    assert p.edge_costs[2].tolist() == [[90, 10], [20, 80]]
    assert p.edge_costs[1].shape == (1, 3)


def test_read_gzip_and_file_objects(tmp_path):
    raw = open(EXAMPLE, "rb").read()
    gz = tmp_path / "ex.json.gz"
    gz.write_bytes(gzip.compress(raw))
    named_oddly = tmp_path / "ex.data"          # gzip is detected by content, not name
    named_oddly.write_bytes(gzip.compress(raw))
    for src in (gz, named_oddly, io.BytesIO(raw), io.StringIO(raw.decode())):
        p = read_iopddl(src)
        assert p.num_nodes == 5 and p.usage_limit == 50


@pytest.mark.parametrize("suffix", [".json", ".json.gz"])
def test_write_read_roundtrip(tmp_path, suffix):
    p = random_problem(np.random.default_rng(3), 9)
    p.node_names = [f"n{i}" for i in range(p.num_nodes)]
    p.strategy_names = [[f"s{j}" for j in range(len(c))] for c in p.node_costs]
    path = tmp_path / ("p" + suffix)
    write_iopddl(p, path)
    q = read_iopddl(path)
    assert q.name == p.name and q.usage_limit == p.usage_limit
    assert q.node_names == p.node_names and q.strategy_names == p.strategy_names
    assert np.array_equal(q.intervals, p.intervals)
    assert np.array_equal(q.edge_nodes, p.edge_nodes)
    for a, b in zip(q.node_costs + q.node_usages + q.edge_costs, p.node_costs + p.node_usages + p.edge_costs):
        assert np.array_equal(a, b)
    if suffix.endswith(".gz"):
        assert open(path, "rb").read(2) == b"\x1f\x8b"


def test_written_file_is_contest_format(tmp_path):
    p = read_iopddl(EXAMPLE)
    write_iopddl(p, tmp_path / "out.json")
    d = json.load(open(tmp_path / "out.json"))
    ref = example_dict()
    assert d["problem"]["edges"] == ref["problem"]["edges"]
    assert d["problem"]["nodes"] == ref["problem"]["nodes"]
    assert d["problem"]["usage_limit"] == 50


def test_no_usage_limit():
    d = example_dict()
    del d["problem"]["usage_limit"]
    assert problem_from_json_dict(d).usage_limit is None


def _mutate(path, value):
    d = example_dict()
    obj = d["problem"]
    for key in path[:-1]:
        obj = obj[key]
    if value is _DELETE:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path,value,field", [
    (("nodes", "costs", 1), [55], "problem.nodes.usages[1]"),                  # k mismatch
    (("nodes", "usages", 2), [15, 20], "problem.nodes.usages[2]"),
    (("nodes", "costs", 0), [], "problem.nodes.costs[0]"),
    (("nodes", "costs", 3), [85, -75], "problem.nodes.costs[3][1]"),
    (("nodes", "usages", 0), [2**63], "problem.nodes.usages[0][0]"),
    (("nodes", "costs", 4), [9.5], "problem.nodes.costs[4][0]"),
    (("nodes", "costs", 4), ["95"], "problem.nodes.costs[4][0]"),
    (("nodes", "intervals", 2), [120, 50], "problem.nodes.intervals[2]"),
    (("nodes", "intervals", 2), [50], "problem.nodes.intervals[2]"),
    (("nodes", "intervals", 1), [-1, 70], "problem.nodes.intervals[1][0]"),
    (("edges", "costs", 2), [90, 10, 20], "problem.edges.costs[2]"),
    (("edges", "costs", 0), [30, 1 << 64], "problem.edges.costs[0][1]"),
    (("edges", "nodes", 3), [2, 9], "problem.edges.nodes[3]"),
    (("edges", "nodes", 3), [2, 3, 4], "problem.edges.nodes[3]"),
    (("edges", "nodes"), [[0, 1]], "problem.edges.costs"),
    (("usage_limit",), -5, "problem.usage_limit"),
    (("usage_limit",), 2**64, "problem.usage_limit"),
    (("usage_limit",), 50.5, "problem.usage_limit"),
    (("nodes", "usages"), _DELETE, "problem.nodes.usages"),
    (("edges",), _DELETE, "problem.edges"),
    (("nodes", "costs"), "abc", "problem.nodes.costs"),
])
def test_bad_fields_are_named(path, value, field):
    with pytest.raises(ValueError) as err:
        problem_from_json_dict(_mutate(path, value))
    assert field in str(err.value)


def test_truncated_and_malformed_files(tmp_path):
    raw = open(EXAMPLE, "rb").read()
    cut = tmp_path / "cut.json"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="malformed JSON"):
        read_iopddl(cut)
    gz = gzip.compress(raw)
    cutgz = tmp_path / "cut.json.gz"
    cutgz.write_bytes(gz[: len(gz) // 2])
    with pytest.raises(ValueError, match="truncated"):
        read_iopddl(cutgz)
    notobj = tmp_path / "list.json"
    notobj.write_text("[1, 2]")
    with pytest.raises(ValueError, match="problem"):
        read_iopddl(notobj)


def test_validate_names_bad_fields():
    def make(**over):
        kw = dict(name="t", node_costs=[np.array([1, 2]), np.array([3])],
                  node_usages=[np.array([1, 1]), np.array([2])], intervals=np.array([[0, 2], [1, 3]]),
                  edge_nodes=np.array([[0, 1]]), edge_costs=[np.array([[1], [INF_COST]])], usage_limit=5)
        kw.update(over)
        return ShardingProblem(**kw)

    make().validate()
    cases = [
        (dict(node_usages=[np.array([1]), np.array([2])]), "node_usages[0]"),
        (dict(node_costs=[np.array([1, -2]), np.array([3])]), "node_costs[0]"),
        (dict(node_costs=[np.array([1.5, 2]), np.array([3])]), "node_costs[0]"),
        (dict(intervals=np.array([[0, 2]])), "intervals"),
        (dict(intervals=np.array([[3, 2], [1, 3]])), "intervals[0]"),
        (dict(edge_nodes=np.array([[0, 2]])), "edge_nodes[0]"),
        (dict(edge_costs=[np.array([[1, 2], [3, 4]])]), "edge_costs[0]"),
        (dict(edge_costs=[]), "edge_costs"),
        (dict(usage_limit=-1), "usage_limit"),
        (dict(node_names=["a"]), "node_names"),
        (dict(strategy_names=[["a"], ["b"]]), "strategy_names[0]"),
    ]
    for over, field in cases:
        with pytest.raises(ValueError) as err:
            make(**over).validate()
        assert field in str(err.value), (over, str(err.value))


def test_flat_edge_costs_are_reshaped():
    p = ShardingProblem(name="t", node_costs=[np.array([1, 2]), np.array([3, 4, 5])],
                        node_usages=[np.array([0, 0]), np.array([0, 0, 0])],
                        intervals=np.array([[0, 1], [0, 1]]), edge_nodes=np.array([[0, 1]]),
                        edge_costs=[np.arange(6)])
    p.validate()
    assert p.edge_costs[0].shape == (2, 3)


@pytest.mark.slow
def test_read_the_largest_bundled_instance():
    p = read_iopddl(instance("A"))
    assert p.num_nodes == 34932 and p.num_edges == 54801
    assert int(p.num_strategies.sum()) == 213736

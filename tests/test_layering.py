"""Layering: the solver is a standalone package (no jax, no MLIR), passes load lazily by name,
and runtime backends load by name."""
import subprocess
import sys

import numpy as np
import pytest

JAX_FREE = """
import sys
{body}
loaded = sorted(m for m in ("jax", "jaxlib", "meshweave.passes.registry") if m in sys.modules)
print("LOADED", loaded)
"""


def _loaded(body: str) -> str:
    p = subprocess.run([sys.executable, "-c", JAX_FREE.format(body=body)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1]


def test_importing_the_solver_imports_neither_jax_nor_mlir():
    assert _loaded("import meshweave.passes.solver") == "LOADED []"


def test_meshweave_solve_runs_without_jax(tmp_path):
    from meshweave.passes.solver import ShardingProblem, write_iopddl

    problem = ShardingProblem(
        name="tiny", node_costs=[np.array([3, 1]), np.array([2, 5])], node_usages=[np.array([1, 1])] * 2,
        intervals=np.array([[0, 1], [0, 1]]), edge_nodes=np.array([[0, 1]]),
        edge_costs=[np.array([[0, 9], [9, 0]])], usage_limit=None)
    path = tmp_path / "example.json"
    write_iopddl(problem, str(path))
    body = (f"from meshweave.cli.solve import main\n"
            f"code = main([{str(path)!r}, '5', '--quiet'])\n"
            f"assert code == 0, code")
    assert _loaded(body) == "LOADED []"


def test_one_pass_loads_only_its_module():
    p = subprocess.run([sys.executable, "-c", "import sys\nfrom meshweave.passes.registry import get_pass\n"
                        "get_pass('strip-markers')\n"
                        "print(sorted(m for m in sys.modules if m.startswith('meshweave.passes.')))"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "meshweave.passes.strip_markers" in p.stdout and "auto_sharding" not in p.stdout, p.stdout


def test_every_listed_pass_module_registers_its_name():
    from meshweave.passes.registry import PASS_MODULES, REGISTRY, get_pass

    for name in PASS_MODULES:
        assert get_pass(name).name == name
    assert set(PASS_MODULES) <= set(REGISTRY)
    assert len(PASS_MODULES) == 24


def test_unknown_pass_suggests_close_names():
    from meshweave.passes.registry import PassOptionError, get_pass

    with pytest.raises(PassOptionError, match="did you mean auto-sharding"):
        get_pass("auto-shard")


def test_backend_registry_loads_by_name():
    from meshweave.runtime.backends import BACKENDS, BackendUnavailable, load_backend, register_backend
    from meshweave.runtime.executor import Backend

    assert isinstance(load_backend("local"), Backend)
    register_backend("nowhere", "meshweave.runtime.no_such_backend:Backend")
    try:
        with pytest.raises(BackendUnavailable, match="not implemented yet or not installed"):
            load_backend("nowhere")
    finally:
        del BACKENDS["nowhere"]
    with pytest.raises(ValueError, match="'local'"):
        load_backend("slurm")

"""The solver package imports neither jax nor MLIR (meshweave-solve must start without them)."""

import ast
import subprocess
import sys
from pathlib import Path

SOLVER = Path(__file__).resolve().parents[2] / "passes" / "solver"
FORBIDDEN = ("jax", "jaxlib", "mlir", "meshweave.dialects", "meshweave.plugin")


def test_no_solver_module_imports_jax_or_mlir():
    files = sorted(SOLVER.glob("*.py"))
    assert len(files) >= 15
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{f.name} imports {name}"


def test_solving_loads_no_jax_module():
    """Import and run the solver with the parent package's own __init__ bypassed (the pass
    registry there loads MLIR), then look at sys.modules."""
    code = f"""
import importlib.util, sys, types
import meshweave
spec = importlib.util.find_spec("meshweave.passes")
pkg = types.ModuleType("meshweave.passes")
pkg.__path__ = list(spec.submodule_search_locations)
sys.modules["meshweave.passes"] = pkg
from meshweave.passes.solver import read_iopddl, solve
p = read_iopddl({str(SOLVER.parents[1] / "tests" / "data" / "iopddl" / "example.json")!r})
assert solve(p, 5, workers=1).cost == 445
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "mlir"))
print(bad)
assert not bad, bad
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + p.stdout

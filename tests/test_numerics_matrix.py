"""The numerics matrix (opt-in: pytest -m slow): every zoo model x method x mesh configuration of
benchmarks/numerics_matrix.py equals single-device jax.jit. The benchmark script writes the JSON
report with the fidelity row of each configuration."""
import importlib.util
import os
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "numerics_matrix.py")
_spec = importlib.util.spec_from_file_location("numerics_matrix", _PATH)
matrix = sys.modules["numerics_matrix"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)

CONFIGS = matrix.default_configs()


def test_matrix_has_at_least_sixty_configurations():
    assert len(CONFIGS) >= 60 and len(set(CONFIGS)) == len(CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("model,method,mesh", CONFIGS, ids=[f"{a}-{b}-{c[0]}x{c[1]}" for a, b, c in CONFIGS])
def test_configuration_equals_jit(model, method, mesh):
    row = matrix.run_config(model, method, mesh)
    assert row.error is None, row.error
    assert row.equal, f"max |error| {row.max_abs_error}"

"""Bazel-only checks (//:smoke_test): the staged sources are what gets imported,
every package of pyproject.toml is in the staged tree, and jaxlib's MLIR
bindings parse StableHLO. Not collected by plain pytest (outside tests/)."""
import importlib
import os
import sys
import tomllib

import pytest

pytestmark = pytest.mark.skipif(
    "TEST_SRCDIR" not in os.environ, reason="only meaningful under `bazel test`"
)


def _pyproject():
    with open("pyproject.toml", "rb") as f:  # cwd is the workspace's runfiles dir
        return tomllib.load(f)


def _staged_root():
    return os.path.join(os.path.abspath(os.environ["TEST_SRCDIR"]), os.environ["TEST_WORKSPACE"], "_staged")


def test_meshweave_is_imported_from_the_staged_tree():
    import meshweave

    path = os.path.abspath(meshweave.__file__)
    assert path == os.path.join(_staged_root(), "meshweave", "__init__.py"), path
    # The staged files are copies in Bazel's output tree, not links to the sources.
    real = os.path.realpath(path)
    assert os.path.join("python", "meshweave") not in real, real
    assert "/bazel-out/" in real, real


def test_subprocesses_import_the_staged_tree_too():
    # lit runs `python -m meshweave.cli.opt`: Bazel's PYTHONPATH must win over the install.
    import subprocess

    out = subprocess.run([sys.executable, "-c", "import meshweave; print(meshweave.__file__)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    assert os.path.abspath(out) == os.path.join(_staged_root(), "meshweave", "__init__.py"), out


def test_no_editable_finder_for_meshweave():
    for finder in sys.meta_path:
        module = sys.modules.get(getattr(finder, "__module__", ""), None)
        assert "meshweave" not in getattr(module, "MAPPING", {}), finder


@pytest.mark.parametrize("package", _pyproject()["tool"]["setuptools"]["packages"]
                         if os.path.exists("pyproject.toml") else [])
def test_every_package_is_staged(package):
    mod = importlib.import_module(package)
    expected = os.path.join(_staged_root(), *package.split("."), "__init__.py")
    assert os.path.abspath(mod.__file__) == expected, (
        f"{package} imported from {mod.__file__}; is its folder in pyproject's package-dir?"
    )


def test_jaxlib_mlir_parses_stablehlo():
    import jax
    import jax.numpy as jnp
    from jaxlib.mlir import ir

    lowered = jax.jit(lambda x: jnp.sin(x) @ x.T).lower(jnp.ones((4, 4), jnp.float32))
    text = lowered.as_text()
    # Parse a private copy in the context of the lowering (never mutate compiler_ir()).
    module = ir.Module.parse(text, context=lowered.compiler_ir("stablehlo").context)
    assert module.operation.verify()
    names = []

    def visit(op):
        names.append(op.name)
        return ir.WalkResult.ADVANCE

    module.operation.walk(visit)
    assert "stablehlo.sine" in names and "stablehlo.dot_general" in names, names

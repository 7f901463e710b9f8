"""Packaging checks: pyproject.toml's package list and the component folders agree.

pyproject.toml maps the component folders onto `meshweave` with setuptools
`package-dir` and lists the packages explicitly, so a new subpackage folder
that is not added to `packages` would silently be left out of the wheel.
"""
import os
import tomllib
from pathlib import Path

import pytest

# Not resolved: under Bazel this is the runfiles tree (declared files only).
ROOT = Path(os.path.abspath(__file__)).parents[1]
CONSOLE_SCRIPTS = ("meshweave-opt", "meshweave-solve")


@pytest.fixture(scope="module")
def pyproject():
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def _package_dir(pyproject):
    return pyproject["tool"]["setuptools"]["package-dir"]


def _packages_on_disk(package_dir):
    """{dotted package name: folder} for every folder with an __init__.py."""
    found = {}
    for pkg, folder in package_dir.items():
        base = ROOT / folder
        for init in sorted(base.rglob("__init__.py")):
            rel = init.parent.relative_to(base)
            if "__pycache__" in rel.parts:
                continue
            name = ".".join((pkg, *rel.parts))
            found.setdefault(name, init.parent)
    return found


def test_component_folders_are_packages(pyproject):
    for pkg, folder in _package_dir(pyproject).items():
        assert (ROOT / folder / "__init__.py").is_file(), (
            f"package-dir maps {pkg!r} to {folder!r}, which has no __init__.py"
        )


def test_every_subpackage_is_listed(pyproject):
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    on_disk = _packages_on_disk(_package_dir(pyproject))
    missing = sorted(set(on_disk) - listed)
    assert not missing, (
        "folders with an __init__.py that pyproject.toml [tool.setuptools] packages "
        f"does not list (they would be left out of the wheel): "
        + ", ".join(f"{name} ({on_disk[name].relative_to(ROOT)})" for name in missing)
    )


def test_every_listed_package_exists(pyproject):
    on_disk = _packages_on_disk(_package_dir(pyproject))
    stale = sorted(set(pyproject["tool"]["setuptools"]["packages"]) - set(on_disk))
    assert not stale, f"pyproject.toml lists packages with no folder/__init__.py: {stale}"


@pytest.mark.parametrize("script", CONSOLE_SCRIPTS)
def test_console_script_declared(pyproject, script):
    scripts = pyproject["project"].get("scripts", {})
    assert script in scripts, f"[project.scripts] does not declare {script}"
    module, sep, func = scripts[script].partition(":")
    assert sep and func, f"{script} = {scripts[script]!r} is not 'module:function'"
    package = module.rpartition(".")[0]
    assert package in pyproject["tool"]["setuptools"]["packages"], (
        f"{script} points into {package}, which is not a listed package"
    )

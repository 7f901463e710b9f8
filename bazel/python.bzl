"""Repository rules around the local Python interpreter (nothing is downloaded).

local_python: registers the interpreter as the py toolchain. The interpreter is
$PYTHON_BIN_PATH, else <workspace>/.venv/bin/python if it exists, else the
first `python3` on $PATH. The path is kept as given (a venv's bin/python is a
symlink and only behaves as the venv when run through it).

pyproject_config: reads pyproject.toml with that interpreter (tomllib) and
exposes @<name>//:defs.bzl with PROJECT_NAME, VERSION, PACKAGES and
PACKAGE_DIR, so BUILD never repeats the package-dir mapping.
"""

_TOOLCHAIN_BUILD = '''
load("@bazel_tools//tools/python:toolchain.bzl", "py_runtime_pair")

py_runtime(
    name = "py3_runtime",
    interpreter_path = "{python}",
    python_version = "PY3",
    # The launcher stub would otherwise need a `python` on PATH.
    stub_shebang = "#!{python}",
)

py_runtime_pair(
    name = "runtime_pair",
    py3_runtime = ":py3_runtime",
)

toolchain(
    name = "toolchain",
    toolchain = ":runtime_pair",
    toolchain_type = "@bazel_tools//tools/python:toolchain_type",
)
'''

def _find_python(rctx):
    python = rctx.os.environ.get("PYTHON_BIN_PATH", "")
    if not python:
        venv = rctx.path(Label("//:WORKSPACE")).dirname.get_child(".venv").get_child("bin").get_child("python")
        if venv.exists:
            python = str(venv)
    if not python:
        found = rctx.which("python3")
        if not found:
            fail("No python3 on PATH and no .venv; run scripts/setup.sh or set PYTHON_BIN_PATH")
        python = str(found)
    return python

def _local_python_impl(rctx):
    python = _find_python(rctx)
    res = rctx.execute([python, "-c", "import sys; print(sys.version.split()[0])"])
    if res.return_code != 0:
        fail("Cannot run %s: %s" % (python, res.stderr))
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", _TOOLCHAIN_BUILD.format(python = python))
    rctx.file("version.txt", res.stdout)

local_python = repository_rule(
    implementation = _local_python_impl,
    environ = ["PYTHON_BIN_PATH", "PATH"],
    local = True,
)

_READ_PYPROJECT = """
import json, sys, tomllib
with open(sys.argv[1], "rb") as f:
    data = tomllib.load(f)
st = data.get("tool", {}).get("setuptools", {})
print(json.dumps({
    "name": data["project"]["name"],
    "version": data["project"]["version"],
    "packages": st.get("packages", []),
    "package_dir": st.get("package-dir", {}),
}))
"""

def _pyproject_config_impl(rctx):
    python = _find_python(rctx)

    # Resolving the file through a Label makes it an input of this repository:
    # editing pyproject.toml re-runs the rule.
    pyproject = rctx.path(Label("//:pyproject.toml"))
    res = rctx.execute([python, "-c", _READ_PYPROJECT, str(pyproject)])
    if res.return_code != 0:
        fail("Cannot read %s with %s: %s" % (pyproject, python, res.stderr))
    cfg = json.decode(res.stdout)
    lines = [
        "# Generated from pyproject.toml by //bazel:python.bzl%pyproject_config.",
        "PROJECT_NAME = %r" % cfg["name"],
        "VERSION = %r" % cfg["version"],
        "PACKAGES = %r" % cfg["packages"],
        "PACKAGE_DIR = %r" % cfg["package_dir"],
        "",
    ]
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    rctx.file("BUILD", "")
    rctx.file("defs.bzl", "\n".join(lines))

pyproject_config = repository_rule(
    implementation = _pyproject_config_impl,
    environ = ["PYTHON_BIN_PATH"],
)

"""Entry point of py_pytest targets: runs pytest on the files given as args.

Usage (from bazel/pytest.bzl): pytest_main.py --pytest-config=FILE [ARGS...] TESTFILE...
"""
import os
import sys


def _drop_editable_finder():
    """Make sure `meshweave` can only come from the staged tree.

    An editable install (`pip install -e .`) of meshweave in the interpreter's
    venv adds a meta-path finder that maps meshweave.* onto the source folders.
    It sits after the normal path finder, but it would silently serve any
    module missing from the staged tree; drop it.
    """
    for finder in list(sys.meta_path):
        module = sys.modules.get(getattr(finder, "__module__", ""), None)
        mapping = getattr(module, "MAPPING", None)
        if isinstance(mapping, dict) and any(
            k == "meshweave" or k.startswith("meshweave.") for k in mapping
        ):
            sys.meta_path.remove(finder)


def main(argv):
    config = None
    rest = []
    for a in argv:
        if a.startswith("--pytest-config="):
            config = a.split("=", 1)[1]
        else:
            rest.append(a)
    files = [a for a in rest if a.endswith(".py")]
    if not files:
        print("pytest_main: no test files in this target (nothing to run)")
        return 0

    _drop_editable_finder()
    # Like an activated venv: console scripts of the interpreter's venv (lit,
    # filecheck, ...) are on PATH for subprocesses. Bazel's strict action env
    # gives only /bin:/usr/bin otherwise.
    bindir = os.path.dirname(sys.executable)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")

    import pytest

    args = ["-p", "no:cacheprovider", "-q", "--rootdir", os.getcwd()]
    if config:
        args += ["-c", config]
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append("--junitxml=" + xml)
    rc = pytest.main(args + rest)
    # 5 = no tests collected (e.g. every test of the target is marked slow).
    return 0 if rc == 5 else int(rc)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

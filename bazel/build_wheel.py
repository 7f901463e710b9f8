"""Builds the wheel from the listed source files, offline, without isolation.

Usage: build_wheel.py OUT.whl FILE...
FILE paths are relative to the execroot; the directory of the first
pyproject.toml among them is the project root. The interpreter's environment
needs setuptools and wheel (the [build-system] requirements).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile


def main(argv):
    out, files = argv[0], argv[1:]
    root = next(os.path.dirname(f) for f in files if os.path.basename(f) == "pyproject.toml")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        for f in files:
            dst = os.path.join(src, os.path.relpath(f, root or "."))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copyfile(f, dst)
        dist = os.path.join(tmp, "dist")
        env = dict(os.environ)
        env.setdefault("SOURCE_DATE_EPOCH", "315532800")  # reproducible zip timestamps
        env.setdefault("HOME", tmp)
        env["PIP_NO_INDEX"] = "1"
        subprocess.check_call(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--no-cache-dir", "-q", "-w", dist, src],
            env=env,
        )
        wheels = glob.glob(os.path.join(dist, "*.whl"))
        if len(wheels) != 1:
            sys.exit("expected one wheel, got %r" % wheels)
        if os.path.basename(wheels[0]) != os.path.basename(out):
            sys.exit("built %s but BUILD declares %s" % (os.path.basename(wheels[0]), os.path.basename(out)))
        shutil.copyfile(wheels[0], out)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Runs the lit + FileCheck pass suite (tests/lit) as part of pytest."""
import os
import subprocess
import sys
import tempfile

LIT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lit")


def test_lit_suite():
    # lit and filecheck are test dependencies: missing, this fails (a skip would hide the suite).
    import filecheck  # noqa: F401
    import lit  # noqa: F401

    with tempfile.TemporaryDirectory() as out:
        env = dict(os.environ, MESHWEAVE_LIT_OUT=out)
        proc = subprocess.run([sys.executable, "-c", "from lit.main import main; main()", "-q", "-sv", LIT_DIR], env=env,
                              capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


def test_every_meshweave_pass_has_a_lit_file():
    from meshweave.passes import list_passes
    from meshweave.passes.registry import UpstreamPass

    missing = [cls.name for cls in list_passes()
               if not issubclass(cls, UpstreamPass) and not os.path.exists(os.path.join(LIT_DIR, cls.name + ".mlir"))]
    assert not missing, f"passes without a lit test file in tests/lit: {missing}"

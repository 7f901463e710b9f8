# lit configuration for meshweave's pass tests: one .mlir file per pass, named after it.
# Tools run through the interpreter that runs lit, so the suite tests the package that is
# importable there (the editable install, the wheel, or Bazel's staged sources).
import os
import sys

import lit.formats

config.name = "meshweave"
config.test_format = lit.formats.ShTest(execute_external=False)
config.suffixes = [".mlir"]
config.excludes = ["Inputs", "expect_exit.py"]
config.test_source_root = os.path.dirname(os.path.abspath(__file__))
config.test_exec_root = os.path.join(os.environ.get("MESHWEAVE_LIT_OUT", config.test_source_root), "Output")

python = sys.executable
config.substitutions.append(("meshweave-opt", f"{python} -m meshweave.cli.opt"))
config.substitutions.append(("FileCheck", f"{python} -m filecheck"))
config.substitutions.append(("expect-exit", f"{python} {os.path.join(config.test_source_root, 'expect_exit.py')}"))

for var in ("PYTHONPATH", "HOME", "XLA_FLAGS", "JAX_PLATFORMS", "PATH", "TMPDIR"):
    if var in os.environ:
        config.environment[var] = os.environ[var]
config.environment.setdefault("JAX_PLATFORMS", "cpu")

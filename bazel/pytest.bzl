"""py_pytest: a py_test that runs pytest (with the project's pytest config) on files."""

def py_pytest(name, srcs, deps = [], data = [], args = [], pytest_config = "//:pyproject.toml", **kwargs):
    """Runs pytest on `srcs` through //bazel:pytest_main.py.

    The pytest config (pyproject.toml: markers, addopts `-m 'not slow'`, ...)
    is passed with -c, so it applies exactly as in a plain `pytest` run.
    An empty `srcs` gives a target that passes with "no test files".
    """
    native.py_test(
        name = name,
        srcs = srcs + ["//bazel:pytest_main.py"],
        main = "//bazel:pytest_main.py",
        args = ["--pytest-config=$(rootpath %s)" % pytest_config] + args +
               ["$(rootpath %s)" % s for s in srcs],
        deps = deps,
        data = data + [pytest_config],
        python_version = "PY3",
        srcs_version = "PY3",
        # Runfiles mirror the tree: no __init__.py files that are not in it,
        # so pytest sees the same packages as in a plain run.
        legacy_create_init = False,
        **kwargs
    )

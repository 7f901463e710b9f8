"""Stages the component folders into an importable `meshweave/...` tree.

pyproject.toml maps folders onto the package with setuptools `package-dir`
(python/meshweave -> meshweave, plugin -> meshweave.plugin, ...). That cannot
be expressed with sys.path entries, so the files are copied, by one genrule,
to <prefix>/meshweave/... in bazel-bin; a py_library with imports=[prefix]
makes that tree importable in runfiles. Tests depend on it and therefore import
the sources of the tree they are built from, never an installed copy.
"""

_EXCLUDE = [
    "**/__pycache__/**",
    "**/*.pyc",
    "**/*.pyo",
    "**/*.egg-info/**",
]

def component_files(package_dir):
    """All files of the mapped component folders (as a flat, sorted list)."""
    files = []
    for folder in sorted(package_dir.values()):
        files.extend(native.glob([folder + "/**"], exclude = _EXCLUDE))
    return sorted({f: None for f in files}.keys())

def _dest(package_dir, src):
    """Where `src` lands: the longest package-dir folder containing it wins."""
    best = None
    for pkg, folder in package_dir.items():
        if src.startswith(folder + "/") and (best == None or len(folder) > len(package_dir[best])):
            best = pkg
    if best == None:
        fail("%s is not under any package-dir folder" % src)
    return best.replace(".", "/") + "/" + src[len(package_dir[best]) + 1:]

def staged_py_package(name, package_dir, prefix = "_staged", visibility = None):
    """Defines <name> (py_library) and <name>_files (the genrule that copies).

    Args:
      name: name of the py_library.
      package_dir: {package: folder}, as in [tool.setuptools.package-dir].
      prefix: directory (relative to this package) that holds the staged tree.
      visibility: of the py_library.
    """
    srcs = component_files(package_dir)
    outs = [prefix + "/" + _dest(package_dir, s) for s in srcs]
    seen = {}
    for s, o in zip(srcs, outs):
        if o in seen:
            fail("%s and %s both stage to %s" % (seen[o], s, o))
        seen[o] = s
    native.genrule(
        name = name + "_files",
        srcs = srcs,
        outs = outs,
        cmd = "\n".join(["cp $(location %s) $(location %s)" % (s, o) for s, o in zip(srcs, outs)]) or "true",
        message = "Staging %d files of the %s package" % (len(srcs), name),
    )
    native.py_library(
        name = name,
        srcs = [o for o in outs if o.endswith(".py")],
        data = [o for o in outs if not o.endswith(".py")],
        imports = [prefix],
        visibility = visibility,
    )

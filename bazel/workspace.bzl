"""Offline stand-ins for the repositories that Bazel 4's default WORKSPACE
suffix would otherwise download from GitHub / Bazel's download mirror.

- @rules_cc, @rules_java: loaded by @bazel_tools itself (even for py rules);
  these forward to the native rules.
- @remote_coverage_tools: referenced by every *_test rule; `bazel coverage`
  is not supported with this stub (run `pytest --cov` outside Bazel).

Defining these repositories in WORKSPACE takes precedence over the suffix.
"""

_RULES_CC_DEFS = "\n".join([
    "def {0}(**attrs):\n    native.{0}(**attrs)\n".format(r)
    for r in [
        "cc_binary",
        "cc_import",
        "cc_library",
        "cc_test",
        "cc_proto_library",
        "cc_toolchain",
        "cc_toolchain_suite",
        "fdo_prefetch_hints",
        "fdo_profile",
        "objc_library",
        "objc_import",
    ]
])

_RULES_JAVA_DEFS = "\n".join([
    "def {0}(**attrs):\n    native.{0}(**attrs)\n".format(r)
    for r in [
        "java_binary",
        "java_import",
        "java_library",
        "java_lite_proto_library",
        "java_proto_library",
        "java_runtime",
        "java_test",
        "java_toolchain",
        "java_package_configuration",
        "java_plugin",
    ]
])

_STUBS = {
    "rules_cc": {
        "BUILD": "",
        "cc/BUILD": """package(default_visibility = ["//visibility:public"])
alias(name = "toolchain_type", actual = "@bazel_tools//tools/cpp:toolchain_type")
""",
        "cc/defs.bzl": _RULES_CC_DEFS,
    },
    "rules_java": {
        "BUILD": "",
        "java/BUILD": "",
        "java/defs.bzl": _RULES_JAVA_DEFS,
    },
    "remote_coverage_tools": {
        "BUILD": """package(default_visibility = ["//visibility:public"])
sh_binary(name = "coverage_report_generator", srcs = ["unsupported.sh"])
sh_binary(name = "lcov_merger", srcs = ["unsupported.sh"])
filegroup(name = "coverage_output_generator", srcs = ["unsupported.sh"])
""",
        "unsupported.sh": "#!/bin/sh\necho 'coverage tools are not available offline' >&2\nexit 1\n",
    },
}

def _stub_repo_impl(rctx):
    rctx.file("WORKSPACE", 'workspace(name = "%s")\n' % rctx.name)
    for path, content in _STUBS[rctx.attr.kind].items():
        rctx.file(path, content, executable = path.endswith(".sh"))

_stub_repo = repository_rule(
    implementation = _stub_repo_impl,
    attrs = {"kind": attr.string()},
)

def offline_bazel_deps():
    for name in _STUBS:
        _stub_repo(name = name, kind = name)

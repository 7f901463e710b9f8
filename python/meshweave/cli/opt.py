"""meshweave-opt: run any meshweave / upstream pass pipeline on a .mlir file, like mlir-opt.

    meshweave-opt IN.mlir --pass-pipeline='inline-calls,data-parallel' [--mesh 2x4]
                  [--split-input-file] [--dump-dir D] [--print-ir-after-all] [-o OUT]
    meshweave-opt --list-passes

--split-input-file runs the pipeline on each `// -----`-separated chunk as its own module (as
mlir-opt does); a chunk whose pass fails prints its error and the others still run.

Exit codes: 0 success; 1 a pass failed; 2 bad usage (unknown pass, bad option, unparsable input).
"""
from __future__ import annotations

import argparse
import re
import sys

USAGE_ERROR = 2
PASS_FAILED = 1


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshweave-opt", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", nargs="?", help="input .mlir file ('-' for stdin)")
    p.add_argument("--pass-pipeline", "-p", default="", help="passes, e.g. 'inline-calls,cse,data-parallel{axes=x}'")
    p.add_argument("--mesh", help="logical mesh shape for mesh-aware passes, e.g. 2x4")
    p.add_argument("--mesh-axes", help="mesh axis names, e.g. dp,mp (default x,y,...)")
    p.add_argument("--split-input-file", action="store_true",
                   help="treat each '// -----'-separated chunk as its own module")
    p.add_argument("--dump-dir", help="write 00_input.mlir and NN_<pass>.mlir after each pass here")
    p.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass to stderr")
    p.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    p.add_argument("--list-passes", action="store_true", help="list every registered pass with its summary")
    return p


def list_passes_text() -> str:
    from meshweave.passes import list_passes
    from meshweave.passes.registry import UpstreamPass

    lines = []
    for cls in list_passes():
        lines.append(f"  {cls.name:34s} {cls.summary}")
        if not issubclass(cls, UpstreamPass):
            for o in cls.options:
                default = o.render(o.default) if o.default not in ((), None, "") else "-"
                lines.append(f"      {o.name}=<{o.kind}>  (default {default})  {o.help}")
    return "Passes:\n" + "\n".join(lines)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.list_passes:
        print(list_passes_text())
        return 0
    if not args.input:
        print("meshweave-opt: error: no input file (give IN.mlir, or '-' for stdin)", file=sys.stderr)
        return USAGE_ERROR

    from meshweave.dialects.sharding import MeshSpec
    from meshweave.passes.pipeline import Pipeline
    from meshweave.passes.registry import PassOptionError

    try:
        mesh = MeshSpec.parse(args.mesh, args.mesh_axes.split(",") if args.mesh_axes else None) if args.mesh else None
    except ValueError as e:
        print(f"meshweave-opt: error: --mesh: {e}", file=sys.stderr)
        return USAGE_ERROR
    try:
        pipeline = Pipeline(args.pass_pipeline) if args.pass_pipeline.strip() else Pipeline([])
    except PassOptionError as e:
        print(f"meshweave-opt: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    try:
        text = sys.stdin.read() if args.input == "-" else open(args.input).read()
    except OSError as e:
        print(f"meshweave-opt: error: cannot read {args.input}: {e.strerror}", file=sys.stderr)
        return USAGE_ERROR
    chunks = re.split(r"^// -----.*$\n?", text, flags=re.M) if args.split_input_file else [text]
    outputs, code = [], 0
    for k, chunk in enumerate(chunks):
        out, chunk_code = _run_one(chunk, args, pipeline, mesh)
        code = max(code, chunk_code)
        if chunk_code == USAGE_ERROR:
            return code
        text_k = ("// -----\n" if k else "") + out
        if args.output == "-":      # chunk by chunk, so errors (stderr) interleave in input order
            sys.stdout.write(text_k)
            sys.stdout.flush()
        else:
            outputs.append(text_k)
    if args.output != "-":
        with open(args.output, "w") as f:
            f.write("".join(outputs))
    return code


def _run_one(text: str, args, pipeline, mesh) -> tuple[str, int]:
    from jaxlib.mlir import ir

    from meshweave.dialects.context import make_context
    from meshweave.passes.install_mesh import read_mesh
    from meshweave.passes.pipeline import PipelineState, module_text
    from meshweave.passes.registry import PassError

    ctx = make_context()
    try:
        module = ir.Module.parse(text, context=ctx)
    except Exception as e:  # MLIRError with the parser diagnostics
        print(f"meshweave-opt: error: cannot parse {args.input}: {e}", file=sys.stderr)
        return "", USAGE_ERROR
    state = PipelineState(mesh=mesh or read_mesh(module))
    try:
        pipeline.run(module, state, record_ir=False, dump_dir=args.dump_dir,
                     print_after_all=sys.stderr if args.print_ir_after_all else None)
    except PassError as e:
        print(f"meshweave-opt: error: {e}", file=sys.stderr, flush=True)
        return "", PASS_FAILED
    for w in state.warnings:
        print(f"meshweave-opt: warning: {w}", file=sys.stderr, flush=True)
    return module_text(module), 0


if __name__ == "__main__":
    sys.exit(main())

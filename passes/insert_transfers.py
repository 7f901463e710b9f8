"""insert-transfers: rewrite the outlined @main into Shardy's `mpmd` form.

After `stage-outlining`, @main is a list of `func.call`s tagged with their mesh. This pass gives
@main an `mpmd` topology (one named mesh per stage, with its logical shape), turns every value
into an `!mpmd.mesh_tensor` on the mesh that produces it (arguments: on the first mesh that
reads them), every call into an `mpmd.fragment_call` on its mesh, and inserts one
`mpmd.transfer` for every (value, destination mesh) pair that crosses meshes — a value read by
several fragments of one mesh crosses once. Transfers carry the source and destination layouts
(`mw.src_sharding` / `mw.dst_sharding`) when the fragments were sharded already
(`mw.sharding` on the fragment functions' arguments and results).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from jaxlib.mlir import ir

from meshweave.dialects import meshweave as mw
from meshweave.dialects.context import parse_module
from meshweave.passes.pipeline import PassResult
from meshweave.passes.registry import Pass, PassError, register

SHARDING = "mw.sharding"        # on fragment function arguments/results: the layout on its mesh, as text


@dataclass
class Transfer:
    value: str                  # the value's name in @main (e.g. "%3#1" or an argument path)
    src_mesh: str
    dst_mesh: str
    nbytes: int
    src_sharding: str | None
    dst_sharding: str | None


@dataclass
class TransferResult(PassResult):
    transfers: list[Transfer] = field(default_factory=list)

    def explain(self) -> str:
        lines = [f"{len(self.transfers)} cross-mesh transfer(s), {self.bytes_per_micro_batch} B per step of the program"]
        for t in self.transfers[:20]:
            lines.append(f"  {t.value:10s} {t.src_mesh} -> {t.dst_mesh} {t.nbytes:10d} B  {t.src_sharding} -> "
                         f"{t.dst_sharding}")
        return "\n".join(lines)

    @property
    def bytes_per_micro_batch(self) -> int:
        return sum(t.nbytes for t in self.transfers)


def _nbytes(t: ir.Type) -> int:
    rt = ir.RankedTensorType(t)
    n = 1
    for s in rt.shape:
        n *= s
    return n * max(getattr(rt.element_type, "width", 32) // 8, 1)


def _attr_text(d: dict) -> str:
    return "{" + ", ".join(f"{k} = {v}" for k, v in d.items()) + "}" if d else ""


def _sharding_of(fn, kind: str, index: int) -> str | None:
    dicts = mw.arg_attr_dicts(fn) if kind == "arg" else mw.result_attr_dicts(fn)
    d = dicts[index] if index < len(dicts) else {}
    return ir.StringAttr(d[SHARDING]).value if SHARDING in d else None


def to_mpmd(module: ir.Module, meshes: dict[str, tuple[tuple[str, int], ...]]) -> TransferResult:
    """Rewrite @main (calls tagged mw.mesh) into mpmd form; meshes: name -> ((axis, size), ...)."""
    main = mw.main_func(module)
    funcs = mw.funcs(module)
    block = mw.entry_block(main)
    calls = [op for op in block.operations if op.operation.name == "func.call"]
    ret = next(op for op in block.operations if op.operation.name == "func.return")
    if not calls:
        raise PassError("insert-transfers", "@main calls no fragments: run stage-outlining first")
    names: dict = {}
    mesh_of: dict = {}
    lines = []
    arg_dicts = mw.arg_attr_dicts(main)
    args = list(block.arguments)
    for i, a in enumerate(args):
        names[a] = f"%arg{i}"
        readers = [ir.StringAttr(c.attributes["mw.mesh"]).value for c in calls if a in list(c.operands)]
        mesh_of[a] = readers[0] if readers else next(iter(meshes))
    result = TransferResult()
    moved: dict = {}
    counter = 0

    def mt(mesh, t):
        return f'!mpmd.mesh_tensor<"{mesh}", {t}>'

    for c in calls:
        mesh = ir.StringAttr(c.attributes["mw.mesh"]).value
        callee = ir.FlatSymbolRefAttr(c.attributes["callee"]).value
        fn = funcs[callee]
        operands = []
        for j, v in enumerate(c.operands):
            if mesh_of[v] != mesh:
                key = (names[v], mesh)
                if key not in moved:
                    src_fn, src_idx = names.get(("producer", v), (None, None))
                    src_sh = _sharding_of(funcs[src_fn], "result", src_idx) if src_fn else None
                    dst_sh = _sharding_of(fn, "arg", j)
                    attrs = {}
                    if src_sh:
                        attrs["mw.src_sharding"] = f'"{src_sh}"'
                    if dst_sh:
                        attrs["mw.dst_sharding"] = f'"{dst_sh}"'
                    t = f"%t{counter}"
                    counter += 1
                    lines.append(f"    {t} = mpmd.transfer {_attr_text(attrs)} {names[v]} : "
                                 f"({mt(mesh_of[v], v.type)}) -> {mt(mesh, v.type)}")
                    moved[key] = t
                    result.transfers.append(Transfer(names[v], mesh_of[v], mesh, _nbytes(v.type), src_sh, dst_sh))
                operands.append((moved[key], v.type))
            else:
                operands.append((names[v], v.type))
        res = f"%f{counter}"
        counter += 1
        n = len(c.results)
        for k, r in enumerate(c.results):
            names[r] = f"{res}#{k}" if n > 1 else res
            names[("producer", r)] = (callee, k)
            mesh_of[r] = mesh
        lhs = (f"{res}:{n} = " if n > 1 else f"{res} = ") if n else ""
        ins = ", ".join(o for o, _ in operands)
        in_types = ", ".join(mt(mesh, t) for _, t in operands)
        out_types = ", ".join(mt(mesh, r.type) for r in c.results)
        lines.append(f'    {lhs}mpmd.fragment_call<mesh="{mesh}", origin=["{callee}"]> @{callee}({ins}) : '
                     f"({in_types}) -> ({out_types})")
    rets = list(ret.operands)
    lines.append(f"    return {', '.join(names[v] for v in rets)} : {', '.join(mt(mesh_of[v], v.type) for v in rets)}"
                 if rets else "    return")
    topo = ", ".join(f'<"{m}" : <[{", ".join(f"{chr(34)}{a}{chr(34)}={s}" for a, s in axes)}]>>'
                     for m, axes in meshes.items())
    sig = ", ".join(f"%arg{i}: {mt(mesh_of[a], a.type)} {_attr_text(arg_dicts[i])}".rstrip()
                    for i, a in enumerate(args))
    res_dicts = mw.result_attr_dicts(main)
    outs = ", ".join(f"{mt(mesh_of[v], v.type)} {_attr_text(res_dicts[k])}".rstrip() for k, v in enumerate(rets))
    vis = "public " if "sym_visibility" in main.attributes else ""
    head = f"  func.func {vis}@{main.sym_name.value}({sig}) -> ({outs}) attributes {{topology = #mpmd.topology<{topo}>}} {{"
    with module.context:
        for c in calls:
            fn = funcs[ir.FlatSymbolRefAttr(c.attributes["callee"]).value]
            axes = meshes[ir.StringAttr(c.attributes["mw.mesh"]).value]
            fn.attributes["mesh_shape"] = ir.Attribute.parse(
                "#sdy.mesh<[" + ", ".join(f'"{a}"={n}' for a, n in axes) + "]>")
    others = [str(op.operation) for op in module.body.operations if op.operation != main.operation]
    mod_attrs = {a.name: str(a.attr) for a in map(module.operation.attributes.__getitem__, range(len(module.operation.attributes)))}
    text = ("module " + (f"attributes {_attr_text(mod_attrs)} " if mod_attrs else "") + "{\n" + head + "\n"
            + "\n".join(lines) + "\n  }\n" + "\n".join(others) + "\n}\n")
    try:
        new = parse_module(text, context=module.context)
    except Exception as e:
        raise PassError("insert-transfers", f"the mpmd form of @main does not parse: {e}") from e
    for op in list(module.body.operations):
        op.operation.erase()
    for op in list(new.body.operations):
        module.body.append(op.operation)
    return result


@register
class InsertTransfers(Pass):
    name = "insert-transfers"
    summary = "Rewrite @main into mpmd form: fragment calls on named meshes, one mpmd.transfer per crossing value"

    def run(self, module, state):
        stages = state.results.get("stage-construction")
        if stages is None:
            raise PassError(self.name, "no stages: run stage-construction and stage-outlining first")
        meshes = {s.mesh.name: tuple(zip(s.mesh.axis_names, s.mesh.shape)) for s in stages.stages}
        state.results[self.name] = to_mpmd(module, meshes)

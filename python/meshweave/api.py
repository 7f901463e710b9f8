"""`parallelize`: trace on first call per input signature, run the method's passes, compile, cache."""
from __future__ import annotations

import contextlib
import functools
import os

import jax

from meshweave.dialects.sharding import TensorSharding
from meshweave.passes.pipeline import Pipeline, PipelineState
from meshweave.passes.registry import PassError
from meshweave.parallel_plan import Plan, StagePlan, TensorPlacement
from meshweave import fidelity
from meshweave.plugin import hlo_stats
from meshweave.plugin.compile import arg_shardings, compile_single_mesh, result_shardings
from meshweave.plugin.lowering import ArgumentError, check_call, trace
from meshweave.methods import DataParallel, MethodError, ParallelMethod
from meshweave.executable import Executable
from meshweave.markers import AccumulationError, accumulate_gradients
from meshweave.runtime.local import LocalStageRunner


class ParallelizeError(RuntimeError):
    """Planning or compiling failed; the message names the pass or step and the problem."""


def parallelize(fun=None, *, method: ParallelMethod | None = None, static_argnums=(), donate_argnums=(),
                batch_argnums=(1,)):
    """Parallelize `fun` over a device mesh; use as `@parallelize` or `parallelize(fn, method=...)`.

    static_argnums / donate_argnums: as in `jax.jit`. batch_argnums: positional arguments whose
    array leaves carry the batch on dimension 0 (default: the second argument, as in
    `train_step(state, batch)`). The default method is ShardParallel over all devices.
    """
    if fun is None:
        return lambda f: parallelize(f, method=method, static_argnums=static_argnums,
                                     donate_argnums=donate_argnums, batch_argnums=batch_argnums)
    if not callable(fun):
        raise TypeError(f"parallelize expects a function, got {type(fun).__name__}")
    return ParallelizedFunc(fun, method, static_argnums, donate_argnums, batch_argnums)


def _default_method() -> ParallelMethod:
    from meshweave import methods

    return methods.ShardParallel() if hasattr(methods, "ShardParallel") else DataParallel()


class ParallelizedFunc:
    def __init__(self, fun, method, static_argnums, donate_argnums, batch_argnums):
        self.fun = fun
        self.method = method if method is not None else _default_method()
        if not isinstance(self.method, ParallelMethod):
            raise TypeError(f"method must be a meshweave method (ShardParallel, DataParallel, ...), "
                            f"got {type(self.method).__name__}")
        self.static_argnums = static_argnums
        self.donate_argnums = donate_argnums
        self.batch_argnums = batch_argnums
        self._cache: dict = {}
        self.last_executable: Executable | None = None
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        return self.get_executable(*args, **kwargs)(*args, **kwargs)

    def _key(self, args, kwargs):
        static, _, _, _ = check_call(self.fun, args, kwargs, self.static_argnums, self.donate_argnums,
                                     self.batch_argnums)
        dyn = [a for i, a in enumerate(args) if i not in static]
        leaves, treedef = jax.tree.flatten((dyn, kwargs))
        avals = tuple((tuple(getattr(x, "shape", ())), str(getattr(x, "dtype", type(x).__name__)),
                       bool(getattr(getattr(x, "aval", None), "weak_type", isinstance(x, (int, float, complex)))))
                      for x in leaves)
        return (treedef, avals, tuple((i, args[i]) for i in static))

    def get_executable(self, *args, **kwargs) -> Executable:
        """The compiled executable for these arguments (compiled on first use, then cached)."""
        key = self._key(args, kwargs)
        exe = self._cache.get(key)
        if exe is None:
            exe = self._compile(args, kwargs)
            self._cache[key] = exe
        self.last_executable = exe
        return exe

    @contextlib.contextmanager
    def _accumulation(self, args, kwargs, spec):
        k = getattr(self.method, "num_micro_batches", None) or 1
        if k == 1:
            yield None
            return
        b = _batch_size(self.fun, args, kwargs, self.static_argnums, self.donate_argnums, self.batch_argnums)
        replicas = spec.axes_size(self.method.data_parallel_axes(spec))
        with accumulate_gradients(k, replicas, b) as cfg:
            yield cfg

    def _compile(self, args, kwargs) -> Executable:
        from meshweave.methods import PipeshardParallel

        if isinstance(self.method, PipeshardParallel):
            from meshweave.pipeshard import build_executable

            return build_executable(self, args, kwargs)
        mesh, spec = self.method.resolve_mesh()
        with self._accumulation(args, kwargs, spec) as acc:
            step = trace(self.fun, args, kwargs, static_argnums=self.static_argnums,
                         donate_argnums=self.donate_argnums, batch_argnums=self.batch_argnums, mesh=mesh)
        if acc is not None and acc["used"] == 0:
            raise ParallelizeError(
                f"num_micro_batches={acc['k']} needs the step to compute gradients with meshweave.grad or "
                "meshweave.value_and_grad (jax.grad cannot be split into micro-batches by meshweave)")
        module = step.module()
        state = PipelineState(mesh=spec, options={"method": self.method})
        configure = getattr(self.method, "configure_state", None)
        if configure is not None:
            configure(state, step)
        pipeline = Pipeline(self.method.pipeline_for(spec))
        try:
            pipeline.run(module, state, record_ir=True, dump_dir=os.environ.get("MESHWEAVE_DUMP_DIR"))
        except PassError as e:
            raise ParallelizeError(f"planning {getattr(self.fun, '__name__', 'the step')} failed: {e}") from e
        try:
            compiled = compile_single_mesh(step, module, mesh)
        except Exception as e:
            raise ParallelizeError(f"XLA could not compile the planned module: {type(e).__name__}: {e}") from e
        static = check_call(self.fun, args, kwargs, self.static_argnums, self.donate_argnums, self.batch_argnums)[0]
        runner = LocalStageRunner([compiled], static)
        plan = build_plan(self.method, pipeline, spec, mesh, step, module, compiled, state)
        extra = {}
        if "auto_sharding_problem" in state.options:
            from meshweave.passes.solver.iopddl import write_iopddl

            problem = state.options["auto_sharding_problem"]
            extra["sharding_problem.json"] = lambda path: write_iopddl(problem, path)
        exe = Executable(plan=plan, runner=runner, records=state.records, state=state, traced=step,
                         extra_dumps=extra)
        if os.environ.get("MESHWEAVE_DUMP_DIR"):
            exe.dump(os.environ["MESHWEAVE_DUMP_DIR"])
        return exe


def _batch_size(fun, args, kwargs, static_argnums, donate_argnums, batch_argnums) -> int:
    static, _, batch, names = check_call(fun, args, kwargs, static_argnums, donate_argnums, batch_argnums)
    sizes = {x.shape[0] for i in batch for x in jax.tree.leaves(args[i]) if getattr(x, "ndim", 0) >= 1}
    if len(sizes) != 1:
        raise ParallelizeError(f"num_micro_batches needs batch arguments (batch_argnums={batch_argnums}) whose "
                               f"array leaves share one batch size on dimension 0; found sizes {sorted(sizes)}")
    return sizes.pop()


def _placements(paths, avals, shardings, rank_default):
    out = []
    for path, aval, ts in zip(paths, avals, shardings):
        shape = list(aval.shape)
        ts = ts or TensorSharding.replicated(len(shape))
        out.append(TensorPlacement(path, shape, str(aval.dtype), ts.to_text(), str(ts.partition_spec())))
    return out


def build_plan(method, pipeline, spec, mesh, step, module, compiled, state) -> Plan:
    outs = list(compiled.output_shardings) if not isinstance(compiled.output_shardings, jax.sharding.Sharding) \
        else [compiled.output_shardings]
    out_sh = result_shardings(module)
    flat_out = jax.tree.leaves(outs, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    out_specs = [ts if ts is not None else _from_named(s, len(a.shape))
                 for ts, s, a in zip(out_sh, flat_out, step.out_avals)]
    text = compiled.as_text()
    try:
        mem = compiled.memory_analysis()
        memory = {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                      "temp_size_in_bytes", "alias_size_in_bytes")}
    except Exception:  # some backends have no memory analysis
        memory = {}
    stage = StagePlan(0, list(spec.shape), list(spec.axis_names), [d.id for d in mesh.devices.flat],
                      _placements(step.arg_paths, step.arg_avals, arg_shardings(module), None),
                      _placements(step.result_paths, step.out_avals, out_specs, None),
                      hlo_stats.summarize(hlo_stats.collectives(text)), memory)
    lm = state.logical_mesh
    logical = {"shape": list(spec.shape), "axis_names": list(spec.axis_names),
               "alpha": list(getattr(lm, "user_alpha", ())) or None, "beta": list(getattr(lm, "user_beta", ())) or None}
    auto = state.reports.get("auto-sharding", {})
    if "predicted_collectives" in auto:
        from meshweave.passes.explicit_collectives import shardy_collectives

        try:
            shardy = shardy_collectives(next(r.ir_text for r in reversed(state.records)
                                             if r.name == "auto-sharding"), spec)
        except Exception as e:  # the Shardy view is a diagnostic; never fail a compile over it
            state.warn(f"plan fidelity: Shardy's explicit-collective view failed: {e}")
            shardy = {}
        rows = fidelity.compare(auto["predicted_collectives"], stage.collectives, shardy)
        auto["fidelity"] = rows
        auto["explain"] = auto.get("explain", "") + "\nplan fidelity (predicted vs compiled collectives):\n" + \
            fidelity.report(rows, hlo_stats.collectives(text))
        stage.fidelity = rows
    return Plan(method=method.describe(), pass_pipeline=pipeline.spec(), logical_mesh=logical, stages=[stage],
                num_micro_batches=getattr(method, "num_micro_batches", None) or 1,
                objective=auto.get("objective"), predicted_costs=auto.get("predicted_costs", {}),
                solver=auto.get("solver", {}))


def _from_named(sharding, rank) -> TensorSharding:
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return TensorSharding.replicated(rank)
    dims = []
    for i in range(rank):
        p = spec[i] if i < len(spec) else None
        dims.append(() if p is None else ((p,) if isinstance(p, str) else tuple(p)))
    return TensorSharding(tuple(dims))

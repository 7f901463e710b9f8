"""`parallelize`: compile on the first call per input signature (the compile driver), cache, and
run later calls through a short path: bind the arguments, look the signature up, execute."""
from __future__ import annotations

import functools

import jax

from meshweave.driver import ParallelizeError, compile_step  # noqa: F401 (ParallelizeError is public)
from meshweave.executable import Executable
from meshweave.methods import DataParallel, ParallelMethod
from meshweave.plugin.arguments import ArgumentSpec, fast_signature


def parallelize(fun=None, *, method: ParallelMethod | None = None, static_argnums=(), donate_argnums=(),
                batch_argnums=(1,), batch_argnames=(), donate_argnames=()):
    """Parallelize `fun` over a device mesh; use as `@parallelize` or `parallelize(fn, method=...)`.

    static_argnums / donate_argnums / donate_argnames: as in `jax.jit`. batch_argnums /
    batch_argnames: arguments whose array leaves carry the batch on dimension 0 (default: the
    second argument, as in `train_step(state, batch)`, whether passed by position or by its
    name). The default method is ShardParallel over all devices.
    """
    if fun is None:
        return lambda f: parallelize(f, method=method, static_argnums=static_argnums, donate_argnums=donate_argnums,
                                     batch_argnums=batch_argnums, batch_argnames=batch_argnames,
                                     donate_argnames=donate_argnames)
    if not callable(fun):
        raise TypeError(f"parallelize expects a function, got {type(fun).__name__}")
    spec = ArgumentSpec.create(fun, static_argnums=static_argnums, donate_argnums=donate_argnums,
                               batch_argnums=batch_argnums, batch_argnames=batch_argnames,
                               donate_argnames=donate_argnames)
    return ParallelizedFunc(fun, method, spec)


def _default_method() -> ParallelMethod:
    from meshweave import methods

    return methods.ShardParallel() if hasattr(methods, "ShardParallel") else DataParallel()


class ParallelizedFunc:
    def __init__(self, fun, method, argument_spec: ArgumentSpec):
        self.fun = fun
        self.method = method if method is not None else _default_method()
        if not isinstance(self.method, ParallelMethod):
            raise TypeError(f"method must be a meshweave method (ShardParallel, DataParallel, ...), "
                            f"got {type(self.method).__name__}")
        self.argument_spec = argument_spec
        self._cache: dict = {}        # signature (BoundCall.key) -> Executable
        self._fast: dict = {}         # BoundCall.fast_key -> Executable (the per-call path)
        self.last_executable: Executable | None = None
        functools.update_wrapper(self, fun)

    @property
    def static_argnums(self):
        return self.argument_spec.static_argnums

    @property
    def donate_argnums(self):
        return self.argument_spec.donate_argnums

    @property
    def batch_argnums(self):
        return self.argument_spec.batch_argnums

    def __call__(self, *args, **kwargs):
        # The per-call path (a training loop's steady state): flatten, look the signature up,
        # run. Everything else (argument roles, error messages) is built only when needed.
        layout = self.argument_spec._layouts.get((len(args), tuple(kwargs)))
        if layout is not None and not layout[0]:            # no static arguments
            leaves, treedef = jax.tree.flatten((args, kwargs))
            exe = self._fast.get((treedef, fast_signature(leaves), ()))
            if exe is not None:
                try:
                    out = exe.run_leaves(leaves, lambda: self.argument_spec.bind(args, kwargs))
                except TypeError:
                    # Only a hash collision of fast_signature gets here: jax's own argument check
                    # refused the types before running anything. The exact lookup below decides.
                    pass
                else:
                    self.last_executable = exe
                    return out
        exe, call = self.lookup(args, kwargs)
        return exe.run(call)

    def lookup(self, args, kwargs):
        """(Executable, bound call) for a call: the fast path of every call after the first."""
        call = self.argument_spec.bind(args, kwargs)
        try:
            exe = self._fast.get(call.fast_key())
        except TypeError:       # an unhashable static value: the slow path names it
            exe = None
        if exe is None:
            exe = self._executable_for(call)
        else:
            self.last_executable = exe
        return exe, call

    def _executable_for(self, call) -> Executable:
        key = call.key()
        exe = self._cache.get(key)
        if exe is None:
            exe = compile_step(self.fun, call, self.method)
            self._cache[key] = exe
        self._fast[call.fast_key()] = exe
        self.last_executable = exe
        return exe

    def get_executable(self, *args, **kwargs) -> Executable:
        """The compiled executable for these arguments (compiled on first use, then cached)."""
        return self._executable_for(self.argument_spec.bind(args, kwargs))

"""How a call's arguments reach the compiled step: argument-number parameters checked like
`jax.jit` checks them, and one call flattened into leaves with per-leaf roles.

The compiled step takes the flat array leaves of `(dynamic positional args, kwargs)` in
`jax.tree.flatten` order; static arguments are closed over and are part of the cache key.
Batch and donation can name a parameter by number or by name: an argument passed by keyword
keeps the role its parameter has (`batch_argnums=(1,)` covers `step(state, batch=b)`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import jax
import numpy as np


class ArgumentError(ValueError):
    """A call's arguments cannot be traced or do not fit the method; the message names the fix."""


def check_argnums(value, what: str) -> tuple[int, ...]:
    """An int or an iterable of ints (as jax.jit accepts); strings and bools are rejected."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, int) and not isinstance(value, bool) else value
    if isinstance(items, (str, bytes)) or not hasattr(items, "__iter__"):
        raise ArgumentError(f"{what} must be an int or a tuple of ints, got {value!r}")
    items = tuple(items)
    if not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in items):
        raise ArgumentError(f"{what} must be an int or a tuple of ints, got {value!r}")
    return tuple(int(a) for a in items)


def check_argnames(value, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    if not hasattr(items, "__iter__") or not all(isinstance(a, str) for a in items):
        raise ArgumentError(f"{what} must be a str or a tuple of str, got {value!r}")
    return tuple(items)


def param_names(fun) -> list[str | None]:
    """Names of `fun`'s positional parameters in order (None past the signature or for *args)."""
    try:
        params = list(inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


def is_remote(x) -> bool:
    """A handle to an array another process holds (runtime/ray's RemoteArray): its shape and
    dtype are known here, its value is not; the backend that made it takes it back as input."""
    return getattr(type(x), "__meshweave_remote__", False)


def is_traceable(x) -> bool:
    return (isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex))
            or hasattr(x, "__jax_array__") or isinstance(x, jax.ShapeDtypeStruct) or is_remote(x))


_ARRAY_TYPE: list = []     # jax's concrete array class (ArrayImpl), found on first use


def array_type() -> type:
    if not _ARRAY_TYPE:
        _ARRAY_TYPE.append(type(jax.numpy.zeros(())))
    return _ARRAY_TYPE[0]


def fast_signature(leaves) -> int:
    """A hash of the leaves' avals (cached on each jax array, so cheap to read and hash; they
    also name the abstract mesh an array lives on). Comparing avals costs more than the rest
    of a call, so the per-call cache is keyed by this hash: a collision cannot run the wrong
    program, because the compiled executable checks argument types before running, and the
    caller then falls back to the exact key (BoundCall.key)."""
    arr = _ARRAY_TYPE[0] if _ARRAY_TYPE else array_type()
    return hash(tuple(x.aval if type(x) is arr else leaf_signature(x) for x in leaves))


def leaf_signature(x) -> tuple:
    """(shape, dtype, weak_type): what a trace depends on. Placement is not part of it: the
    plan chooses layouts, and the runner moves an argument whose layout differs."""
    if isinstance(x, jax.Array) or isinstance(x, jax.ShapeDtypeStruct) or is_remote(x):
        return (x.shape, x.dtype, bool(getattr(x, "weak_type", False)))
    if isinstance(x, (np.ndarray, np.generic)):
        return (x.shape, x.dtype, False)
    return (type(x),)      # Python scalars (weakly typed by their type); anything else fails at trace


def abstract(x) -> jax.ShapeDtypeStruct:
    if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)) or is_remote(x):
        shape, dtype, weak = leaf_signature(x)
    else:
        aval = jax.typeof(x)
        shape, dtype, weak = aval.shape, aval.dtype, aval.weak_type
    return jax.ShapeDtypeStruct(shape, dtype, weak_type=bool(weak))


@dataclass(frozen=True)
class ArgumentSpec:
    """The argument parameters of `parallelize`, validated once at decoration time."""

    fun_name: str
    params: tuple[str | None, ...]
    static_argnums: tuple[int, ...] = ()
    donate_argnums: tuple[int, ...] = ()
    batch_argnums: tuple[int, ...] = ()
    batch_argnames: tuple[str, ...] = ()
    donate_argnames: tuple[str, ...] = ()
    # (number of positional args, keyword names) -> the roles of every argument (see _layout)
    _layouts: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def create(cls, fun, *, static_argnums=(), donate_argnums=(), batch_argnums=(), batch_argnames=(),
               donate_argnames=()) -> "ArgumentSpec":
        params = tuple(param_names(fun))
        spec = cls(getattr(fun, "__name__", "the function"), params,
                   check_argnums(static_argnums, "static_argnums"), check_argnums(donate_argnums, "donate_argnums"),
                   check_argnums(batch_argnums, "batch_argnums"), check_argnames(batch_argnames, "batch_argnames"),
                   check_argnames(donate_argnames, "donate_argnames"))
        both = set(spec.static_argnums) & set(spec.donate_argnums)
        if both:
            raise ArgumentError(f"argument {min(both)} is in both static_argnums and donate_argnums; "
                                "a static argument has no buffer to donate")
        for names, what in ((spec.batch_argnames, "batch_argnames"), (spec.donate_argnames, "donate_argnames")):
            unknown = [n for n in names if params and n not in params and not _has_kwargs(fun)]
            if unknown:
                raise ArgumentError(f"{what} names {unknown}, which {spec.fun_name} has no parameter for "
                                    f"(parameters: {', '.join(p for p in params if p)})")
        return spec

    def _positions(self, argnums, what, nargs, must_exist) -> set[int]:
        out = set()
        for a in argnums:
            b = a + nargs if a < 0 else a
            if 0 <= b < nargs:
                out.add(b)
            elif must_exist:
                raise ArgumentError(
                    f"{what}={argnums} names argument {a}, but {self.fun_name} was called with {nargs} positional "
                    f"argument(s); fix {what} or pass the argument positionally")
        return out

    def _names_of(self, positions) -> set[str]:
        return {self.params[i] for i in positions if i < len(self.params) and self.params[i]}

    def _layout(self, n: int, kwnames: tuple) -> tuple:
        """Static, batch and donated positions and names for calls with `n` positional arguments
        and keyword arguments `kwnames` (checked once, then cached: calls repeat their shape)."""
        static = self._positions(self.static_argnums, "static_argnums", n, True)
        donate = self._positions(self.donate_argnums, "donate_argnums", n, False)
        batch = self._positions(self.batch_argnums, "batch_argnums", n, False)
        # A parameter keeps its role when passed by keyword; a name keeps it when passed by position.
        batch_names = set(self.batch_argnames) | self._names_of(b for b in self.batch_argnums if b >= 0)
        donate_names = set(self.donate_argnames) | self._names_of(d for d in self.donate_argnums if d >= 0)
        batch |= {i for i in range(n) if i < len(self.params) and self.params[i] in set(self.batch_argnames)}
        donate |= {i for i in range(n) if i < len(self.params) and self.params[i] in set(self.donate_argnames)}
        missing = [a for a in self.donate_argnums if not (-n <= a < n) and
                   not (0 <= a < len(self.params) and self.params[a] in kwnames)]
        if missing:
            raise ArgumentError(
                f"donate_argnums={self.donate_argnums} names argument {missing[0]}, but {self.fun_name} was called "
                f"with {n} positional argument(s) and no keyword argument for it")
        positions = tuple(i for i in range(n) if i not in static)
        return (tuple(sorted(static)), positions, frozenset(batch), frozenset(batch_names), frozenset(donate),
                frozenset(donate_names))

    def bind(self, args: tuple, kwargs: dict) -> "BoundCall":
        """Split one call into static values and flat dynamic leaves with their roles."""
        shape = (len(args), tuple(kwargs))
        layout = self._layouts.get(shape)
        if layout is None:
            layout = self._layouts[shape] = self._layout(len(args), tuple(kwargs))
        static, positions, batch, batch_names, donate, donate_names = layout
        if static:
            statics = tuple((i, args[i]) for i in static)
            dyn = tuple(args[i] for i in positions)
        else:
            statics, dyn = (), args
        leaves, treedef = jax.tree.flatten((dyn, kwargs))
        return BoundCall(self, args, kwargs, statics, positions, leaves, treedef, batch, batch_names, donate,
                         donate_names)

    def arg_name(self, i: int) -> str:
        return self.params[i] if i < len(self.params) and self.params[i] else f"args[{i}]"


def _has_kwargs(fun) -> bool:
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(fun).parameters.values())
    except (TypeError, ValueError):
        return True


@dataclass
class BoundCall:
    """One call, flattened: `leaves` are the compiled step's inputs, in order."""

    spec: ArgumentSpec
    args: tuple
    kwargs: dict
    statics: tuple                  # ((position, value), ...)
    positions: tuple[int, ...]      # positions of the dynamic positional arguments
    leaves: list
    treedef: object
    batch: frozenset                # positional indices carrying the batch
    batch_names: frozenset          # keyword names carrying the batch
    donate: frozenset
    donate_names: frozenset

    def key(self) -> tuple:
        """The compile cache key: structure, (shape, dtype, weak type) per leaf, static values."""
        self.check_statics()
        return (self.treedef, tuple(leaf_signature(x) for x in self.leaves), self.statics)

    def fast_key(self) -> tuple:
        """The per-call key (see fast_signature); one signature may have several fast keys."""
        return (self.treedef, fast_signature(self.leaves), self.statics)

    def check_statics(self) -> None:
        for i, v in self.statics:
            try:
                hash(v)
            except TypeError:
                raise ArgumentError(
                    f"static argument {self.spec.arg_name(i)} (static_argnums includes {i}) has unhashable type "
                    f"{type(v).__name__}; pass a hashable value (e.g. a tuple instead of a list), "
                    f"or remove {i} from static_argnums if it is an array") from None

    def leaf_roles(self) -> list[tuple[str, bool, bool]]:
        """Per leaf: (path for messages and plan.json, carries the batch, donated)."""
        out = []
        dyn, kwargs = jax.tree.unflatten(self.treedef, self.leaves)
        for j, a in enumerate(dyn):
            i = self.positions[j]
            for path, _ in jax.tree_util.tree_flatten_with_path(a)[0]:
                out.append((self.spec.arg_name(i) + jax.tree_util.keystr(path), i in self.batch, i in self.donate))
        for k in sorted(kwargs):
            for path, _ in jax.tree_util.tree_flatten_with_path(kwargs[k])[0]:
                out.append((k + jax.tree_util.keystr(path), k in self.batch_names, k in self.donate_names))
        return out

    def check_traceable(self) -> None:
        for path, leaf in zip((r[0] for r in self.leaf_roles()), self.leaves):
            if not is_traceable(leaf):
                pos = next((i for i in self.positions if path.startswith(self.spec.arg_name(i))), None)
                fix = (f"mark argument {pos} static with static_argnums=({pos},) or pass an array instead"
                       if pos is not None else "pass it positionally and mark it static with static_argnums, "
                       "or pass an array")
                raise ArgumentError(f"argument {path} has type {type(leaf).__name__}, which jax cannot trace; {fix}")

    def batch_leaves(self) -> list:
        return [x for x, (_, b, _) in zip(self.leaves, self.leaf_roles()) if b]

    def rebuild(self, leaves) -> tuple[tuple, dict]:
        """(args, kwargs) of the user's function from flat (traced) leaves and the static values."""
        dyn, kwargs = jax.tree.unflatten(self.treedef, list(leaves))
        args = [None] * (len(dyn) + len(self.statics))
        for i, v in self.statics:
            args[i] = v
        for j, a in zip(self.positions, dyn):
            args[j] = a
        return tuple(args), kwargs


def check_donation(call: BoundCall, donated: tuple[int, ...]) -> None:
    """A donated buffer passed a second time in the same call would be read after XLA reused it
    (on a sharded mesh that crashes the process): refuse before executing, as jax.jit does."""
    counts: dict[int, int] = {}
    for x in call.leaves:
        counts[id(x)] = counts.get(id(x), 0) + 1
    for i in donated:
        x = call.leaves[i]
        if counts[id(x)] > 1 and isinstance(x, jax.Array):
            paths = [r[0] for r in call.leaf_roles()]
            other = next(j for j, y in enumerate(call.leaves) if y is x and j != i)
            raise ArgumentError(
                f"{paths[i]} is donated (donate_argnums) but the same array is also passed as {paths[other]}; "
                f"a donated buffer is reused for outputs, so the other use would read freed memory. Pass a copy "
                f"(e.g. jnp.copy(x)) for one of them, or do not donate {paths[i]}")

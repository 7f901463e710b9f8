"""In-process execution of a single-mesh step: place inputs as the executable expects, then call it."""
from __future__ import annotations

import jax


class LocalStageRunner:
    """Runs compiled stage executables in this process (stage meshes are subsets of local devices).

    Inputs whose sharding differs from what the executable was compiled for are moved with
    `jax.device_put` first (host arrays, single-device arrays, or another layout), so a call
    never fails because of where its arguments happen to live.
    """

    def __init__(self, compiled_stages, static_argnums=()):
        self.stages = list(compiled_stages)
        self.static_argnums = tuple(static_argnums)

    def compiled_text(self, stage: int) -> str:
        return self.stages[stage].as_text()

    def __call__(self, *args, **kwargs):
        if len(self.stages) != 1:
            raise NotImplementedError("multi-stage execution needs a pipeline schedule")
        compiled = self.stages[0]
        dyn = [a for i, a in enumerate(args) if i not in self.static_argnums]
        expected_args, expected_kwargs = compiled.input_shardings
        dyn = _place(dyn, list(expected_args))
        kwargs = {k: _place_tree(v, expected_kwargs[k]) for k, v in kwargs.items()}
        return compiled(*dyn, **kwargs)


def _place_tree(tree, shardings):
    leaves, treedef = jax.tree.flatten(tree)
    sh = jax.tree.leaves(shardings, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    out = [x if (isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim)) else jax.device_put(x, s)
           for x, s in zip(leaves, sh)]
    return jax.tree.unflatten(treedef, out)


def _place(args, shardings):
    return [_place_tree(a, s) for a, s in zip(args, shardings)]

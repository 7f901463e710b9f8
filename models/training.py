"""The training step every model in the zoo shares: value_and_grad of a loss, an optax update."""
from __future__ import annotations

import jax
import optax


def make_train_step(loss_fn, optimizer: optax.GradientTransformation, grad_fn=jax.value_and_grad):
    """train_step(state, batch) -> (state, loss) with state = {"params", "opt_state"}.

    grad_fn: jax.value_and_grad, or meshweave.value_and_grad to mark the gradient boundary
    (needed for gradient accumulation).
    """

    def train_step(state, batch):
        loss, grads = grad_fn(loss_fn)(state["params"], batch)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    return train_step


def classification_loss(apply):
    """Mean cross-entropy of `apply(params, batch["images"])` against integer `batch["labels"]`."""
    import jax.numpy as jnp

    def loss_fn(params, batch):
        logp = jax.nn.log_softmax(apply(params, batch["images"]))
        return -jnp.mean(jnp.take_along_axis(logp, batch["labels"][:, None], axis=1))

    return loss_fn


def init_state(params, optimizer: optax.GradientTransformation):
    return {"params": params, "opt_state": optimizer.init(params)}

"""The model zoo as uniform cases (a train step, its state and a batch) for the numerics matrix,
benchmarks and tests. Sizes are small (seconds to compile on simulated CPU devices); every batch
has 16 examples so it splits over 8 devices and 2 micro-batches."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import jax
import optax

NAMES = ("mlp", "gpt", "cnn", "bert", "moe", "wide_resnet")
BATCH = 16


@dataclass(frozen=True)
class ZooCase:
    name: str
    step: Callable           # train_step(state, batch) -> (state, loss)
    state: Any
    batch: Any
    rtol: float = 1e-4       # against single-device jax.jit (float sums in another order)
    atol: float = 1e-5


def case(name: str, grad_fn=jax.value_and_grad, optimizer=None) -> ZooCase:
    """`grad_fn=meshweave.value_and_grad` for gradient accumulation."""
    opt = optimizer or optax.sgd(1e-2, momentum=0.9)
    key, data = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    if name == "mlp":
        from meshweave.models import mlp

        return ZooCase(name, mlp.make_train_step(opt, grad_fn), mlp.init_state(key, [64] * 4, opt),
                       mlp.synthetic_batch(data, BATCH, 64, 64))
    if name == "gpt":
        from meshweave.models import gpt

        cfg = gpt.GPTConfig(vocab=128, seq_len=16, d_model=64, heads=4, layers=2)
        return ZooCase(name, gpt.make_train_step(opt, grad_fn), gpt.init_state(key, cfg, opt),
                       gpt.synthetic_batch(data, cfg, BATCH), 2e-4, 2e-5)
    if name == "cnn":
        from meshweave.models import cnn

        return ZooCase(name, cnn.make_train_step(opt, grad_fn), cnn.init_state(key, opt),
                       cnn.synthetic_batch(data, BATCH), 2e-4, 2e-5)
    if name == "bert":
        from meshweave.models import bert

        cfg = bert.BertConfig(vocab=128, seq_len=16, d_model=64, heads=4, layers=2, d_ff=128)
        return ZooCase(name, bert.make_train_step(opt, grad_fn), bert.init_state(key, cfg, opt),
                       bert.synthetic_batch(data, cfg, BATCH), 2e-4, 2e-5)
    if name == "moe":
        from meshweave.models import moe

        cfg = moe.MoEConfig(groups=BATCH, group_size=16, d_model=32, d_ff=64, experts=8, capacity=4)
        return ZooCase(name, moe.make_train_step(cfg, opt, grad_fn), moe.init_state(key, cfg, opt),
                       moe.synthetic_batch(data, cfg), 2e-4, 2e-5)
    if name == "wide_resnet":
        from meshweave.models import wide_resnet

        return ZooCase(name, wide_resnet.make_train_step(opt, grad_fn), wide_resnet.init_state(key, opt),
                       wide_resnet.synthetic_batch(data, BATCH), 2e-4, 2e-5)
    raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(NAMES)}")

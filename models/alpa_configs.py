"""Alpa's benchmark model configurations (OSDI'22 §8, weak scaling: the model grows with the GPUs).

GPT sizes are Alpa's `gpt_specs` (sequence 1024, vocabulary 51200); the weak-scaling rows pair a
GPU count with a model size, the global batch (1024) and the micro-batch count Alpa's auto
search settled on for that row (`suite_auto_gpt.py`). `tiny` rows are for tests.
"""
from __future__ import annotations

from dataclasses import dataclass

from meshweave.models.gpt import GPTConfig

SEQ_LEN = 1024
VOCAB = 51200

# name: (hidden, layers, heads)
GPT_SPECS = {
    "125M": (768, 12, 12), "350M": (1024, 24, 16), "760M": (1536, 24, 16), "1.3B": (2048, 24, 32),
    "2.6B": (2560, 32, 32), "6.7B": (4096, 32, 32), "15B": (5120, 48, 40), "39B": (8192, 48, 64),
    "76B": (10240, 60, 80),
}


@dataclass(frozen=True)
class WeakScalingRow:
    gpus: int
    model: str
    global_batch: int
    micro_batches: int


GPT_WEAK_SCALING = {
    1: WeakScalingRow(1, "350M", 1024, 512), 2: WeakScalingRow(2, "760M", 1024, 128),
    4: WeakScalingRow(4, "1.3B", 1024, 128), 8: WeakScalingRow(8, "2.6B", 1024, 128),
    16: WeakScalingRow(16, "6.7B", 1024, 64), 32: WeakScalingRow(32, "15B", 1024, 128),
    64: WeakScalingRow(64, "39B", 1024, 1024),
}


def gpt_config(name: str) -> GPTConfig:
    if name == "tiny":
        return GPTConfig(vocab=256, seq_len=32, d_model=64, heads=4, layers=4)
    if name not in GPT_SPECS:
        raise ValueError(f"unknown GPT size {name!r}; known: tiny, {', '.join(GPT_SPECS)}")
    hidden, layers, heads = GPT_SPECS[name]
    return GPTConfig(vocab=VOCAB, seq_len=SEQ_LEN, d_model=hidden, heads=heads, layers=layers)


# BERT: Alpa benchmarks BERT with the GPT specifications (its gpt/bert 3D benchmark shares
# `gpt_specs`); meshweave's rows pair them with the GPT weak-scaling GPU counts, batch and micro-batches.
BERT_WEAK_SCALING = GPT_WEAK_SCALING


def bert_config(name: str):
    from meshweave.models.bert import BertConfig

    if name == "tiny":
        return BertConfig(vocab=256, seq_len=32, d_model=64, heads=4, layers=4, d_ff=256)
    if name not in GPT_SPECS:
        raise ValueError(f"unknown BERT size {name!r}; known: tiny, {', '.join(GPT_SPECS)}")
    hidden, layers, heads = GPT_SPECS[name]
    return BertConfig(vocab=VOCAB, seq_len=SEQ_LEN, d_model=hidden, heads=heads, layers=layers, d_ff=4 * hidden)


# GShard MoE (Alpa's `suite_manual_moe.py`: sequence 1024, vocabulary 32000, 16 heads, expert group
# 2048 tokens; every block's MLP is a mixture of experts). name: (hidden, layers, experts)
MOE_SPECS = {
    "380M": (768, 8, 8), "690M": (768, 8, 16), "1.3B": (768, 16, 16), "2.4B": (1024, 16, 16),
    "7.1B": (1280, 16, 32), "10B": (1536, 16, 32), "27B": (2048, 16, 48), "70B": (2048, 32, 64),
}
MOE_WEAK_SCALING = {
    1: WeakScalingRow(1, "380M", 1024, 32), 2: WeakScalingRow(2, "690M", 1024, 32),
    4: WeakScalingRow(4, "1.3B", 1024, 32), 8: WeakScalingRow(8, "2.4B", 1024, 32),
    16: WeakScalingRow(16, "10B", 1024, 16), 32: WeakScalingRow(32, "27B", 1024, 128),
    64: WeakScalingRow(64, "70B", 1024, 64),
}


def moe_config(name: str):
    from meshweave.models.moe_lm import MoELMConfig

    if name == "tiny":
        return MoELMConfig(vocab=256, seq_len=32, d_model=64, heads=4, layers=4, experts=4, group_size=64)
    if name not in MOE_SPECS:
        raise ValueError(f"unknown MoE size {name!r}; known: tiny, {', '.join(MOE_SPECS)}")
    hidden, layers, experts = MOE_SPECS[name]
    return MoELMConfig(vocab=32000, seq_len=SEQ_LEN, d_model=hidden, heads=16, layers=layers, experts=experts,
                       group_size=2048)


# Wide-ResNet (Alpa's `suite_wresnet.py`: 224x224 images, 1024 classes, fp32).
# name: (layers, channels, width factor)
WRESNET_SPECS = {
    "250M": (50, 160, 2), "500M": (50, 224, 2), "1B": (50, 320, 2), "2B": (50, 448, 2), "4B": (50, 640, 2),
    "6.8B": (50, 320, 16), "13B": (101, 320, 16),
}
WRESNET_WEAK_SCALING = {
    1: WeakScalingRow(1, "250M", 1536, 24), 2: WeakScalingRow(2, "500M", 1536, 24),
    4: WeakScalingRow(4, "1B", 1536, 24), 8: WeakScalingRow(8, "2B", 1536, 24),
    16: WeakScalingRow(16, "4B", 1536, 32), 32: WeakScalingRow(32, "6.8B", 1536, 32),
    64: WeakScalingRow(64, "13B", 1520, 38),
}


def wresnet_config(name: str):
    from meshweave.models.wresnet import WResNetConfig

    if name == "tiny":
        return WResNetConfig(image_size=32, layers=8, channels=8, width_factor=2, classes=16)
    if name not in WRESNET_SPECS:
        raise ValueError(f"unknown Wide-ResNet size {name!r}; known: tiny, {', '.join(WRESNET_SPECS)}")
    layers, channels, width = WRESNET_SPECS[name]
    return WResNetConfig(image_size=224, layers=layers, channels=channels, width_factor=width, classes=1024)

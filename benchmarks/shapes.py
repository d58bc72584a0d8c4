"""The benchmark models: Llama shapes (model and batch) and the randomly initialised model built from one."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Every projection of a Llama decoder layer: what the LoRA rows adapt.
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Shape:
    """A Llama model and batch shape, with its default step counts."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    batch_size: int
    seq_len: int
    dtype: str = "bf16"
    tie_word_embeddings: bool = True
    steps: int = 20
    warmup: int = 5

    @property
    def model(self) -> dict[str, Any]:
        """The ``LlamaConfig`` fields of this shape (as the reports record them)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "tie_word_embeddings": self.tie_word_embeddings,
        }


SHAPES: dict[str, Shape] = {
    # Small enough for a CI smoke run on 2 CPU cores; still GQA, still every projection adaptable at r=16.
    "tiny": Shape(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        batch_size=2,
        seq_len=64,
        steps=10,
        warmup=3,
    ),
    # Llama-3.2-1B's depth with every tensor tiny: the kernels take next to no time, so a step's time is what the
    # framework spends around them (Python, dispatch, CUDA launches): the cost that bounds a step once the kernels
    # are fast (the Liger rows on the H200).
    "overhead": Shape(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        batch_size=1,
        seq_len=16,
        dtype="fp32",
        steps=30,
        warmup=5,
    ),
    # Llama-3.2-1B (its embeddings are tied), random init.
    "llama-1b": Shape(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        batch_size=4,
        seq_len=2048,
    ),
    # Llama-3.1-8B (untied embeddings), random init, one long sequence: the gradient-checkpointing rows and
    # benchmarks.max_context.
    "llama-8b": Shape(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        batch_size=1,
        seq_len=4096,
        tie_word_embeddings=False,
        steps=5,
        warmup=2,
    ),
}


def build_model(
    model: Mapping[str, Any], *, seq_len: int, dtype: str, device: torch.device, seed: int = 0
) -> nn.Module:
    """A ``LlamaForCausalLM`` with the ``model`` fields (`Shape.model`), random init from ``seed``, built on
    ``device`` in ``dtype`` (a `DTYPES` key; initialised in it, so an 8B model never needs its fp32 copy), sdpa
    attention, no KV cache, in training mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **model, max_position_embeddings=max(seq_len, 2048), attn_implementation="sdpa", use_cache=False
    )
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[dtype])
    try:
        with device:
            llama = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return llama.to(DTYPES[dtype]).train()

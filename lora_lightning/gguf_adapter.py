"""A LoRA adapter as a GGUF file that llama.cpp applies on top of its base model's GGUF (``--lora``).

llama.cpp's adapter format (``src/llama-adapter.cpp``, ``convert_lora_to_gguf.py``): ``general.type = "adapter"``,
``general.architecture`` of the base, ``adapter.type = "lora"``, one ``adapter.lora.alpha`` for the whole file,
and for each adapted base tensor ``<name>.lora_a`` and ``<name>.lora_b`` (e.g. ``blk.0.attn_q.weight.lora_a``).
llama.cpp adds ``(alpha / r) B A x`` to the layer's output, where ``r`` is that layer's rank. Stored shapes, in
torch's order: a linear layer's ``A`` ``[r, in]`` and ``B`` ``[out, r]`` as they are; the token embedding's
``A^T`` ``[vocab, r]`` and ``B`` ``[dim, r]`` (llama.cpp looks rows of ``lora_a`` up by token). The converter that
made the base GGUF permuted the rows of ``q_proj`` and ``k_proj`` (per head, for its RoPE layout); ``B`` of those
layers gets the same permutation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.export import adapter_to_export
from lora_lightning.files import write_file_atomically
from lora_lightning.layers import LoRAEmbedding, LoRALayer, LoRALinear
from lora_lightning.modules import canonical_name
from lora_lightning.params import lora_layers, tied_parameter_ids, trained_in_full_modules

INSTALL = "pip install 'lora-lightning[deploy]'  (or: pip install gguf)"


def save_gguf_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str | None = None, overwrite: bool = False
) -> Path:
    """Write adapter ``adapter_name`` (the active one by default) of the Hugging Face Llama-family ``model`` as a
    llama.cpp LoRA adapter file: ``llama-cli -m base.gguf --lora path``. Each layer keeps its own scaling ``s``:
    llama.cpp scales by ``alpha / r`` with the file's one ``alpha``, so ``B`` is stored times ``s r / alpha`` (1
    unless rsLoRA or ``alpha_pattern`` make layers differ). Refused before anything is written: DoRA,
    ``modules_to_save`` and convolutions (llama.cpp adapters hold ``A``/``B`` pairs only), layers llama.cpp has no
    tensor for, and an adapted embedding or head whose weight is tied to the other (the base GGUF stores it once)."""
    try:
        import gguf
    except ImportError as err:
        raise ImportError(f"save_gguf_adapter needs the gguf package: {INSTALL}") from err
    path = Path(path)
    name = adapter_to_export(model, adapter_name, "save_gguf_adapter")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "llama":  # the tensor names and the q/k permutation are Llama's
        raise ValueError(
            f"save_gguf_adapter: supports Hugging Face models of model_type 'llama'; this is a "
            f"{type(model).__name__} (model_type {getattr(config, 'model_type', None)!r}); use save_merged and "
            "llama.cpp's convert_hf_to_gguf.py instead"
        )
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    layers = {canonical_name(n): layer for n, layer in lora_layers(model, name)}
    problems = _problems(model, layers, name, names)
    if path.is_dir() or (path.exists() and not overwrite):
        problems.append(f"{str(path)!r} already exists{'' if path.is_dir() else '; pass overwrite=True'}")
    if problems:
        raise ValueError("save_gguf_adapter: cannot write a llama.cpp adapter:\n  - " + "\n  - ".join(problems))

    scales = {n: layer.spec(name).scaling * layer.spec(name).r for n, layer in layers.items()}
    alpha = Counter(scales.values()).most_common(1)[0][0]
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    writer = gguf.GGUFWriter(None, "llama")
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    for module, layer in sorted(layers.items()):
        tensor = names.get_name(module)
        a, b = (f.detach().float().cpu() for f in layer.factors(name))
        b = b * (scales[module] / alpha)
        if isinstance(layer, LoRAEmbedding):
            a = a.t()
        n_head = heads.get(tensor.rsplit(".", 1)[-1])
        if n_head is not None:
            b = rope_permute(b, n_head)
        writer.add_tensor(f"{tensor}.weight.lora_a", a.contiguous().numpy())
        writer.add_tensor(f"{tensor}.weight.lora_b", b.contiguous().numpy())

    with tempfile.TemporaryDirectory() as staging:
        file = Path(staging) / "adapter.gguf"
        writer.write_header_to_file(file)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(file, "rb") as source:
            write_file_atomically(path, lambda target: shutil.copyfileobj(source, target))
    return path


def rope_permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """``rows`` (output channels first) in the order llama.cpp's converter gives a Llama ``q_proj``/``k_proj``
    weight: within each head, the two rotary halves interleaved."""
    return rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _problems(model: nn.Module, layers: dict[str, LoRALayer], adapter_name: str, names: Any) -> list[str]:
    """Why the adapter cannot become a llama.cpp adapter (empty if it can)."""
    problems = []
    saved = [n for n, _ in trained_in_full_modules(model)]
    if saved:
        problems.append(
            f"modules_to_save {saved} are trained in full, which a llama.cpp adapter cannot hold; use save_merged"
        )
    tied = tied_parameter_ids(model)
    for module, layer in sorted(layers.items()):
        if layer.spec(adapter_name).use_dora:
            problems.append(f"{module}: DoRA (llama.cpp applies plain LoRA only); use save_merged")
        elif not isinstance(layer, (LoRALinear, LoRAEmbedding)):
            problems.append(f"{module}: a {type(layer.base_layer).__name__}, which llama.cpp adapters do not take")
        elif names.get_name(module) is None:
            problems.append(f"{module}: llama.cpp has no tensor for this module; exclude it from target_modules")
        elif id(layer.base_layer.weight) in tied:
            problems.append(
                f"{module}: its weight is tied to another module (input embedding and output head), which the base "
                "GGUF stores once; llama.cpp would apply the adapter to both or neither; exclude it or use save_merged"
            )
    return problems

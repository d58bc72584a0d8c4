"""Finding, freezing and counting adapter parameters, structurally (by layer type, never by name)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.layers import AdapterModule, LoRALayer, ModulesToSave


@dataclass(frozen=True)
class ParamSummary:
    trainable: int
    total: int
    adapter: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / self.total if self.total else 0.0
        return (
            f"trainable params: {self.trainable:,} of {self.total:,} ({share:.3f}%); adapter params: {self.adapter:,}"
        )


def lora_layers(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, LoRALayer]]:
    """Every LoRA layer of ``model`` (holding adapter ``adapter_name``, if given) with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALayer) and (adapter_name is None or adapter_name in module.specs):
            yield name, module


def adapter_modules(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, AdapterModule]]:
    """Every module holding adapters (LoRA layers, ``modules_to_save`` copies, trainable token rows) of ``model``
    (holding adapter ``adapter_name``, if given) with its module name, outer ones before those they wrap."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterModule) and (adapter_name is None or adapter_name in module.adapter_names):
            yield name, module


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters of ``model``, in the order the model's modules first hold them (which is not
    necessarily the order they were added)."""
    return list(dict.fromkeys(n for _, module in adapter_modules(model) for n in module.adapter_names))


def trained_in_full_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    """Every ``modules_to_save`` wrapper with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


def named_adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(state_dict key, PEFT file key, tensor)`` for every tensor of adapter ``adapter_name`` (or of every adapter):
    ``A``, ``B``, DoRA magnitudes, ``modules_to_save`` copies (their buffers too) and trainable token rows; both keys
    are relative to ``model``. Tied copies yield their shared tensor under each key."""
    for name, module in adapter_modules(model, adapter_name):
        prefix = f"{name}." if name else ""
        for adapter in [adapter_name] if adapter_name else module.adapter_names:
            for file_key, tensor in module.adapter_tensors(adapter).items():
                yield prefix + module.state_key(adapter, file_key), prefix + file_key, tensor


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """The trainable tensors of adapter ``adapter_name``, or of every adapter: ``A``, ``B``, DoRA magnitudes, the
    parameters of ``modules_to_save`` copies and trainable token rows, each once."""
    seen = set()
    for _, _, tensor in named_adapter_tensors(model, adapter_name):
        if isinstance(tensor, nn.Parameter) and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """``id``s of the parameters more than one module holds (e.g. an output head tied to the embeddings)."""
    holders = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in holders.items() if count > 1}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """What a LoRA fine-tune changes: the tensors of adapter ``adapter_name`` (or of every adapter), its
    ``modules_to_save`` copies and trainable token rows included, keyed as in ``model.state_dict()`` (detached; no
    copies). The originals of ``modules_to_save`` are the frozen base: not included."""
    return {key: tensor.detach() for key, _, tensor in named_adapter_tensors(model, adapter_name)}


def mark_only_adapters_trainable(model: nn.Module, adapter_name: str | None = None) -> None:
    """Freeze every parameter, then make adapter ``adapter_name`` (or every adapter) trainable, its
    ``modules_to_save`` copies and trainable token rows included."""
    model.requires_grad_(False)
    for param in adapter_parameters(model, adapter_name):
        param.requires_grad_(True)


def param_summary(model: nn.Module) -> ParamSummary:
    """Parameter counts; a 4-bit layer's packed weight counts as the ``in x out`` weights it stands for."""
    params = list(model.parameters())  # shared (tied) parameters counted once
    unpacked = {id(m.weight): m.in_features * m.out_features for m in model.modules() if quant.is_quantized(m)}
    return ParamSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(unpacked.get(id(p), p.numel()) for p in params),
        adapter=sum(p.numel() for p in adapter_parameters(model)),
    )

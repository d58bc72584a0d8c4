"""Finding, freezing and counting adapter parameters, structurally (by layer type, never by name)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.layers import LoRALayer

# Attribute set on a module listed in `LoRAConfig.modules_to_save`: trained in full and saved with the adapter.
_TRAINED_IN_FULL = "_lora_trained_in_full"


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


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters of ``model``, in the order the model's layers first hold them (which is not
    necessarily the order they were added)."""
    return list(dict.fromkeys(n for _, layer in lora_layers(model) for n in layer.adapter_names))


def mark_trained_in_full(module: nn.Module) -> None:
    setattr(module, _TRAINED_IN_FULL, True)


def trained_in_full_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module marked by ``modules_to_save`` with its module name."""
    for name, module in model.named_modules():
        if getattr(module, _TRAINED_IN_FULL, False):
            yield name, module


def named_adapter_tensors(model: nn.Module, adapter_name: str | None = None) -> Iterator[tuple[str, str, nn.Parameter]]:
    """``(state_dict key, PEFT file key, tensor)`` for every tensor (``A``, ``B``, DoRA magnitude) of adapter
    ``adapter_name``, or of every adapter; both keys are relative to ``model``."""
    for name, layer in lora_layers(model, adapter_name):
        prefix = f"{name}." if name else ""
        for adapter in [adapter_name] if adapter_name else layer.adapter_names:
            for file_key, tensor in layer.adapter_tensors(adapter).items():
                yield prefix + layer.state_key(adapter, file_key), prefix + file_key, tensor


def adapter_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """The trainable tensors (``A``, ``B``, DoRA magnitudes) of adapter ``adapter_name``, or of every adapter."""
    for _, _, tensor in named_adapter_tensors(model, adapter_name):
        yield tensor


def tied_parameter_ids(model: nn.Module) -> set[int]:
    """``id``s of the parameters more than one module holds (e.g. an output head tied to the embeddings)."""
    holders = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    return {key for key, count in holders.items() if count > 1}


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
    """What a LoRA fine-tune changes: the tensors of adapter ``adapter_name`` (or of every adapter) and of
    ``modules_to_save``, keyed as in ``model.state_dict()`` (detached; no copies)."""
    state = {key: tensor.detach() for key, _, tensor in named_adapter_tensors(model, adapter_name)}
    for name, module in trained_in_full_modules(model):
        state.update(module.state_dict(prefix=f"{name}." if name else "", keep_vars=False))
    return state


def mark_only_adapters_trainable(model: nn.Module, adapter_name: str | None = None) -> None:
    """Freeze every parameter, then make adapter ``adapter_name`` (or every adapter) and the
    ``modules_to_save`` modules trainable."""
    model.requires_grad_(False)
    for param in adapter_parameters(model, adapter_name):
        param.requires_grad_(True)
    for _, module in trained_in_full_modules(model):
        module.requires_grad_(True)


def param_summary(model: nn.Module) -> ParamSummary:
    """Parameter counts; a 4-bit layer's packed weight counts as the ``in x out`` weights it stands for."""
    params = list(model.parameters())  # shared (tied) parameters counted once
    unpacked = {id(m.weight): m.in_features * m.out_features for m in model.modules() if quant.is_quantized(m)}
    return ParamSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(unpacked.get(id(p), p.numel()) for p in params),
        adapter=sum(p.numel() for p in adapter_parameters(model)),
    )

"""Finding, freezing and counting adapter parameters, structurally (by layer type, never by name)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lora_lightning.layers import LoRALinear

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


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """Every LoRA layer of ``model`` with its module name."""
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def mark_trained_in_full(module: nn.Module) -> None:
    setattr(module, _TRAINED_IN_FULL, True)


def trained_in_full_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module marked by ``modules_to_save`` with its module name."""
    for name, module in model.named_modules():
        if getattr(module, _TRAINED_IN_FULL, False):
            yield name, module


def adapter_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The ``A`` and ``B`` matrices of every LoRA layer."""
    for _, layer in lora_layers(model):
        yield layer.lora_A.weight
        yield layer.lora_B.weight


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a LoRA fine-tune changes: adapter matrices and ``modules_to_save`` tensors, keyed as in
    ``model.state_dict()`` (detached; no copies)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model):
        prefix = f"{name}." if name else ""
        state[f"{prefix}lora_A.weight"] = layer.lora_A.weight.detach()
        state[f"{prefix}lora_B.weight"] = layer.lora_B.weight.detach()
    for name, module in trained_in_full_modules(model):
        state.update(module.state_dict(prefix=f"{name}." if name else "", keep_vars=False))
    return state


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter, then make adapters and ``modules_to_save`` modules trainable."""
    model.requires_grad_(False)
    for param in adapter_parameters(model):
        param.requires_grad_(True)
    for _, module in trained_in_full_modules(model):
        module.requires_grad_(True)


def param_summary(model: nn.Module) -> ParamSummary:
    params = list(model.parameters())  # shared (tied) parameters counted once
    return ParamSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        adapter=sum(p.numel() for p in adapter_parameters(model)),
    )

"""Adapter helpers shared by the library tests: noise that moves adapters off their initial values (ours and
PEFT's), a snapshot that proves a failed call left a model untouched, and folder contents."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora_lightning import LoRAConfig, inject_lora
from lora_lightning.params import lora_layers, trained_in_full_modules
from tests.helpers.models import make_mlp


def perturb_lora_b_(model: nn.Module, seed: int = 5) -> nn.Module:
    """Noise into every lora_B and every ``modules_to_save`` tensor of our model, so outputs differ from the base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            weight = layer.lora_B["default"].weight
            weight.copy_(0.1 * torch.randn(weight.shape, generator=generator))
        for _, module in trained_in_full_modules(model):
            for param in module.parameters():
                param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model


def perturb_adapters_(model: nn.Module, seed: int = 7, scale: float = 0.1) -> nn.Module:
    """Move every adapter tensor of ours or of a PEFT model off its initial value, reproducibly: ``scale`` x noise
    into ``A`` and ``B``, and DoRA magnitudes scaled by ``1 + 0.2`` x noise (they stay positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator).to(param.device)
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * noise)
            elif "lora_" in name:
                param.add_(scale * noise)
    return model


def perturb_peft_adapter(model: nn.Module, seed: int) -> None:
    """Move a PEFT model's adapters (B = 0; an embedding's A = 0) and ``modules_to_save`` copies off their initial
    values, reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(key in name for key in ("lora_B", "lora_embedding_A", "modules_to_save")):
                param.add_(0.2 * torch.randn(param.shape, generator=generator))


def adapted_mlp(seed: int = 0, noise_seed: int = 5, **config) -> nn.Sequential:
    """The tiny MLP with random, non-zero adapters on its hidden layers ("0" and "2")."""
    model = make_mlp(seed)
    inject_lora(model, LoRAConfig(**{"r": 4, "alpha": 8, **config}))
    return perturb_lora_b_(model, noise_seed).eval()


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave as it was: the module tree and its repr, tensors, trainability and the
    LoRA layers' adapter state."""
    return {
        "structure": repr(model),
        "modules": [(name, type(module)) for name, module in model.named_modules()],
        "tensors": {key: value.detach().clone() for key, value in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "layers": {
            name: (layer.active_adapter, layer.disabled, layer.merged_adapter, dict(layer.specs))
            for name, layer in lora_layers(model)
        },
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"], "the module tree changed (LoRA layers injected or removed?)"
    assert after["structure"] == before["structure"], "a module's settings changed"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["layers"] == before["layers"], "active/disabled/merged adapters or specs changed"
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, tensor in before["tensors"].items():
        assert torch.equal(after["tensors"][key], tensor), f"{key} changed"


def folder_bytes(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def leftovers(parent: Path) -> list[str]:
    """Staging files and folders that a save left next to its target."""
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or p.name.endswith(".old")]

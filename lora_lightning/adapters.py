"""Several named adapters on one base model: switch the active one, run without any, delete one.

Every LoRA layer (and every ``modules_to_save`` or trainable-tokens wrapper) holds its adapters by name and runs the
active one; the functions here act on all of them at once. `inject_lora` and `load_adapter` add adapters (the
newest becomes active), `save_adapter` writes one by name, and `mark_only_adapters_trainable(model, name)` trains
one while the others stay frozen.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lora_lightning.modules import replace_module
from lora_lightning.params import adapter_modules, adapter_names, lora_layers


def active_adapter(model: nn.Module) -> str | None:
    """The adapter the model's LoRA layers run (``None`` if none is active)."""
    active = {module.active_adapter for _, module in adapter_modules(model)}
    if len(active) > 1:
        raise RuntimeError(f"the model's LoRA layers disagree on the active adapter: {sorted(map(str, active))}")
    return next(iter(active), None)


def set_active_adapter(model: nn.Module, name: str) -> None:
    """Make every LoRA layer run adapter ``name``; layers without it run their base layer alone (and
    ``modules_to_save`` without a copy for it their original module)."""
    names = adapter_names(model)
    if name not in names:
        raise KeyError(f"set_active_adapter: the model has no adapter {name!r}; it has {names}")
    merged = sorted({layer.merged_adapter for _, layer in lora_layers(model) if layer.merged} - {name})
    if merged:
        raise RuntimeError(f"set_active_adapter: adapters {merged} are merged into the base; unmerge them first")
    for _, module in adapter_modules(model):
        module.active_adapter = name


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model alone inside the ``with`` block (e.g. for a reference output); adapters come
    back afterwards, also when the block raises."""
    merged = [layer.merged_adapter for _, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"disable_adapters: adapter {merged[0]!r} is merged into the base; unmerge it first")
    layers = [module for _, module in adapter_modules(model)]
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before, strict=True):
            layer.disabled = was


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer (and its ``modules_to_save`` copies and trainable token rows); a
    module left without adapters becomes the module it wraps again. If ``name`` was the active adapter, none is
    active afterwards (the model runs its base layers) until `set_active_adapter` picks one."""
    modules = list(adapter_modules(model, name))
    if not modules:
        raise KeyError(f"delete_adapter: the model has no adapter {name!r}; it has {adapter_names(model)}")
    merged = [n for n, layer in lora_layers(model, name) if layer.merged_adapter == name]
    if merged:
        raise RuntimeError(f"delete_adapter: adapter {name!r} is merged into {merged[:3]}; unmerge it first")
    for module_name, module in reversed(modules):  # inner modules first: an outer one's removal renames them
        module.delete_adapter(name)
        if not module.adapter_names:
            replace_module(model, module_name, module.wrapped)
    for _, module in adapter_modules(model):  # modules without the adapter named it active too
        if module.active_adapter == name:
            module.active_adapter = None

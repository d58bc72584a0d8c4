"""Pure functions that put LoRA layers into a model and take them out again."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import nn

from lora_lightning.config import ALL_LINEAR, LoRAConfig
from lora_lightning.layers import LoRALinear
from lora_lightning.params import (
    ParamSummary,
    lora_layers,
    mark_only_adapters_trainable,
    mark_trained_in_full,
    param_summary,
)

SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear,)


class TargetError(ValueError):
    """The configured target, exclude or modules_to_save names do not fit the model."""


@dataclass(frozen=True)
class InjectionReport:
    """What `inject_lora` adapted, and the parameter counts afterwards."""

    targets: list[str]
    modules_to_save: list[str]
    params: ParamSummary

    def __str__(self) -> str:
        saved = f"; trained in full: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        return f"LoRA on {len(self.targets)} layers; {self.params}{saved}"


@dataclass(frozen=True)
class _Plan:
    targets: list[str]
    modules_to_save: list[str]


def find_targets(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Names of the layers `inject_lora` would adapt; raises `TargetError` listing candidates."""
    return _plan(model, config).targets


def inject_lora(model: nn.Module, config: LoRAConfig) -> InjectionReport:
    """Wrap every targeted layer in a `LoRALinear`, freeze all other parameters (``modules_to_save``
    stay trainable) and return a report. Everything is checked first: on error the model is untouched."""
    plan = _plan(model, config)
    for name in plan.targets:
        base = model.get_submodule(name)
        layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora)
        _replace(model, name, layer)
    for name in plan.modules_to_save:
        mark_trained_in_full(model.get_submodule(name))
    mark_only_adapters_trainable(model)
    return InjectionReport(plan.targets, plan.modules_to_save, param_summary(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back (zero inference overhead)."""
    for name, layer in list(lora_layers(model)):
        if not layer.merged:
            layer.merge()
        _replace(model, name, layer.base_layer)
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, restoring the original layers and weights."""
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        _replace(model, name, layer.base_layer)
    return model


def matches(name: str, pattern: list[str] | str) -> bool:
    """Whether a module name is selected by a list of names/dotted suffixes or a full-match regex."""
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def _plan(model: nn.Module, config: LoRAConfig) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    if not isinstance(config, LoRAConfig):
        raise TypeError(
            f"config must be a LoRAConfig, got {type(config).__name__}; build one with LoRAConfig(r=8, ...) "
            "or LoRAConfig.from_dict(values)"
        )
    existing = [name for name, _ in lora_layers(model)]
    if existing:
        raise TargetError(
            f"the model already has LoRA adapters on {len(existing)} layers (e.g. {existing[0]!r}); "
            "call merge_lora(model) or unload_lora(model) before injecting again"
        )
    modules = {name: module for name, module in model.named_modules() if name}
    problems: list[str] = []

    saved = _select(modules, config.modules_to_save, "modules_to_save", problems) if config.modules_to_save else []
    inside_saved = {n for n in modules if any(n == s or n.startswith(s + ".") for s in saved)}

    if config.target_modules == ALL_LINEAR:
        heads = _output_heads(model)
        targets = [n for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS) and n not in heads]
    else:
        targets = _select(modules, config.target_modules, "target_modules", problems)
        unsupported = [
            f"{n} ({type(modules[n]).__name__})" for n in targets if not isinstance(modules[n], SUPPORTED_LAYERS)
        ]
        if unsupported:
            kinds = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            problems.append(f"target_modules selects layers of unsupported types: {unsupported}; supported: {kinds}")
    if config.exclude_modules:
        excluded = set(_select(modules, config.exclude_modules, "exclude_modules", problems))
        targets = [n for n in targets if n not in excluded]
    in_saved = [n for n in targets if n in inside_saved]
    targets = [n for n in targets if n not in inside_saved]

    if not targets and not problems:
        why = f" (modules_to_save={saved} holds {in_saved}, which are trained in full instead)" if in_saved else ""
        problems.append(f"target_modules={config.target_modules!r} leaves no layer to adapt{why}")
    for name in targets:
        module = modules[name]
        if isinstance(module, nn.Linear) and config.r > min(module.in_features, module.out_features):
            problems.append(
                f"r={config.r} exceeds layer {name!r} ({module.in_features} -> {module.out_features}); "
                f"use r <= {min(module.in_features, module.out_features)} or exclude the layer"
            )
    if problems:
        raise TargetError(
            "cannot inject LoRA:\n  - " + "\n  - ".join(problems) + f"\nadaptable layers: {_candidates(modules)}"
        )
    return _Plan(targets, saved)


def _select(modules: dict[str, nn.Module], pattern: list[str] | str, field: str, problems: list[str]) -> list[str]:
    """Module names matching ``pattern``; every list entry (or the regex) must match at least one."""
    selected = [n for n in modules if matches(n, pattern)]
    if isinstance(pattern, str):
        unmatched = [] if selected else [pattern]
    else:
        unmatched = [entry for entry in pattern if not any(matches(n, [entry]) for n in selected)]
    if unmatched:
        problems.append(f"{field}: {unmatched} match no module of the model")
    return selected


def _output_heads(model: nn.Module) -> set[str]:
    """The output projection that 'all-linear' leaves alone: the module any (sub)model reports from
    ``get_output_embeddings()`` (Hugging Face models), else the last ``nn.Linear`` of the model."""
    named = list(model.named_modules())
    heads = set()
    for _, module in named:
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Module):
            heads.update(n for n, m in named if m is head)
    if not heads:
        linears = [n for n, m in named if isinstance(m, nn.Linear)]
        heads.update(linears[-1:])
    return heads


def _candidates(modules: dict[str, nn.Module], limit: int = 20) -> str:
    counts = Counter(n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, SUPPORTED_LAYERS))
    if not counts:
        return "none (the model has no nn.Linear layer)"
    shown = [f"{leaf} (x{count})" if count > 1 else leaf for leaf, count in counts.most_common(limit)]
    more = f", ... {len(counts) - limit} more" if len(counts) > limit else ""
    return ", ".join(shown) + more


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)

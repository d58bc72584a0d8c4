"""``adapter_config.json``: what a model's adapter writes there (`peft_config`) and what loading reads from one
(`read_peft_config`), both through `peft_format`'s one table of fields; `rebuilding_config`, the same values as a
`LoRAConfig` (what a checkpoint records to inject its adapters again)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

from torch import nn

from lora_lightning.config import LoRAConfig, _shown, field_problems
from lora_lightning.layers import AdapterModule, LoRALayer, LoRAParameter, ModulesToSave, TrainableTokens
from lora_lightning.modules import canonical_name, is_within
from lora_lightning.params import adapter_modules
from lora_lightning.peft_format import PEFT_KEYS, RESEARCH_FIELDS, from_peft, is_off, to_peft

# The adapter_config.json fields that loading uses; the LoRA targets come from the tensor file's keys.
LOADED_FIELDS = (
    "r",
    "alpha",
    "dropout",
    "use_rslora",
    "use_dora",
    "init",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "modules_to_save",
    "target_parameters",
    "trainable_token_indices",
    "ensure_weight_tying",
)
_SHARED = ("dropout", "use_rslora", "use_dora", "init", "lora_bias")  # one value per adapter in a PEFT config


def peft_config(model: nn.Module, adapter_name: str, base_model_name_or_path: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` values of adapter ``adapter_name`` of ``model`` (names relative to ``model``)."""
    values, layers = _config_values(model, adapter_name)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        **to_peft(values),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for layer in layers.values()),
        "inference_mode": True,
        "peft_type": "LORA",
        "task_type": None,
    }


def rebuilding_config(model: nn.Module, adapter_name: str) -> LoRAConfig:
    """The `LoRAConfig` that injects adapter ``adapter_name`` of ``model`` again, as it is, into a model built like
    ``model``: its layers and parameters with their own ``r``/``alpha``, its ``modules_to_save`` and token rows."""
    return LoRAConfig(**_config_values(model, adapter_name)[0])


def _config_values(model: nn.Module, adapter_name: str) -> tuple[dict[str, Any], dict[str, LoRALayer]]:
    """The `LoRAConfig` values of adapter ``adapter_name`` of ``model``, and its LoRA layers by name."""
    modules = list(adapter_modules(model, adapter_name))
    outer = [(n, m) for n, m in modules if not any(is_within(n, o) and n != o for o, _ in modules)]
    layers = {canonical_name(n): m for n, m in outer if isinstance(m, LoRALayer) and not isinstance(m, LoRAParameter)}
    parameters = {
        canonical_name(f"{_owner(n)}.{m.parameter_name}"): m for n, m in modules if isinstance(m, LoRAParameter)
    }
    specs = {name: m.spec(adapter_name) for name, m in (layers | parameters).items()}
    shared = Counter(tuple(getattr(s, f) for f in _SHARED) for s in specs.values())
    if len(shared) > 1:
        raise NotImplementedError(f"save_adapter: layers with different {'/'.join(_SHARED)}: {sorted(shared)}")
    values: dict[str, Any] = dict(zip(_SHARED, shared.most_common(1)[0][0], strict=True))
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    saved = {canonical_name(n): m for n, m in outer if isinstance(m, ModulesToSave)}
    tokens = {
        canonical_name(n): m.token_indices[adapter_name]
        for n, m in outer
        if isinstance(m, TrainableTokens) and m.tied_to is None
    }
    values |= {
        "r": r,
        "alpha": alpha,
        "target_modules": _targets(model, sorted(layers)),
        "exclude_modules": None,
        "modules_to_save": sorted(saved) or None,
        "rank_pattern": {"^" + re.escape(n): s.r for n, s in sorted(specs.items()) if s.r != r},
        "alpha_pattern": {"^" + re.escape(n): s.alpha for n, s in sorted(specs.items()) if s.alpha != alpha},
        "target_parameters": sorted(parameters) or None,
        "trainable_token_indices": tokens or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "ensure_weight_tying": _copies_tied([m.adapter_tensors(adapter_name) for m in saved.values()]),
    }
    return values, layers


def _owner(name: str) -> str:
    """The module a `LoRAParameter` at ``name`` adapts: ``name`` without the wrappers of its other parameters."""
    parts = name.split(".")
    return ".".join(parts[: parts.index("base_layer")] if "base_layer" in parts else parts)


def _targets(model: nn.Module, names: list[str]) -> list[str] | str | None:
    """``names`` as PEFT's ``target_modules``: a list (PEFT matches its entries also as dotted suffixes), or a regex
    of them when an entry is a dotted suffix of another module's name ("0" would also pick "1.0")."""
    if not names:
        return None
    inside = tuple(f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterModule))
    suffixes = {
        name.split(".", i)[i]
        for name in (canonical_name(n) for n, _ in model.named_modules() if n and not n.startswith(inside))
        if name not in names
        for i in range(1, name.count(".") + 1)
    }
    return "|".join(re.escape(t) for t in names) if suffixes & set(names) else names


def _copies_tied(copies: list[dict[str, Any]]) -> bool:
    """Whether ``modules_to_save`` copies share a tensor (ties kept by ``ensure_weight_tying``)."""
    seen = Counter(id(t) for tensors in copies for t in tensors.values())
    return any(count > 1 for count in seen.values())


def read_peft_config(data: bytes, file: Path) -> dict[str, Any]:
    """The `LoRAConfig` values of ``LOADED_FIELDS`` in ``adapter_config.json``, each checked by `LoRAConfig`'s own
    rules; what lora-lightning does not implement is refused by PEFT's key. Every problem is reported at once as a
    `ValueError`."""
    try:
        peft = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also an int of 4,300+ digits
        raise ValueError(f"{str(file)!r} is not valid JSON ({err})") from None
    if not isinstance(peft, dict):
        raise ValueError(f"{str(file)!r} must hold a JSON object")
    problems = []
    if peft.get("peft_type") != "LORA":
        problems.append(f"peft_type={peft.get('peft_type')!r}: only 'LORA' adapters load")
    if peft.get("bias", "none") not in ("none", None):
        problems.append(f"bias={peft['bias']!r}: not supported; only 'none'")
    if peft.get("fan_in_fan_out") not in (True, False, None):  # follows from the layer type (GPT-2's Conv1D)
        problems.append(f"fan_in_fan_out={peft['fan_in_fan_out']!r}: must be true or false (a bool)")
    for key, method in RESEARCH_FIELDS.items():
        if not is_off(peft.get(key)):
            problems.append(f"{key}={_shown(peft[key])}: {method}, which is not implemented by lora-lightning")
    values = from_peft(peft, LOADED_FIELDS)
    for field, value in values.items():
        problems += field_problems(field, value, shown_as=PEFT_KEYS[field])
    if problems:
        raise ValueError(f"{str(file)!r} has unusable fields: " + "; ".join(problems))
    return values

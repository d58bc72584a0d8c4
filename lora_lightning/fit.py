"""Whether an adapter file fits a model: every tensor has its place, of its shape and kind of dtype, in the adapter
the model has or `inject.planned_tensors` would give it, and every such place a tensor; all mismatches are reported at
once, each naming the module or key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_lightning.config import LoRAConfig
from lora_lightning.layers import LoRALayer, LoRAParameter, innermost, lora_layer_type
from lora_lightning.modules import canonical_name, is_within
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import is_lora, outer_module


class FitError(ValueError):
    """The adapter file does not fit the model; the message lists every problem."""


def check_fit(
    model: nn.Module,
    values: dict[str, Any],
    adapter_name: str,
    by_module: dict[str, dict[str, torch.Tensor]],
    planned: dict[str, tuple[str, dict[str, tuple[int, ...]]]],
    names: dict[str, str],
    file: Path,
) -> dict[str, str]:
    """Every tensor of the file must have its place, of its shape, in the adapter the model has or will have (and
    every such place a tensor); all mismatches are reported at once. Returns the model's state-dict key of each base
    weight PEFT saves beside a targeted embedding (``save_embedding_layers``), which loads into that base layer."""
    problems = []
    existing = {canonical_name(n): layer for n, layer in lora_layers(model, adapter_name)}
    lora_in_file = {m for m, held in by_module.items() if m and is_lora(held)}
    if existing and set(existing) != lora_in_file:
        problems.append(
            f"the model already has adapter {adapter_name!r} on {len(existing)} modules that differ from the "
            f"file's {len(lora_in_file)} (e.g. {sorted(set(existing) ^ lora_in_file)[:3]}); "
            f"delete_adapter(model, {adapter_name!r}) or load it under another adapter_name"
        )
    merged = sorted(
        {la.merged_adapter for n, la in lora_layers(model) if la.merged and canonical_name(n) not in lora_in_file}
    )
    if merged:  # (merged layers that the file touches are reported below, one by one)
        problems.append(f"adapters {merged} are merged into the base; unmerge() them before loading {adapter_name!r}")
    saved = [n for n, (kind, _) in planned.items() if kind == "modules_to_save"]
    for name, held in sorted(by_module.items()):
        if not name:
            continue
        owner = next((s for s in saved if is_within(name, s)), None)
        if owner is not None:
            problems.append(
                f"{name}: has LoRA tensors but is inside modules_to_save entry {owner!r}; it is one or the other"
            )
            continue
        layer = model.get_submodule(names[name]) if name in names else None
        if isinstance(layer, LoRALayer) and layer.merged:
            problems.append(f"{name}: the model's LoRA layer is merged; unmerge() it or unload_lora(model) first")
            continue
        if name in existing and existing[name].spec(adapter_name) != _file_spec(values, name, existing[name]):
            problems.append(
                f"{name}: the model's adapter {adapter_name!r} has {existing[name].spec(adapter_name)}; the file "
                f"{_file_spec(values, name, existing[name])}"
            )
            continue
        if name not in planned:
            problems.append(_unplaced(model, name, names))
            continue
        kind, needed = planned[name]
        if set(held) != set(needed):
            present = ", ".join(sorted(held))
            problems.append(f"{name}: only {present} present; a {kind} needs {sorted(needed)}")
            continue
        for key, shape in needed.items():
            problems += _tensor_problems(f"{name}.{key}", held[key], shape, "the model needs", float_only=True)
    for name, (kind, needed) in sorted(planned.items()):
        if name not in by_module and kind != "modules_to_save":
            problems.append(f"{name}: no tensors in the file; a {kind} needs {sorted(needed)}")
    copies = _check_copies(model, by_module.get("", {}), planned, by_module, names, values, problems)
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise FitError(f"{str(file)!r} does not fit this model:\n  - {shown}")
    return copies


def _file_spec(values: dict[str, Any], name: str, layer: LoRALayer) -> Any:
    config = LoRAConfig(**{k: v for k, v in values.items() if k not in ("modules_to_save", "target_parameters")})
    if isinstance(layer, LoRAParameter):
        return config.spec_for(f"{outer_module(name)}.{layer.parameter_name}")
    return config.spec_for(name)


def _unplaced(model: nn.Module, name: str, names: dict[str, str]) -> str:
    """Why the file's LoRA tensors of module ``name`` have no place in the model."""
    if outer_module(name) not in names:
        return f"{name}: no such module in the model"
    module = innermost(model.get_submodule(names[outer_module(name)]))
    if lora_layer_type(module) is None:
        return f"{name}: a {type(module).__name__}, which takes no LoRA, in the model"
    return f"{name}: the adapter has no LoRA layer there"


def _tensor_problems(key: str, tensor: torch.Tensor, shape: tuple[int, ...], needs: str, float_only: bool) -> list[str]:
    if tuple(tensor.shape) != tuple(shape):
        return [f"{key}: shape {tuple(tensor.shape)} in the file, {needs} {tuple(shape)}"]
    if float_only and not tensor.is_floating_point():
        return [f"{key}: dtype {tensor.dtype} in the file; adapters are floats"]
    return []


def _check_copies(
    model: nn.Module,
    extra: dict[str, torch.Tensor],
    planned: dict[str, tuple[str, dict[str, tuple[int, ...]]]],
    by_module: dict[str, dict[str, torch.Tensor]],
    names: dict[str, str],
    values: dict[str, Any],
    problems: list[str],
) -> dict[str, str]:
    """The file's tensors that are not LoRA tensors: ``modules_to_save`` copies (every tensor of each copy, of the
    module's shape and kind of dtype) and the base weights PEFT saves beside a targeted embedding's adapter."""
    state = model.state_dict()
    saved = {n: needed for n, (kind, needed) in planned.items() if kind == "modules_to_save"}
    base_keys = {}
    for key, tensor in sorted(extra.items()):
        owner = next((s for s in saved if is_within(key, s)), None)
        layer, base, param = key.rpartition(".base_layer.")
        if owner is not None and key[len(owner) + 1 :] in saved[owner]:
            model_key = names[owner] + key[len(owner) :]
            model_key = model_key if model_key in state else f"{names[owner]}.original_module{key[len(owner) :]}"
            found = _tensor_problems(key, tensor, saved[owner][key[len(owner) + 1 :]], "the model has", False)
            if not found and (
                tensor.is_floating_point() != state[model_key].is_floating_point() or tensor.is_complex()
            ):
                found = [f"{key}: dtype {tensor.dtype} in the file, the model has {state[model_key].dtype}"]
            problems += found
        elif owner is None and base and layer in by_module and is_lora(by_module[layer]) and layer in names:
            # PEFT also saves the base weight of a targeted embedding (save_embedding_layers); it loads into the
            # base layer, which is wrapped by the time it is copied
            target = f"{names[layer]}.base_layer.{param}"
            model_key = target if target in state else f"{names[layer]}.{param}"
            if model_key not in state:
                problems.append(f"{key}: no such tensor in the model")
            else:
                problems += _tensor_problems(key, tensor, state[model_key].shape, "the model has", False)
                base_keys[key] = target
        elif owner is not None:
            problems.append(f"{key}: no such tensor in the model")
        else:
            problems.append(
                f"{key}: neither a LoRA tensor nor a tensor of a module of the model that "
                f"modules_to_save={values['modules_to_save']} names"
            )
    for owner, needed in sorted(saved.items()):
        absent = sorted(k for k in needed if f"{owner}.{k}" not in extra)
        if absent:
            problems.append(f"{owner}: modules_to_save tensors {absent} are not in the file")
    if values["ensure_weight_tying"]:  # tied copies are one tensor: the file must give it one value
        problems += _tie_problems(model, saved, names, extra)
    return base_keys


def _tie_problems(
    model: nn.Module,
    saved: dict[str, dict[str, tuple[int, ...]]],
    names: dict[str, str],
    extra: dict[str, torch.Tensor],
) -> list[str]:
    keys_of: dict[int, list[str]] = {}
    for owner in saved:
        for key, tensor in innermost(model.get_submodule(names[owner])).state_dict(keep_vars=True).items():
            keys_of.setdefault(id(tensor), []).append(f"{owner}.{key}")
    problems = []
    for keys in keys_of.values():
        present = [k for k in keys if k in extra]
        if any(not torch.equal(extra[k], extra[present[0]]) for k in present[1:]):
            problems.append(f"{present}: tied in the model (ensure_weight_tying), but the file's tensors differ")
    return problems

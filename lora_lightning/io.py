"""Adapters on disk in Hugging Face PEFT's format (`lora_lightning.peft_format`): one adapter per folder.

Loading never unpickles: JSON and safetensors only. Writes are atomic (`lora_lightning.files`): the folder is
built next to the target and replaces it in one step.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from lora_lightning.adapters import active_adapter, set_active_adapter
from lora_lightning.config import LoRAConfig, field_problems, is_adapter_name
from lora_lightning.files import read_files, reworded, write_folder_atomically
from lora_lightning.inject import InjectionReport, find_targets, inject_lora
from lora_lightning.layers import LoRALayer, lora_layer_type
from lora_lightning.modules import canonical_name, is_within, name_matcher
from lora_lightning.params import (
    adapter_names,
    lora_layers,
    mark_only_adapters_trainable,
    mark_trained_in_full,
    named_adapter_tensors,
    param_summary,
    trained_in_full_modules,
)
from lora_lightning.peft_format import (
    ADAPTER_FILES,
    ADAPTER_KEYS,
    CARD_NAME,
    CONFIG_NAME,
    PEFT_KEYS,
    PEFT_PREFIX,
    TASK_TYPES,
    WEIGHTS_NAME,
    from_peft,
    to_peft,
)

# The adapter_config.json fields that loading uses; the targets come from the tensor file's keys.
LOADED_FIELDS = ("r", "alpha", "dropout", "use_rslora", "use_dora", "init", "rank_pattern", "alpha_pattern")
MAX_CONFIG_BYTES = 16 * 2**20  # PEFT's adapter_config.json files are a few kB


class AdapterFormatError(ValueError):
    """An adapter folder that is missing, malformed, or does not fit the model."""


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    state_dict: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` (the active one by default) of ``model`` as a PEFT folder at ``path``.
    Keys are relative to ``model``: pass the module PEFT will wrap (e.g. the Hugging Face model inside a
    LightningModule). ``task_type`` (PEFT's, e.g. ``"CAUSAL_LM"`` or ``"SEQ_CLS"``) tells
    ``PeftModel.from_pretrained`` which task model to build. ``state_dict`` (keyed like ``model.state_dict()``)
    supplies the tensors instead of the model's own, e.g. the full tensors an FSDP strategy gathered from the
    ranks' shards."""
    path = Path(path)
    _check_adapter_name("save_adapter", adapter_name, optional=True)
    base_model_name_or_path = _base_model_name(base_model_name_or_path)
    if task_type is not None and task_type not in TASK_TYPES:
        raise AdapterFormatError(
            f"save_adapter(task_type={task_type!r}): must be None or one of PEFT's task types {list(TASK_TYPES)}"
        )
    if adapter_name is None:
        adapter_name = active_adapter(model) if list(lora_layers(model)) else None
    layers = list(lora_layers(model, adapter_name)) if adapter_name else []
    if not layers:
        have = adapter_names(model)
        if not have:
            raise AdapterFormatError(
                "save_adapter: the model has no LoRA layers; call inject_lora(model, config) first"
            )
        raise AdapterFormatError(
            f"save_adapter: the model has no adapter {adapter_name!r} (it has {have}); "
            "call inject_lora(model, config) first, or name one of its adapters"
        )
    if path.exists() and not overwrite:
        raise FileExistsError(f"save_adapter: {str(path)!r} already exists; pass overwrite=True to replace it")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"save_adapter: {str(path)!r} is a file, not an adapter folder")
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"save_adapter: cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    foreign = sorted(f.name for f in path.iterdir() if f.name not in ADAPTER_FILES) if path.exists() else []
    if foreign:
        raise FileExistsError(
            f"save_adapter: {str(path)!r} holds other files {foreign[:5]}; overwrite=True replaces the whole "
            "folder, so it only replaces adapter folders; choose an empty or new path"
        )
    config = _peft_config(model, layers, adapter_name, base_model_name_or_path) | {"task_type": task_type}
    full = None if state_dict is None else {canonical_name(k): v for k, v in state_dict.items()}
    own = {  # model key -> (file key, the model's own tensor)
        canonical_name(key): (canonical_name(file_key), tensor)
        for key, file_key, tensor in named_adapter_tensors(model, adapter_name)
    }
    for name, module in trained_in_full_modules(model):
        for key, tensor in module.state_dict(prefix=f"{name}.").items():
            own[canonical_name(key)] = (canonical_name(key), tensor)
    missing = sorted(set(own) - set(full)) if full is not None else []
    if missing:
        raise AdapterFormatError(f"save_adapter: state_dict lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    tensors = {
        PEFT_PREFIX + file_key: (tensor if full is None else full[key]).detach().contiguous().cpu()
        for key, (file_key, tensor) in own.items()
    }

    data = {
        WEIGHTS_NAME: save(tensors, metadata={"format": "pt"}),  # written by Python: a failed write is an OSError
        CONFIG_NAME: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(),
    }

    def write(folder: Path) -> None:
        for name, content in data.items():
            (folder / name).write_bytes(content)

    try:
        write_folder_atomically(path, write, keep=[CARD_NAME])  # a model card the user wrote stays
    except OSError as err:
        message = f"save_adapter: cannot write {str(path)!r}: {err}; choose a writable folder with free space"
        raise reworded(err, message) from err
    return path


def load_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, adapter_name: str = "default", trainable: bool = False
) -> InjectionReport:
    """Load a PEFT-format LoRA adapter into ``model`` as adapter ``adapter_name`` and make it the active one.
    Layers are injected from the saved config unless the model already has that adapter (then its tensors
    are replaced). Adapters come back trainable only with ``trainable=True`` (then the others are frozen);
    the base stays frozen. Base weights that PEFT saves beside a targeted embedding's adapter
    (``save_embedding_layers``) load into that base layer, as in PEFT. Everything is checked before the model
    is touched."""
    _check_adapter_name("load_adapter", adapter_name)
    path = Path(path)
    config_bytes, weights_bytes = _read_adapter_files(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    values, saved_patterns = _read_peft_config(config_bytes, config_file)
    lora, extra = _split_keys(_read_tensors(weights_bytes, weights_file), weights_file)
    names = {canonical_name(n): n for n, _ in model.named_modules() if n}  # PEFT's name -> the model's name
    is_saved = name_matcher(saved_patterns or [])
    saved = [p for p in names if is_saved(p)]
    # Only the model's own module names are ever matched against the file's patterns: a name that is only in
    # the file is reported by _check_fit, unmatched.
    targets = [p for p in sorted(lora) if p in names]
    if not targets:
        raise AdapterFormatError(
            f"load_adapter: {str(weights_file)!r} does not fit this model: none of its {len(lora)} adapted modules "
            f"is in the model (e.g. {sorted(lora)[:3]})"
        )
    # re-creates the saved adapter on exactly the modules the file holds tensors for
    config = LoRAConfig(
        **values,
        target_modules="|".join(re.escape(t) for t in targets),
        modules_to_save=saved or None,
    )
    extra_keys = _check_fit(model, config, adapter_name, lora, extra, names, saved, weights_file)

    if not list(lora_layers(model, adapter_name)):
        try:
            find_targets(model, config, adapter_name)  # e.g. r larger than a layer: refused before any change
        except ValueError as err:
            raise AdapterFormatError(f"load_adapter: the adapter in {str(path)!r} cannot be injected: {err}") from None
        inject_lora(model, config, adapter_name)
    with torch.no_grad():
        for name, tensors in lora.items():
            layer = model.get_submodule(names[name])
            mine = layer.adapter_tensors(adapter_name)
            for file_key, tensor in tensors.items():
                mine[file_key].copy_(tensor)
        state = model.state_dict(keep_vars=True)
        for key, tensor in extra.items():
            state[extra_keys[key]].copy_(tensor)
    for name in saved:  # also when the LoRA layers already existed, so a later save keeps them
        mark_trained_in_full(model.get_submodule(names[name]))
    set_active_adapter(model, adapter_name)
    if trainable:
        mark_only_adapters_trainable(model, adapter_name)
    else:
        model.requires_grad_(False)
    return InjectionReport(targets, [n for n, _ in trained_in_full_modules(model)], param_summary(model))


def _peft_config(
    model: nn.Module, layers: list[tuple[str, LoRALayer]], adapter_name: str, base_model_name_or_path: str | None
) -> dict:
    specs = {canonical_name(n): layer.spec(adapter_name) for n, layer in layers}
    shared = Counter((s.dropout, s.use_rslora, s.use_dora, s.init) for s in specs.values())
    if len(shared) > 1:
        raise NotImplementedError(f"save_adapter: layers with different dropout/rslora/dora/init {sorted(shared)}")
    (dropout, use_rslora, use_dora, init), _ = shared.most_common(1)[0]
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    saved = sorted(canonical_name(n) for n, _ in trained_in_full_modules(model))
    # PEFT matches a target_modules entry and a pattern key also as a dotted suffix ("0" would also pick
    # "1.0"); a regex target_modules is matched whole, and a pattern key starting with "^" only whole.
    targets: list[str] | str = sorted(specs)
    inside = tuple(f"{n}." for n, _ in lora_layers(model))
    suffixes = {
        name.split(".", i)[i]
        for name in (canonical_name(n) for n, _ in model.named_modules() if n and not n.startswith(inside))
        if name not in specs
        for i in range(1, name.count(".") + 1)
    }
    if suffixes & set(specs):
        targets = "|".join(re.escape(t) for t in targets)
    values = {
        "r": r,
        "alpha": alpha,
        "dropout": dropout,
        "target_modules": targets,
        "exclude_modules": None,
        "use_rslora": use_rslora,
        "modules_to_save": saved or None,
        "use_dora": use_dora,
        "init": init,
        "rank_pattern": {"^" + re.escape(n): s.r for n, s in sorted(specs.items()) if s.r != r},
        "alpha_pattern": {"^" + re.escape(n): s.alpha for n, s in sorted(specs.items()) if s.alpha != alpha},
    }
    return {
        **to_peft(values),
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "fan_in_fan_out": any(getattr(layer, "fan_in_fan_out", False) for _, layer in layers),
        "inference_mode": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "peft_type": "LORA",
        "task_type": None,
    }


def _check_adapter_name(caller: str, value: Any, optional: bool = False) -> None:
    if not is_adapter_name(value) and not (optional and value is None):
        default = "None (the active adapter) or " if optional else ""
        raise AdapterFormatError(
            f"{caller}(adapter_name={value!r}): must be {default}a non-empty name without dots, e.g. 'default'"
        )


def _base_model_name(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"save_adapter(base_model_name_or_path={value!r}): must be a str (a hub id or a folder) or a path, "
        f"got {type(value).__name__}"
    )


def _read_adapter_files(path: Path) -> tuple[bytes, bytes]:
    """The two files of the folder, read together (a save cannot land between the two reads)."""
    try:
        found = read_files(path, {CONFIG_NAME: MAX_CONFIG_BYTES, WEIGHTS_NAME: None})
    except NotADirectoryError:
        raise AdapterFormatError(
            f"load_adapter: {str(path)!r} is not a folder; expected a PEFT adapter folder holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        ) from None
    except OSError as err:
        raise AdapterFormatError(f"load_adapter: cannot read {str(err.filename or path)!r}: {err.strerror}") from None
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if name not in found]
    if missing:
        hint = (
            " (.bin adapters are pickles and are refused; convert them to safetensors)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFormatError(f"load_adapter: {str(path)!r} lacks {missing}{hint}")
    return found[CONFIG_NAME], found[WEIGHTS_NAME]


def _read_peft_config(data: bytes, file: Path) -> tuple[dict[str, Any], list[str] | None]:
    """The `LoRAConfig` values of ``LOADED_FIELDS`` and the ``modules_to_save`` entries in ``adapter_config.json``,
    each checked by `LoRAConfig`'s own rules; every problem is reported at once, by PEFT's key."""
    try:
        peft = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # ValueError: also an int of 4,300+ digits
        raise AdapterFormatError(f"load_adapter: {str(file)!r} is not valid JSON ({err})") from None
    if not isinstance(peft, dict):
        raise AdapterFormatError(f"load_adapter: {str(file)!r} must hold a JSON object")
    problems = []
    if peft.get("peft_type") != "LORA":
        problems.append(f"peft_type={peft.get('peft_type')!r}: only 'LORA' adapters load")
    if peft.get("bias", "none") not in ("none", None):
        problems.append(f"bias={peft['bias']!r}: not supported; only 'none'")
    if peft.get("fan_in_fan_out") not in (True, False, None):  # follows from the layer type (GPT-2's Conv1D)
        problems.append(f"fan_in_fan_out={peft['fan_in_fan_out']!r}: must be true or false (a bool)")
    values = from_peft(peft, (*LOADED_FIELDS, "modules_to_save"))
    for field, value in values.items():
        problems += field_problems(field, value, shown_as=PEFT_KEYS[field])
    if problems:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} has unusable fields: " + "; ".join(problems))
    return {field: values[field] for field in LOADED_FIELDS}, values["modules_to_save"]


def _read_tensors(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} is not a readable safetensors file ({err})") from None


def _split_keys(
    tensors: dict[str, torch.Tensor], file: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module: {"lora_A.weight": tensor, ...}}`` for adapter tensors and ``{key: tensor}`` for the rest."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFormatError(f"load_adapter: key {key!r} in {str(file)!r} does not start with {PEFT_PREFIX!r}")
        key = key[len(PEFT_PREFIX) :]
        suffix = next((s for s in ADAPTER_KEYS if key.endswith("." + s)), None)
        if suffix:
            lora.setdefault(key[: -len(suffix) - 1], {})[suffix] = tensor
        else:
            extra[key] = tensor
    if not lora:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} holds no lora_A/lora_B tensors")
    return lora, extra


def _check_fit(
    model: nn.Module,
    config: LoRAConfig,
    adapter_name: str,
    lora: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, torch.Tensor],
    names: dict[str, str],
    saved: list[str],
    file: Path,
) -> dict[str, str]:
    """Every tensor must have a place of the right type and shape in the model; all mismatches are
    reported at once. Returns the model's state-dict key for each ``modules_to_save`` tensor."""
    problems = []
    existing = {canonical_name(n): layer for n, layer in lora_layers(model, adapter_name)}
    if existing and set(existing) != set(lora):
        problems.append(
            f"the model already has adapter {adapter_name!r} on {len(existing)} modules that differ from the "
            f"file's {len(lora)} (e.g. {sorted(set(existing) ^ set(lora))[:3]}); "
            f"delete_adapter(model, {adapter_name!r}) or load it under another adapter_name"
        )
    merged = sorted({la.merged_adapter for n, la in lora_layers(model) if la.merged and canonical_name(n) not in lora})
    if merged:  # (merged layers that the file touches are reported below, one by one)
        problems.append(f"adapters {merged} are merged into the base; unmerge() them before loading {adapter_name!r}")
    others = [n for n in adapter_names(model) if n != adapter_name]
    if saved and others:
        problems.append(
            f"the file's modules_to_save {saved} are trained in full in place and would be shared with the model's "
            f"other adapters {others}; load it into a model without other adapters"
        )
    for name, tensors in sorted(lora.items()):
        if name not in names:
            problems.append(f"{name}: no such module in the model")
            continue
        module = model.get_submodule(names[name])
        spec = config.spec_for(name)
        owner = next((s for s in saved if is_within(name, s)), None)
        if owner is not None:
            problems.append(
                f"{name}: has LoRA tensors but is inside modules_to_save entry {owner!r}; it is one or the other"
            )
        if isinstance(module, LoRALayer) and module.merged:
            problems.append(f"{name}: the model's LoRA layer is merged; unmerge() it or unload_lora(model) first")
        if isinstance(module, LoRALayer) and adapter_name in module.specs and module.spec(adapter_name) != spec:
            problems.append(
                f"{name}: the model's adapter {adapter_name!r} has {module.spec(adapter_name)}; the file {spec}"
            )
            continue
        base_module = module.base_layer if isinstance(module, LoRALayer) else module
        kind = lora_layer_type(base_module)
        if kind is None:
            problems.append(f"{name}: a {type(module).__name__}, which takes no LoRA, in the model")
            continue
        try:
            needed = kind.adapter_shapes(base_module, spec)
        except (RuntimeError, TypeError, OverflowError) as err:
            problems.append(f"{name}: an adapter with r={spec.r} cannot be built ({str(err).splitlines()[0]})")
            continue
        if set(tensors) != set(needed):
            present = ", ".join(sorted(tensors))
            problems.append(f"{name}: only {present} present; a {kind.__name__} needs {sorted(needed)}")
            continue
        for key, shape in needed.items():
            if tuple(tensors[key].shape) != shape:
                problems.append(f"{name}.{key}: shape {tuple(tensors[key].shape)} in the file, the model needs {shape}")
            elif not tensors[key].is_floating_point():
                problems.append(f"{name}.{key}: dtype {tensors[key].dtype} in the file; adapters are floats")
    # An entry matching no module is fine, as in PEFT (its SEQ_CLS task lists ["classifier", "score"] and a
    # model has one of them); every tensor of the file must still find its module, checked here:
    state = model.state_dict()
    keys = {}
    for key, tensor in sorted(extra.items()):
        owner = next((p for p in saved if is_within(key, p)), None)
        model_key = target_key = names[owner] + key[len(owner) :] if owner else None
        layer, base, param = key.rpartition(".base_layer.")
        if owner is None and base and layer in lora and layer in names:
            # PEFT also saves the base weight of a targeted embedding (save_embedding_layers); it loads into the
            # base layer, which is wrapped by the time it is copied
            owner, target_key = layer, f"{names[layer]}.base_layer.{param}"
            wrapped = isinstance(model.get_submodule(names[layer]), LoRALayer)
            model_key = target_key if wrapped else f"{names[layer]}.{param}"
        if owner is None:
            problems.append(
                f"{key}: neither a LoRA tensor nor a tensor of a module of the model that "
                f"modules_to_save={config.modules_to_save} names"
            )
        elif model_key not in state:
            problems.append(f"{key}: no such tensor in the model")
        elif tuple(state[model_key].shape) != tuple(tensor.shape):
            problems.append(
                f"{key}: shape {tuple(tensor.shape)} in the file, the model has {tuple(state[model_key].shape)}"
            )
        elif tensor.is_floating_point() != state[model_key].is_floating_point() or tensor.is_complex():
            problems.append(f"{key}: dtype {tensor.dtype} in the file, the model has {state[model_key].dtype}")
        else:
            keys[key] = target_key
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterFormatError(f"load_adapter: {str(file)!r} does not fit this model:\n  - {shown}")
    return keys

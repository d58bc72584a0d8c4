"""Adapters on disk in Hugging Face PEFT's format (`lora_lightning.peft_format`): one adapter per folder.

Loading never unpickles: JSON and safetensors only. Writes are atomic (`lora_lightning.files`): the folder is
built next to the target and replaces it in one step.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from lora_lightning.adapter_config import peft_config, read_peft_config
from lora_lightning.adapters import active_adapter, set_active_adapter
from lora_lightning.config import LoRAConfig, is_adapter_name
from lora_lightning.files import read_files, reworded, write_folder_atomically
from lora_lightning.fit import FitError, check_fit
from lora_lightning.inject import (
    InjectionReport,
    _visible_modules,
    add_modules_to_save,
    inject_lora,
    planned_tensors,
    saved_shapes,
)
from lora_lightning.layers import LoRALayer, LoRAParameter, ModulesToSave, TrainableTokens, innermost, lora_layer_type
from lora_lightning.modules import canonical_name, name_matcher
from lora_lightning.params import (
    adapter_modules,
    adapter_names,
    lora_layers,
    mark_only_adapters_trainable,
    named_adapter_tensors,
    param_summary,
    trained_in_full_modules,
)
from lora_lightning.peft_format import (
    ADAPTER_FILES,
    CARD_NAME,
    CONFIG_NAME,
    PEFT_PREFIX,
    TASK_TYPES,
    WEIGHTS_NAME,
    is_lora,
    outer_module,
    split_key,
)
from lora_lightning.selection import parameter_targets

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
    config = peft_config(model, adapter_name, base_model_name_or_path) | {"task_type": task_type}
    full = None if state_dict is None else {canonical_name(k): v for k, v in state_dict.items()}
    own = {  # model key -> (file key, the model's own tensor)
        canonical_name(key): (canonical_name(file_key), tensor)
        for key, file_key, tensor in named_adapter_tensors(model, adapter_name)
    }
    missing = sorted(set(own) - set(full)) if full is not None else []
    if missing:
        raise AdapterFormatError(f"save_adapter: state_dict lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    tensors, written = {}, set()
    for key, (file_key, tensor) in own.items():
        tensor = (tensor if full is None else full[key]).detach().contiguous().cpu()
        # a tensor under two keys (tied copies) is written twice, as PEFT reads it: safetensors stores no aliases
        tensors[PEFT_PREFIX + file_key] = tensor.clone() if tensor.data_ptr() in written else tensor
        written.add(tensor.data_ptr())

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
    try:
        values = read_peft_config(config_bytes, config_file)
    except ValueError as err:
        raise AdapterFormatError(f"load_adapter: {err}") from None
    tensors = _read_tensors(weights_bytes, weights_file)
    by_module = _by_module(tensors, weights_file)
    names = {canonical_name(n): n for n, _ in model.named_modules() if n}  # PEFT's name -> the model's name
    visible = {canonical_name(n) for n in _visible_modules(model)}
    config = _config_for(model, values, by_module, names, visible, weights_file)
    adopted = []
    if list(lora_layers(model, adapter_name)):
        # the model has the adapter: its tensors are replaced, and modules_to_save it lacks are adopted (so that a
        # load -> save cycle keeps them)
        planned = _existing_tensors(model, adapter_name)
        adopted = [names[n] for n in config.modules_to_save or [] if n not in planned]
        planned |= {canonical_name(n): ("modules_to_save", saved_shapes(model, n)) for n in adopted}
        config = None
    else:
        try:
            planned = {canonical_name(m): held for m, held in planned_tensors(model, config, adapter_name).items()}
        except ValueError as err:
            raise AdapterFormatError(f"load_adapter: the adapter in {str(path)!r} cannot be injected: {err}") from None
    try:
        base_keys = check_fit(model, values, adapter_name, by_module, planned, names, weights_file)
    except FitError as err:
        raise AdapterFormatError(f"load_adapter: {err}") from None

    if config is not None:
        inject_lora(model, config, adapter_name)
    add_modules_to_save(model, adopted, adapter_name, values["ensure_weight_tying"])
    with torch.no_grad():
        targets = {canonical_name(f): t for _, f, t in named_adapter_tensors(model, adapter_name)}
        state = model.state_dict(keep_vars=True)
        for key, tensor in tensors.items():
            key = key[len(PEFT_PREFIX) :]
            (targets[key] if key in targets else state[base_keys[key]]).copy_(tensor)
    set_active_adapter(model, adapter_name)
    if trainable:
        mark_only_adapters_trainable(model, adapter_name)
    else:
        model.requires_grad_(False)
    return _report(model, adapter_name)


def _report(model: nn.Module, adapter_name: str) -> InjectionReport:
    """What adapter ``adapter_name`` of ``model`` holds, as `inject_lora` reports it."""
    modules = _visible_modules(model)
    holding = dict(adapter_modules(model, adapter_name))
    held = [(n, model.get_submodule(n)) for n in modules if n in holding]
    parameters = [f"{outer_module(n)}.{m.parameter_name}" for n, m in holding.items() if isinstance(m, LoRAParameter)]
    return InjectionReport(
        sorted(n for n, m in held if isinstance(m, LoRALayer) and not isinstance(m, LoRAParameter)),
        [n for n, _ in trained_in_full_modules(model)],
        param_summary(model),
        parameters=sorted(parameters),
        trainable_tokens=sorted(n for n, m in held if isinstance(m, TrainableTokens)),
    )


def _config_for(
    model: nn.Module,
    values: dict[str, Any],
    by_module: dict[str, dict[str, torch.Tensor]],
    names: dict[str, str],
    visible: set[str],
    file: Path,
) -> LoRAConfig:
    """The `LoRAConfig` that re-creates the saved adapter on exactly the modules the file holds tensors for: its
    LoRA layers from the file's keys, the rest (parameters, ``modules_to_save``, token rows) from its config,
    resolved against the model's own module names only (a name only in the file is reported by `fit.check_fit`)."""
    tops = {outer_module(m) for m, held in by_module.items() if m and is_lora(held)}
    parameters = values["target_parameters"]
    owners = {canonical_name(n) for n in parameter_targets(_visible_modules(model), parameters, set(), [])}
    targets = [
        t
        for t in sorted(tops - owners)
        if t in names
        and t in visible
        and lora_layer_type(innermost(model.get_submodule(names[t]))) is not None  # else check_fit says why
    ]
    if not targets and not parameters:
        raise AdapterFormatError(
            f"load_adapter: {str(file)!r} does not fit this model: none of its {len(tops)} adapted modules "
            f"is in the model (e.g. {sorted(tops)[:3]})"
        )
    is_saved = name_matcher(values["modules_to_save"] or [])
    saved = [n for n in sorted(visible) if is_saved(n)]  # PEFT's task lists name heads a model may lack
    return LoRAConfig(
        **{k: v for k, v in values.items() if k not in ("modules_to_save", "target_parameters")},
        target_modules="|".join(re.escape(t) for t in targets) if targets else None,
        modules_to_save=saved or None,
        target_parameters=parameters,
    )


def _existing_tensors(model: nn.Module, adapter_name: str) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """The model's own tensors of adapter ``adapter_name``, grouped like `inject.planned_tensors`."""
    held: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}
    roles = {ModulesToSave: "modules_to_save", TrainableTokens: "trainable_token_indices"}
    for name, module in adapter_modules(model, adapter_name):
        kind = roles.get(type(module), type(module).__name__)
        for key, tensor in module.adapter_tensors(adapter_name).items():
            inner, suffix = split_key(f"{name}.{key}") or (name, key)
            held.setdefault(canonical_name(inner), (kind, {}))[1][suffix] = tuple(tensor.shape)
    return held


def _by_module(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors by module: ``{module: {"lora_A.weight": tensor, ...}}``; a key of no adapter tensor
    (a ``modules_to_save`` copy's) stays whole under the module ``""``."""
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFormatError(f"load_adapter: key {key!r} in {str(file)!r} does not start with {PEFT_PREFIX!r}")
        module, suffix = split_key(key[len(PEFT_PREFIX) :]) or ("", key[len(PEFT_PREFIX) :])
        found.setdefault(module, {})[suffix] = tensor
    if not any(is_lora(held) for held in found.values()):
        raise AdapterFormatError(f"load_adapter: {str(file)!r} holds no lora_A/lora_B tensors")
    return found


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


def _read_tensors(data: bytes, file: Path) -> dict[str, torch.Tensor]:
    try:
        return load(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} is not a readable safetensors file ({err})") from None

"""Adapters on disk in Hugging Face PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are ``base_model.model.<module>.lora_A.weight`` (``[r, in]``), ``...lora_B.weight``
(``[out, r]``) and ``base_model.model.<module>.<param>`` for ``modules_to_save``. Loading never unpickles:
JSON and safetensors only. Writes go to a temporary folder that replaces the target in one step.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lightning.config import LoRAConfig, _is_positive_finite
from lora_lightning.inject import InjectionReport, find_targets, inject_lora, matches
from lora_lightning.layers import LoRALinear
from lora_lightning.params import (
    adapter_state_dict,
    lora_layers,
    mark_only_adapters_trainable,
    mark_trained_in_full,
    param_summary,
    trained_in_full_modules,
)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md"}
_LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B"}


class AdapterFormatError(ValueError):
    """An adapter folder that is missing, malformed, or does not fit the model."""


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write ``model``'s adapters as a PEFT folder at ``path``. Keys are relative to ``model``: pass the
    module PEFT will wrap (e.g. the Hugging Face model inside a LightningModule)."""
    path = Path(path)
    layers = list(lora_layers(model))
    if not layers:
        raise AdapterFormatError("save_adapter: the model has no LoRA layers; call inject_lora(model, config) first")
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
    config = _peft_config(model, layers, base_model_name_or_path)
    tensors = {PEFT_PREFIX + _peft_name(k): t.contiguous().cpu() for k, t in adapter_state_dict(model).items()}

    def write(folder: Path) -> None:
        save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    try:
        _write_folder_atomically(path, write)
    except OSError as err:
        raise type(err)(f"save_adapter: cannot write {str(path)!r}: {err}; choose a writable folder") from err
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike[str], *, trainable: bool = False) -> InjectionReport:
    """Load a PEFT-format LoRA adapter into ``model``, injecting LoRA layers from the saved config if the
    model has none. Adapters come back trainable only with ``trainable=True``; the base stays frozen.
    Everything is checked before the model is touched."""
    config_file, weights_file = _adapter_files(Path(path))
    peft = _read_peft_config(config_file)
    lora, extra = _split_keys(_read_tensors(weights_file), weights_file)
    names = {_peft_name(n): n for n, _ in model.named_modules() if n}  # PEFT's name -> the model's name
    saved = [p for p in names if matches(p, peft["modules_to_save"] or [])]
    extra_keys = _check_fit(model, peft, lora, extra, names, saved, weights_file)

    targets = [names[p] for p in sorted(lora)]
    if not list(lora_layers(model)):
        try:
            config = LoRAConfig(
                r=peft["r"],
                alpha=peft["lora_alpha"],
                dropout=peft.get("lora_dropout") or 0.0,
                target_modules="|".join(re.escape(t) for t in targets),
                use_rslora=bool(peft.get("use_rslora")),
                modules_to_save=[names[p] for p in saved] or None,
            )
            find_targets(model, config)  # e.g. r larger than a layer: refused here, before anything changes
        except ValueError as err:
            raise AdapterFormatError(f"load_adapter: the adapter in {str(path)!r} cannot be injected: {err}") from None
        inject_lora(model, config)
    with torch.no_grad():
        for name, pair in lora.items():
            layer = model.get_submodule(names[name])
            layer.lora_A.weight.copy_(pair["A"])
            layer.lora_B.weight.copy_(pair["B"])
        state = model.state_dict(keep_vars=True)
        for key, tensor in extra.items():
            state[extra_keys[key]].copy_(tensor)
    for name in saved:  # also when the LoRA layers already existed, so a later save keeps them
        mark_trained_in_full(model.get_submodule(names[name]))
    if trainable:
        mark_only_adapters_trainable(model)
    else:
        model.requires_grad_(False)
    return InjectionReport(targets, [n for n, _ in trained_in_full_modules(model)], param_summary(model))


def _peft_name(name: str) -> str:
    """Module/tensor name as PEFT sees it: without torch.compile's ``_orig_mod.`` segments."""
    return ".".join(part for part in name.split(".") if part != "_orig_mod")


def _peft_config(model: nn.Module, layers: list[tuple[str, Any]], base_model_name_or_path: str | None) -> dict:
    hyper = Counter(layer.hyperparameters for _, layer in layers)
    if len(hyper) > 1:
        raise NotImplementedError(f"save_adapter: layers with different r/alpha/dropout/rslora {sorted(hyper)}")
    (r, alpha, dropout, use_rslora), _ = hyper.most_common(1)[0]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    saved = sorted(_peft_name(n) for n, _ in trained_in_full_modules(model))
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "modules_to_save": saved or None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "target_modules": sorted(_peft_name(n) for n, _ in layers),
        "task_type": None,
        "use_dora": False,
        "use_rslora": use_rslora,
    }


def _adapter_files(path: Path) -> tuple[Path, Path]:
    if not path.is_dir():
        raise AdapterFormatError(
            f"load_adapter: {str(path)!r} is not a folder; expected a PEFT adapter folder holding "
            f"{CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    files = path / CONFIG_NAME, path / WEIGHTS_NAME
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        hint = (
            " (.bin adapters are pickles and are refused; convert them to safetensors)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFormatError(f"load_adapter: {str(path)!r} lacks {missing}{hint}")
    return files


def _read_peft_config(file: Path) -> dict[str, Any]:
    try:
        peft = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} is not valid JSON ({err})") from None
    if not isinstance(peft, dict):
        raise AdapterFormatError(f"load_adapter: {str(file)!r} must hold a JSON object")
    problems = []
    if peft.get("peft_type") != "LORA":
        problems.append(f"peft_type={peft.get('peft_type')!r} (only 'LORA' adapters load)")
    r, alpha = peft.get("r"), peft.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        problems.append(f"r={r!r} (must be a positive int)")
    if not _is_positive_finite(alpha):
        problems.append(f"lora_alpha={alpha!r} (must be a positive finite number)")
    dropout, rslora = peft.get("lora_dropout"), peft.get("use_rslora")
    if dropout is not None and (
        not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout < 1
    ):
        problems.append(f"lora_dropout={dropout!r} (must be a number in [0, 1))")
    if rslora is not None and not isinstance(rslora, bool):
        problems.append(f"use_rslora={rslora!r} (must be true or false)")
    for key, plain in (("use_dora", False), ("fan_in_fan_out", False), ("bias", "none")):
        if peft.get(key, plain) not in (plain, None):
            problems.append(f"{key}={peft[key]!r} (not supported yet; only {plain!r})")
    for key in ("rank_pattern", "alpha_pattern"):
        if peft.get(key):
            problems.append(f"{key}={peft[key]!r} (per-layer rank/alpha not supported yet)")
    saved = peft.get("modules_to_save")
    if saved is not None and (not isinstance(saved, list) or not all(isinstance(s, str) for s in saved)):
        problems.append(f"modules_to_save={saved!r} (must be a list of module names)")
    if problems:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} has unusable fields: " + "; ".join(problems))
    peft.setdefault("modules_to_save", None)
    return peft


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} is not a readable safetensors file ({err})") from None


def _split_keys(
    tensors: dict[str, torch.Tensor], file: Path
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{module: {"A": tensor, "B": tensor}}`` for LoRA pairs and ``{key: tensor}`` for the rest."""
    lora: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        if not key.startswith(PEFT_PREFIX):
            raise AdapterFormatError(f"load_adapter: key {key!r} in {str(file)!r} does not start with {PEFT_PREFIX!r}")
        key = key[len(PEFT_PREFIX) :]
        suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
        if suffix:
            lora.setdefault(key[: -len(suffix)], {})[_LORA_SUFFIXES[suffix]] = tensor
        else:
            extra[key] = tensor
    if not lora:
        raise AdapterFormatError(f"load_adapter: {str(file)!r} holds no lora_A/lora_B tensors")
    return lora, extra


def _check_fit(
    model: nn.Module,
    peft: dict[str, Any],
    lora: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, torch.Tensor],
    names: dict[str, str],
    saved: list[str],
    file: Path,
) -> dict[str, str]:
    """Every tensor must have a place of the right type and shape in the model; all mismatches are
    reported at once. Returns the model's state-dict key for each ``modules_to_save`` tensor."""
    r, alpha, use_rslora = peft["r"], peft["lora_alpha"], bool(peft.get("use_rslora"))
    problems = []
    existing = {_peft_name(n): layer for n, layer in lora_layers(model)}
    if existing and set(existing) != set(lora):
        problems.append(
            f"the model already has LoRA layers on {len(existing)} modules that differ from the adapter's "
            f"{len(lora)} (e.g. {sorted(set(existing) ^ set(lora))[:3]}); call unload_lora(model) first"
        )
    for name, pair in sorted(lora.items()):
        layer = existing.get(name) or (model.get_submodule(names[name]) if name in names else None)
        owner = next((s for s in saved if name == s or name.startswith(s + ".")), None)
        if owner is not None:
            problems.append(
                f"{name}: has LoRA tensors but is inside modules_to_save entry {owner!r}; it is one or the other"
            )
        if isinstance(layer, LoRALinear) and layer.merged:
            problems.append(f"{name}: the model's LoRA layer is merged; unmerge() it or unload_lora(model) first")
        if set(pair) != {"A", "B"}:
            problems.append(f"{name}: only lora_{''.join(pair)} present; both lora_A and lora_B are needed")
        elif isinstance(layer, LoRALinear) and (layer.r, layer.alpha, layer.use_rslora) != (r, alpha, use_rslora):
            problems.append(
                f"{name}: the model's layer has r={layer.r}, alpha={layer.alpha}, use_rslora={layer.use_rslora}; "
                f"the file r={r}, alpha={alpha}, use_rslora={use_rslora}"
            )
        elif not isinstance(layer, (nn.Linear, LoRALinear)):
            kind = "no such module" if layer is None else f"a {type(layer).__name__}, not nn.Linear"
            problems.append(f"{name}: {kind} in the model")
        else:
            for part, shape in (("A", (r, layer.in_features)), ("B", (layer.out_features, r))):
                if tuple(pair[part].shape) != shape:
                    problems.append(
                        f"{name}.lora_{part}: shape {tuple(pair[part].shape)} in the file, the model needs {shape}"
                    )
                elif not pair[part].is_floating_point():
                    problems.append(f"{name}.lora_{part}: dtype {pair[part].dtype} in the file; adapters are floats")
    # An entry matching no module is fine, as in PEFT (its SEQ_CLS task lists ["classifier", "score"] and a
    # model has one of them); every tensor of the file must still find its module, checked here:
    state = model.state_dict()
    keys = {}
    for key, tensor in sorted(extra.items()):
        owner = next((p for p in saved if key.startswith(p + ".")), None)
        model_key = names[owner] + key[len(owner) :] if owner else None
        if owner is None:
            problems.append(
                f"{key}: neither a LoRA tensor nor a tensor of a module of the model that "
                f"modules_to_save={peft['modules_to_save']} names"
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
            keys[key] = model_key
    if problems:
        shown = "\n  - ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise AdapterFormatError(f"load_adapter: {str(file)!r} does not fit this model:\n  - {shown}")
    return keys


def _write_folder_atomically(path: Path, write: Any) -> None:
    """Build the folder next to ``path`` and swap it in, so readers see the old or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.urandom(6).hex()}"
    staging.mkdir()  # not tempfile.mkdtemp: its folders are always 0700, this one honours the umask
    try:
        write(staging)
        for file in staging.iterdir():
            fsync_path(file)
        if path.exists():
            _exchange(staging, path)  # staging now holds the old folder
            shutil.rmtree(staging)
        else:
            os.rename(staging, path)
        fsync_path(path.parent)
        remove_stale_staging(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(path: Path) -> None:
    """Delete what writers killed mid-save left next to ``path`` (``.<name>.tmp-*``), after a save succeeded."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere, two renames."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    old = a.with_name(a.name + ".old")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

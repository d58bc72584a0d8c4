"""Quantizing a whole model's linear layers to frozen 4-bit NF4 bases for QLoRA (the layers: `lora_lightning.quant`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.inject import output_heads
from lora_lightning.modules import is_within, matches, replace_module
from lora_lightning.params import lora_layers, tied_parameter_ids


def quantize_linears(
    model: nn.Module,
    kind: quant.Kind,
    compute_dtype: torch.dtype | str = torch.bfloat16,
    skip: Sequence[str] | None = None,
) -> list[str]:
    """Replace the model's ``nn.Linear`` layers by frozen 4-bit NF4 layers of ``kind``; return their names.

    ``skip`` lists layers (names or dotted suffixes; a module skips every linear inside it) kept in full
    precision; ``None`` keeps the output head, as ``target_modules="all-linear"`` does. Only layers of type
    exactly ``nn.Linear`` are quantized, never one whose weight is shared (tied) with another module, and the
    quantized layers' weight and bias are frozen. Quantize before injecting LoRA. Everything is checked
    first: on error the model is untouched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if kind not in quant.KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {', '.join(map(repr, quant.KINDS))}")
    dtype = quant.compute_dtype_arg(compute_dtype)
    if skip is not None and (isinstance(skip, str) or not all(isinstance(s, str) for s in skip)):
        raise TypeError(f"skip={skip!r}: must be a list of module names or dotted suffixes (or None)")
    quant.require(kind)

    existing = [name for name, _ in lora_layers(model)]
    if existing:
        raise ValueError(
            f"the model already has LoRA layers (e.g. {existing[0]!r}); quantize the base first, then inject LoRA"
        )
    modules = {name: module for name, module in model.named_modules() if name}
    if skip is None:
        skipped = output_heads(model)
    else:
        unmatched = [entry for entry in skip if not any(matches(name, [entry]) for name in modules)]
        if unmatched:
            raise ValueError(f"skip: {unmatched} match no module of the model")
        skipped = {name for name in modules if matches(name, list(skip))}
    tied = tied_parameter_ids(model)
    targets = [
        name
        for name, module in modules.items()
        if type(module) is nn.Linear and id(module.weight) not in tied and not any(is_within(name, s) for s in skipped)
    ]
    if not targets:
        raise ValueError(
            "cannot quantize: the model has no nn.Linear layer left to quantize (skipped: "
            f"{sorted(skipped) or 'none'}; tied weights and nn.Linear subclasses are never quantized)"
        )
    problems = []
    for name in targets:
        weight = modules[name].weight
        if weight.is_meta:
            problems.append(f"{name}: its weight is on the meta device; load real weights first")
        elif not weight.is_floating_point():
            problems.append(f"{name}: weight dtype {weight.dtype} is not floating point")
        elif kind == "bnb-nf4" and weight.device.type == "cpu" and not quant.bnb_cpu_shape_ok(modules[name]):
            problems.append(
                f"{name}: {modules[name].in_features} -> {modules[name].out_features}: bitsandbytes on CPU needs "
                f"in_features to be a multiple of {quant.BLOCKSIZE} and more than {quant.BLOCKSIZE} weights (other "
                "shapes compute wrongly, fail or crash); skip it or use kind='torchao-nf4'"
            )
        elif kind == "torchao-nf4" and weight.numel() % quant.BLOCKSIZE:
            problems.append(
                f"{name}: {weight.shape[0]}x{weight.shape[1]} = {weight.numel()} weights, not a multiple of the "
                f"NF4 blocksize {quant.BLOCKSIZE} that torchao needs; skip it or use kind='bnb-nf4'"
            )
    if problems:
        raise ValueError("cannot quantize:\n  - " + "\n  - ".join(problems))
    build = quant.bnb_linear if kind == "bnb-nf4" else quant.NF4Linear.from_linear
    with torch.no_grad():
        for name in targets:
            replace_module(model, name, build(modules[name], dtype))
    return targets

"""The optimizer of a LoRA fine-tune: trainable parameters only, and LoRA+ param groups."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.optim import Optimizer

from lora_lightning.params import lora_layers

OptimizerFactory = Callable[[Any], Optimizer]


def build_optimizer(
    model: nn.Module,
    factory: OptimizerFactory,
    lr_scheduler: Callable[[Optimizer], Any] | None = None,
    loraplus_lr_ratio: float | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: ``factory``'s optimizer over the trainable parameters of ``model``
    (with LoRA+ groups when ``loraplus_lr_ratio`` is given), and ``lr_scheduler(optimizer)`` if given."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if loraplus_lr_ratio is None:
        optimizer = factory(trainable)
    else:
        optimizer = factory(loraplus_param_groups(trainable, model))
        optimizer.param_groups[1]["lr"] *= loraplus_lr_ratio
    if lr_scheduler is None:
        return optimizer
    return {"optimizer": optimizer, "lr_scheduler": lr_scheduler(optimizer)}


def loraplus_param_groups(params: list[nn.Parameter], model: nn.Module) -> list[dict[str, Any]]:
    """LoRA+: two param groups, everything but the ``B`` matrices, then the ``B`` matrices (which learn at a
    multiple of the first group's learning rate)."""
    b_ids = {id(layer.factors(n)[1]) for _, layer in lora_layers(model) for n in layer.adapter_names}
    return [
        {"params": [p for p in params if id(p) not in b_ids]},
        {"params": [p for p in params if id(p) in b_ids]},
    ]


def keep_only_trainable_params(optimizers: list[Optimizer], model: nn.Module) -> None:
    """Drop frozen parameters from every param group in place (groups stay, so LR schedulers still line up)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in trainable]
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    if optimizers and not held:
        raise ValueError(
            "the optimizer from configure_optimizers holds none of the LoRA parameters; pass "
            "self.parameters() to it, or give LoRAFinetuneCallback(optimizer=...) a factory"
        )
    if optimizers and trainable - held:
        rank_zero_warn(f"{len(trainable - held)} trainable LoRA parameters are in no optimizer and will not train")

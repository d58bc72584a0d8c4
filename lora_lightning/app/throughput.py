"""Throughput of a fine-tune through Lightning's `ThroughputMonitor`: samples/s, tokens/s, FLOP/s and MFU.

Tokens are the batch's attended tokens (``attention_mask``; padding is not counted). FLOPs per batch follow the
usual dense-transformer estimate, adapted to a frozen base: a token costs ``2 N`` in the forward pass through
``N`` matrix weights, ``2 N`` in backward for the activation gradients, and ``2 N_trainable`` for the weight
gradients of the trainable tensors only, so ``flops = 2 T (2 N + N_trainable)`` for ``T`` computed tokens
(padding included: the hardware does that work). Attention's ``T^2`` term and recomputation under gradient
checkpointing are left out. MFU is that rate over the device's peak for the training dtype, which Lightning
knows for CUDA GPUs (none on CPU).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ThroughputMonitor
from torch import nn
from typing_extensions import override

from lora_lightning import param_summary

# What the monitor logs (under "train/"), as metrics.json and the sweep report name it.
SUMMARY_KEYS = {
    "samples_per_sec": "samples_per_sec",
    "items_per_sec": "tokens_per_sec",
    "flops_per_sec": "flops_per_sec",
    "mfu": "mfu",
}


def batch_size(batch: dict[str, Any]) -> int:
    return len(batch["input_ids"])


def batch_tokens(batch: dict[str, Any]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def matrix_weights(model: nn.Module) -> int:
    """``N``: the weights that multiply activations, counted per module (a tied output head counts: it is a
    matrix product; an embedding lookup is not). Linear layers of any kind, 4-bit ones by their logical size."""
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            total += module.in_features * module.out_features
        elif type(module).__name__ == "Conv1D":  # GPT-2's transposed linear
            total += module.weight.numel()
    return total


def flops_per_batch(tokens: int, weights: int, trainable: int) -> int:
    """``2 T (2 N + N_trainable)``: forward, activation gradients, and weight gradients of trainable tensors."""
    return 2 * tokens * (2 * weights + trainable)


class TokenThroughput(ThroughputMonitor):
    """`ThroughputMonitor` over the app's batches (``input_ids``, ``attention_mask``), with the FLOPs estimate
    of this module's docstring handed to it batch by batch (batches vary in length)."""

    def __init__(self, window_size: int = 10) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=batch_tokens, window_size=window_size)
        self._weights = 0
        self._trainable = 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        pl_module.flops_per_batch = 0  # the monitor looks for it once, at its first batch

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._count(pl_module)  # after every setup: the LoRA callback has injected and frozen
        super().on_train_start(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._count(pl_module)
        super().on_validation_start(trainer)

    def _count(self, pl_module: pl.LightningModule) -> None:
        self._weights = matrix_weights(pl_module)
        self._trainable = param_summary(pl_module).trainable

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        pl_module.flops_per_batch = flops_per_batch(batch["input_ids"].numel(), self._weights, self._trainable)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int, dataloader_idx: int = 0
    ) -> None:
        pl_module.flops_per_batch = flops_per_batch(batch["input_ids"].numel(), self._weights, 0) // 2  # forward


def summary(logged: dict[str, Any], world_size: int) -> dict[str, float]:
    """The monitor's last logged training rates (``trainer.logged_metrics``), summed over ranks."""
    values = {}
    for key, name in SUMMARY_KEYS.items():
        device = logged.get(f"train/device/{key}")
        if device is not None:
            values[name] = round(float(device) * (1 if key == "mfu" else world_size), 4)
    return values

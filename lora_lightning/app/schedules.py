"""Learning-rate schedules that need the run's length: Hydra ``_partial_`` factories ``(optimizer, total_steps)``.

`lora_lightning.app.train` fills ``total_steps`` with ``trainer.estimated_stepping_batches`` and steps them every
optimizer step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1) -> LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps, then linear decay to zero."""
    warmup = _warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return LambdaLR(optimizer, factor)


def cosine_warmup(
    optimizer: Optimizer, total_steps: int, warmup_ratio: float = 0.1, min_ratio: float = 0.0
) -> LambdaLR:
    """Linear warm-up, then cosine decay to ``min_ratio`` of the peak learning rate."""
    warmup = _warmup_steps(total_steps, warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def _warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"scheduler.warmup_ratio={warmup_ratio}: must be in [0, 1)")
    if total_steps < 1 or not math.isfinite(total_steps):
        raise ValueError(
            f"the learning-rate schedule needs a finite run length, got {total_steps} steps; "
            "set trainer.max_epochs or trainer.max_steps"
        )
    return max(1, round(total_steps * warmup_ratio))

"""Time per training step, peak memory and the held-out metrics of every validation during training: what a
run measured, for sweep reports and the W&B adapter artifact."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override


def rss_mib() -> float:
    """Resident memory of this process now, in MiB (peak so far where the current value is unknown)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class RunStats(Callback):
    """Median wall time of a training step (forward, backward, optimizer; data loading excluded) after
    ``warmup_steps``, and peak memory: CUDA memory allocated on a GPU, else the process's resident memory
    sampled after every step (so jobs run one after another in one process are measured separately).
    ``validations`` holds the ``val/`` metrics of each validation during fit (not the sanity check)."""

    def __init__(self, warmup_steps: int = 2) -> None:
        self.warmup_steps = warmup_steps
        self.durations: list[float] = []
        self.steps = 0
        self.peak_rss_mib = 0.0
        self.validations: list[dict[str, float]] = []
        self._started = 0.0
        self._cuda: torch.device | None = None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.durations.clear()
        self.validations.clear()
        self.steps = 0
        self.peak_rss_mib = rss_mib()
        device = pl_module.device
        self._cuda = device if device.type == "cuda" else None
        if self._cuda is not None:
            torch.cuda.reset_peak_memory_stats(self._cuda)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        self._started = time.perf_counter()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._cuda is not None:
            torch.cuda.synchronize(self._cuda)
        self.durations.append(time.perf_counter() - self._started)
        self.steps += 1
        self.peak_rss_mib = max(self.peak_rss_mib, rss_mib())

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            metrics = trainer.callback_metrics.items()
            self.validations.append({k: float(v) for k, v in metrics if k.startswith("val/")})

    def summary(self) -> dict[str, Any]:
        """``time_per_step_s``, ``peak_memory_mib`` and ``memory_kind`` (``cuda_allocated`` / ``cpu_rss``)."""
        timed = self.durations[self.warmup_steps :] or self.durations  # short runs: every step counts
        step = statistics.median(timed) if timed else None
        if self._cuda is not None:
            peak, kind = torch.cuda.max_memory_allocated(self._cuda) / 2**20, "cuda_allocated"
        else:
            peak, kind = self.peak_rss_mib, "cpu_rss"
        return {"time_per_step_s": step, "peak_memory_mib": round(peak, 1), "memory_kind": kind, "steps": self.steps}

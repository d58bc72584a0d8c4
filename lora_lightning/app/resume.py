"""Resuming mid-epoch exactly: a training loader that Lightning can put back where training left it, a
callback that keeps the loader's position and torch's random state in every checkpoint, and a checkpoint
callback that also saves the run's last step.

Lightning saves and restores a train loader's ``state_dict`` when it has one; a plain ``DataLoader`` has none,
so a resumed run restarts its epoch from the first batch. Lightning also prefetches a batch, so a loader that
counted the batches it yielded would be one ahead of training: `LoaderPosition` sets the count from
``on_train_batch_start`` instead. Dropout (LoRA's and the model's) draws from torch's global generator, which
Lightning does not save: `LoaderPosition` saves it too.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader
from typing_extensions import override


class ResumableLoader(DataLoader):
    """A DataLoader (shuffled by its own ``generator``) whose state is the number of batches of this epoch
    that training consumed and the generator's state when the epoch's order was drawn. Restored mid-epoch, it
    draws the same order again and skips what was consumed; restored at an epoch's end, it goes on with the
    generator where it was."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.generator is None:
            raise ValueError("ResumableLoader needs its own torch.Generator (generator=...) to replay an order")
        self.consumed = 0
        self._epoch_start = self.generator.get_state()
        self._skip = 0

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, "epoch_start": self._epoch_start, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mid_epoch = 0 < state["consumed"] < len(self)
        self.generator.set_state(state["epoch_start"] if mid_epoch else state["generator"])
        self._skip = state["consumed"] if mid_epoch else 0

    def __iter__(self) -> Iterator[Any]:
        skip, self._skip = self._skip, 0
        self._epoch_start = self.generator.get_state()  # this epoch's order is drawn from here
        self.consumed = skip
        return itertools.islice(super().__iter__(), skip, None)


class LoaderPosition(Callback):
    """Tells a `ResumableLoader` how many batches training consumed, and checkpoints torch's CPU (and CUDA)
    random state so that dropout masks after a resume are those of an uninterrupted run."""

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.consumed = idx + 1

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["cpu"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also writes ``last.ckpt`` at the run's last step. Saving every ``n`` steps alone,
    a run of ``max_steps`` not a multiple of ``n`` would leave its last steps out (a resume would train them
    again), and Lightning's save at the end of training would hold the state after the loop ended rather than
    the mid-epoch state a resume continues from. Saved at the last batch or, when the run ends by
    ``max_epochs``, at the last epoch's end."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, idx)
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_last(trainer)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs:
            self._save_last(trainer)

    def _save_last(self, trainer: pl.Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

"""Subprocess side of the training crash tests in tests/lib/test_reliability_crash.py: trains, and can stop itself
at a chosen point ("PAUSED"/"BLOCKED" on stdout, then sleeps) so that the test kills it with SIGKILL there.

    python -m tests.workers.crash_worker ROOT [--resume] [--block-at STEP] [--pause-save N] [--forget-position]

Training is deterministic on CPU (one thread, deterministic algorithms, seeded LoRA dropout), checkpoints
every ``EVERY`` steps mid-epoch, and resumes mid-epoch through `ResumableLoader`; the final adapter goes to
ROOT/final.
"""

from __future__ import annotations

import argparse
import io
import itertools
import os
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, save_adapter
from tests.workers.common import pause

BATCHES_PER_EPOCH = 8
EPOCHS = 3
EVERY = 2  # checkpoint every 2 optimizer steps: most checkpoints are mid-epoch
CONFIG = LoRAConfig(r=4, alpha=8, dropout=0.1, modules_to_save=["net.4"])


# ------------------------------------------------------------------------------------------------ training


class ResumableLoader(DataLoader):
    """A shuffling DataLoader that Lightning can resume mid-epoch (it has ``state_dict``/``load_state_dict``).

    Its state is the number of batches of the current epoch that *training* has consumed (set by the module
    at each batch start; counting batches yielded would be off by Lightning's one-batch prefetch) and the
    shuffling generator's state at the start of the epoch and now. ``forget_position=True`` ignores the
    restored state, as a plain DataLoader does: the epoch restarts with a fresh order."""

    def __init__(self, *args, forget_position: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.forget_position = forget_position
        self.consumed = 0
        self._epoch_start_rng = self.generator.get_state()
        self._skip = 0

    def state_dict(self) -> dict:
        return {"consumed": self.consumed, "epoch_start_rng": self._epoch_start_rng, "rng": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        if self.forget_position:
            return
        mid_epoch = state["consumed"] < len(self)
        self.generator.set_state(state["epoch_start_rng"] if mid_epoch else state["rng"])
        self._skip = state["consumed"] if mid_epoch else 0

    def __iter__(self):
        skip, self._skip = self._skip, 0
        self._epoch_start_rng = self.generator.get_state()  # this epoch's order is drawn from here
        self.consumed = skip
        return itertools.islice(super().__iter__(), skip, None)


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.first_step = None

    def training_step(self, batch, batch_idx):
        if self.first_step is None:
            self.first_step = self.trainer.global_step
            print(f"FIRST_STEP {self.first_step}", flush=True)
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_start(self, batch, batch_idx) -> None:
        self.trainer.train_dataloader.consumed = batch_idx + 1

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)

    # LoRA dropout draws its masks from torch's global RNG; exact resume needs that state in the checkpoint.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        torch.set_rng_state(checkpoint["torch_rng_state"])


class BlockAt(pl.Callback):
    """Stop (for the killer) in the middle of a training step, with ``step`` optimizer steps done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step:
            pause(f"BLOCKED {trainer.global_step}")


def pause_at_save(n: int) -> None:
    """The n-th checkpoint is half written to its file when the process is killed."""
    real_save = torch.save
    count = itertools.count(1)

    def save(obj, f, *args, **kwargs):
        if isinstance(f, io.IOBase) and not isinstance(f, io.BytesIO) and next(count) == n:
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: buffer.tell() // 2])
            f.flush()
            os.fsync(f.fileno())
            pause(f"PAUSED {getattr(f, 'name', f)}")
        return real_save(obj, f, *args, **kwargs)

    torch.save = save


def data(forget_position: bool) -> ResumableLoader:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES_PER_EPOCH * 8, 16, generator=generator)
    y = x[:, :4].argmax(dim=1)
    return ResumableLoader(
        TensorDataset(x, y),
        batch_size=8,
        shuffle=True,  # one seeded generator: each epoch a new order, the same in every run
        generator=torch.Generator().manual_seed(2),
        forget_position=forget_position,
    )


def train(root: Path, resume: bool = False, block_at: int | None = None, forget_position: bool = False) -> pl.Trainer:
    pl.seed_everything(0, verbose=False)
    checkpoints = ModelCheckpoint(
        dirpath=root / "ckpt", filename="{step}", every_n_train_steps=EVERY, save_top_k=-1, save_last=True
    )
    callbacks = [LoRAFinetuneCallback(CONFIG), checkpoints] + ([BlockAt(block_at)] if block_at else [])
    trainer = pl.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        callbacks=callbacks,
    )
    module = Module()
    trainer.fit(module, data(forget_position), ckpt_path="last" if resume else None)
    save_adapter(module.net, root / "final", overwrite=True)
    print(f"DONE {trainer.global_step}", flush=True)
    return trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--block-at", type=int, help="stop in the middle of the step after this many steps")
    parser.add_argument("--pause-save", type=int, help="stop with the n-th checkpoint file half written")
    parser.add_argument("--forget-position", action="store_true", help="resume as a plain DataLoader would")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if args.pause_save is not None:
        pause_at_save(args.pause_save)
    train(args.root, args.resume, args.block_at, args.forget_position)


if __name__ == "__main__":
    main()

"""A fault for the sweep test in tests/app/test_sweep_faults.py, added to a trial through the Hydra config:

    python scripts/train.py -m ... +callbacks.fault._target_=tests.workers.sweep_faults.KillIfRank \
        +callbacks.fault.rank=4

(with the repository on PYTHONPATH). The trial whose LoRA rank is ``rank`` kills its own process with SIGKILL when
training starts, as the kernel's OOM killer or a preempting scheduler would.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl

from lora_lightning.params import lora_layers


class KillIfRank(pl.Callback):
    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if any(layer.r == self.rank for _, layer in lora_layers(pl_module)):
            os.kill(os.getpid(), signal.SIGKILL)

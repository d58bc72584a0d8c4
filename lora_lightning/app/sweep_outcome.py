"""A Hydra callback that gives a sweep an honest exit status: a multirun none of whose trials finished exits
non-zero (each trial's failure is recorded and the sweep goes on, so without it the sweep would exit 0).

Hydra turns an exception in a callback into a warning; a `SystemExit` ends the process with its status.
"""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from lora_lightning.app.sweep_report import collect

log = logging.getLogger(__name__)


class SweepOutcome(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            trials = collect(config.hydra.sweep.dir)
        except FileNotFoundError:  # no trial folder at all: nothing ran
            trials = []
        done = sum(t.status == "ok" for t in trials)
        if done == 0:
            failed = sum(t.status == "failed" for t in trials)
            log.error("every trial of the sweep failed (%d of %d failed, none finished)", failed, len(trials))
            raise SystemExit(1)
        log.info("sweep done: %d of %d trials finished", done, len(trials))

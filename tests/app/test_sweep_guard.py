"""`-m` with an in-process launcher and a multi-process DDP trainer fails fast instead of re-running the sweep."""

import os
import subprocess
import sys

import pytest

from tests.helpers.app import sentiment_rows, write_csv
from tests.helpers.processes import ROOT

pytestmark = pytest.mark.multiprocess


def test_in_process_sweep_with_ddp_fails_fast_and_names_the_launcher(tmp_path):
    data = write_csv(tmp_path / "train.csv", sentiment_rows(32))
    command = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "-m", "experiment=tiny_classifier",
        "data=text_classification", f"data.train_file={data}", "data.val_size=8", "data.train_size=null",
        "logger=csv", "callbacks=none", "eval_before=false", "trainer.accelerator=cpu", "+trainer.strategy=ddp",
        "trainer.devices=2", "lora.r=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"}
    )
    output = done.stdout + done.stderr
    assert output.count("every extra rank would re-run the whole sweep") == 2, output[-3000:]
    assert "launcher=gpu_pool" in output
    assert "LOCAL_RANK" not in os.environ  # no rank was ever started
    assert not list((tmp_path / "sweep").rglob("adapter"))  # nothing trained

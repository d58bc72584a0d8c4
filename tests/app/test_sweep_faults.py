"""A sweep survives its failing trials: one that raises and one that is killed (SIGKILL) mid-run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lora_lightning.app.sweep_report import collect, write_report
from tests.helpers.app import sentiment_rows, write_csv
from tests.helpers.processes import ROOT, worker_env

pytestmark = pytest.mark.multiprocess
HUGE = 10**12  # a rank whose adapters no machine can allocate (a rank above a layer's side only warns, as in PEFT)


@pytest.mark.slow
def test_a_sweep_survives_a_trial_that_raises_and_one_that_is_killed(tmp_path):
    """``python scripts/train.py -m lora.r=2,10**12,4,8`` on the tiny classifier: r=10**12's adapters cannot be
    allocated (TargetError), r=4 is killed with SIGKILL when it starts training. r=2 and r=8 must still finish, and
    the sweep report must mark r=10**12 failed with its error and r=4 failed."""
    data = write_csv(tmp_path / "train.csv", sentiment_rows(64))
    sweep = tmp_path / "sweep"
    overrides = [
        "experiment=tiny_classifier",
        "data=text_classification",
        f"data.train_file={data}",
        "data.val_size=16",
        "data.train_size=null",
        "logger=csv",
        "callbacks=none",
        "trainer.accelerator=cpu",
        "eval_before=false",
        "+callbacks.fault._target_=tests.workers.sweep_faults.KillIfRank",
        "+callbacks.fault.rank=4",
        f"lora.r=2,{HUGE},4,8",
        "launcher=gpu_pool",  # each trial its own process: a killed trial cannot take the sweep down
        "hydra.launcher.gpus=[]",
        f"hydra.sweep.dir={sweep}",
    ]
    env = worker_env(WANDB_MODE="disabled")
    script = ROOT / "scripts" / "train.py"
    subprocess.run([sys.executable, str(script), "-m", *overrides], env=env, capture_output=True, timeout=300)

    trials = {t.rank: t for t in collect(sweep)}
    report = write_report(sweep)["markdown"].read_text()
    assert {r: trials[r].status if r in trials else "never ran" for r in (2, HUGE, 4, 8)} == {
        2: "ok",
        HUGE: "failed",
        4: "failed",
        8: "ok",
    }
    row = next(line for line in report.splitlines() if line.startswith("| r1e+12"))  # the run name of r=10**12
    assert "the adapters need" in row, f"the report does not give r={HUGE}'s error: {row}"

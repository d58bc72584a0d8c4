"""A real 2x2 multirun through the command line on a tiny model: four run folders named by their overrides,
four distinct offline W&B runs with the right configs in one group, loadable adapters, and the sweep report."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.utils import instantiate

from lora_lightning import load_adapter
from tests.helpers.app import compose_train, sentiment_rows, wandb_run, write_csv
from tests.helpers.processes import ROOT

GRID = {"r2_a4": (2, 4.0), "r2_a8": (2, 8.0), "r4_a4": (4, 4.0), "r4_a8": (4, 8.0)}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("multirun")
    train = write_csv(base / "train.csv", sentiment_rows(48))
    val = write_csv(base / "val.csv", sentiment_rows(16, seed=1))
    command = [
        sys.executable, "scripts/train.py", "-m",
        "model=tiny_classifier", "data=text_classification", f"data.train_file={train}", f"data.val_file={val}",
        "data.batch_size=8", "trainer.max_epochs=1", "task_name=test_sweep", f"paths.root_dir={base}",
        f"hydra.sweep.dir={base / 'sweep'}", "lora.r=2,4", "lora.alpha=4,8", "log_adapter_artifact=true",
    ]  # fmt: skip
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return base / "sweep"


def test_each_trial_has_its_own_run_folder_named_by_its_overrides(sweep: Path) -> None:
    folders = sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir())
    assert folders == sorted(GRID)
    for name, (r, alpha) in GRID.items():
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert metrics["status"] == "ok" and (metrics["r"], metrics["alpha"]) == (r, alpha)
        assert metrics["run_name"] == name and 0 <= metrics["metric"] <= 1


def test_each_trial_is_its_own_offline_wandb_run_with_its_config(sweep: Path) -> None:
    runs = {name: wandb_run(sweep / name) for name in GRID}
    assert len({run["id"] for run in runs.values()}) == 4
    groups = {run["group"] for run in runs.values()}
    assert len(groups) == 1 and groups.pop().startswith("test_sweep-")
    for name, (r, alpha) in GRID.items():
        run = runs[name]
        assert run["name"] == name
        assert run["config"]["lora"]["r"] == r and run["config"]["lora"]["alpha"] == alpha
        assert 0 < run["config"]["params/trainable"] < run["config"]["params/total"]
        assert run["artifacts"] == [f"adapter-{name}"]  # log_adapter_artifact=true
        assert run["artifact"][f"adapter-{name}"]["metadata"]["lora"]["r"] == r  # the LoRA config as metadata


def test_each_trial_leaves_a_loadable_peft_adapter(sweep: Path, tmp_path) -> None:
    model = instantiate(compose_train(["model=tiny_classifier"], output_dir=tmp_path).model)
    report = load_adapter(model.model, sweep / "r4_a8" / "adapter")
    assert report.modules_to_save == ["classifier"] and len(report.targets) == 13  # with the pooler's dense
    config = json.loads((sweep / "r4_a8" / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 8.0)


def test_the_sweep_report_covers_every_trial(sweep: Path) -> None:
    done = subprocess.run(
        [sys.executable, "scripts/sweep_report.py", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    with open(sweep / "sweep_report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["run"] for row in rows) == sorted(GRID)
    assert all(row["status"] == "ok" and int(row["trainable_params"]) > 0 for row in rows)
    assert list(rows[0]) == ["run", "rank", "alpha", "seed", "trainable_params", "val/acc", "tokens_per_sec",
                             "time_per_step_ms", "peak_memory_mib", "status", "error"]  # fmt: skip
    assert "| r4_a8 | 4 | 8 |" in (sweep / "sweep_report.md").read_text()
    assert (sweep / "sweep_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

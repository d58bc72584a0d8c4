"""The launch fails before it costs: config checks and the sweep guard fire before any model or logger is built,
a target that matches nothing leaves no W&B run behind; a run starts quietly with the config tree and one LoRA
summary line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lora_lightning.app import console
from lora_lightning.app.schema import ConfigError
from lora_lightning.app.train import train
from lora_lightning.inject import TargetError
from tests.helpers.app import compose_train, sentiment_rows, write_csv
from tests.helpers.processes import ROOT, worker_env


def tiny(tmp_path, *overrides: str) -> list[str]:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(48))
    return ["model=tiny_classifier", "data=text_classification", f"data.train_file={data}", "data.val_size=8",
            "data.batch_size=8", "print_config=false", *overrides]  # fmt: skip


def test_a_target_that_matches_nothing_fails_before_any_wandb_run(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(tiny(tmp_path, "lora.target_modules=[does_not_exist]"), output_dir=tmp_path / "run")
    with pytest.raises(TargetError, match="does_not_exist"):
        train(cfg)
    assert not (tmp_path / "run" / "wandb").exists()  # no junk run to sync
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["status"] == "failed"


@pytest.mark.parametrize(("override", "message"), [("kernels=fused", "kernels='fused'"), ("quant=nf4", "quant='nf4'")])
def test_a_switch_with_an_unknown_value_is_a_config_error(tmp_path, override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        train(compose_train(tiny(tmp_path, override, "logger=csv"), output_dir=tmp_path / "run"))
    assert not (tmp_path / "run" / "csv").exists()


def test_the_lora_summary_names_what_all_linear_left_out() -> None:
    from lora_lightning import LoRAConfig, inject_lora
    from lora_lightning.app.models import tiny_encoder

    model = tiny_encoder(num_labels=2).model
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear", modules_to_save=["classifier"])
    inject_lora(model, config)
    line = console.lora_summary(model, config)
    assert line.startswith("LoRA r=4 alpha=8 on 13 layers (query x2, key x2, value x2, dense x7); trainable params")
    assert line.endswith("trained in full: classifier; all-linear left out: classifier")


def run_script(tmp_path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), *args]
    env = worker_env(WANDB_MODE="offline", HF_HUB_OFFLINE="1")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


CHATTER = ("Failed to load", "Detected no triton", "_pytree", "anonymous setting", "Tip:", "LoRAFinetuneCallback:")


@pytest.mark.slow
def test_a_run_starts_quietly_with_the_config_tree_and_one_summary_line(tmp_path) -> None:
    done = run_script(tmp_path, *tiny(tmp_path, "trainer.max_steps=2", "print_config=true", "logger=wandb"),
                      f"hydra.run.dir={tmp_path / 'run'}")  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert [c for c in CHATTER if c in output] == []
    assert output.count("LoRA r=8 alpha=16 on 13 layers") == 1  # the pooler's dense layer too
    assert "all-linear left out: model.classifier" in output
    assert "├── lora" in output and "target_modules: all-linear" in output  # the resolved config as a tree


@pytest.mark.multiprocess
def test_an_in_process_sweep_with_ddp_stops_at_once_with_a_non_zero_exit(tmp_path) -> None:
    overrides = tiny(tmp_path, "logger=csv", "trainer.accelerator=cpu", "+trainer.strategy=ddp", "trainer.devices=2",
                     "lora.r=2,4", f"hydra.sweep.dir={tmp_path / 'sweep'}")  # fmt: skip
    done = run_script(tmp_path, "-m", *overrides)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert output.count("every extra rank would re-run the whole sweep") == 1 and "launcher=gpu_pool" in output
    assert "r4" not in {p.name for p in (tmp_path / "sweep").iterdir()}  # the second trial never started
    assert "LoRA r=" not in output  # no model was built


@pytest.mark.multiprocess
def test_a_sweep_whose_every_trial_failed_exits_non_zero(tmp_path) -> None:
    sweep = tmp_path / "sweep"
    done = run_script(
        tmp_path,
        "-m",
        *tiny(tmp_path, "logger=csv", "lora.target_modules=[no_such_layer],[nor_this]", f"hydra.sweep.dir={sweep}"),
    )  # fail in the trial, at setup
    assert done.returncode == 1, (done.stdout + done.stderr)[-3000:]
    assert "every trial of the sweep failed (2 of 2 failed" in done.stdout + done.stderr
    ok = run_script(tmp_path, "-m", *tiny(tmp_path, "logger=csv", "trainer.max_steps=1",
                                          "lora.target_modules=all-linear,[no_such_layer]",
                                          f"hydra.sweep.dir={tmp_path / 'mixed'}"))  # fmt: skip
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]

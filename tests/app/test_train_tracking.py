"""Run naming from overrides, W&B settings (never an unset mode), logger construction, and ending runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_lightning.app import tracking
from lora_lightning.app.tracking import RunInfo, build_loggers, run_info, run_name, swept_keys
from tests.helpers.app import compose_train


@pytest.mark.parametrize(
    ("overrides", "swept", "name"),
    [
        (["lora.alpha=16", "lora.r=8"], None, "r8_a16"),
        (["lora.r=4", "optimizer.lr=0.0003", "seed=1"], None, "r4_lr0.0003_seed1"),
        (["optimizer.lr=0.00012897950480855554", "lora.r=16"], ["lora.r", "optimizer.lr"], "r16_lr0.000129"),
        (["model=tiny_classifier", "trainer.max_epochs=3"], None, "tiny_classifier_max_epochs=3"),
        (["data.train_file=/x/train.csv", "trainer.fast_dev_run=true", "logger=csv", "paths.root_dir=/tmp"], None, ""),
        (["model=tiny_classifier", "lora.alpha=8", "lora.r=2", "data.batch_size=8"], ["lora.r", "lora.alpha"], "r2_a8"),
    ],
)
def test_run_names_come_from_the_overrides(overrides, swept, name) -> None:
    assert run_name(overrides, swept=swept) == name


def test_an_empty_name_falls_back_to_the_job_number() -> None:
    assert run_name(["trainer.fast_dev_run=true"], job_num=5) == "job5"


def test_swept_keys_come_from_the_sweeper_and_the_command_line() -> None:
    argv = ["-m", "lora.r=2,4", "lora.alpha=range(4,9,4)", "lora.target_modules=[query,value]", "seed=1"]
    assert swept_keys(None, argv) == ["lora.r", "lora.alpha"]
    assert swept_keys({"lora.r": "2,4", "optimizer.lr": "interval(0.1,1)"}, []) == ["lora.r", "optimizer.lr"]


def test_run_info_outside_a_multirun(tmp_path) -> None:
    cfg = compose_train(["lora.r=16"], output_dir=tmp_path)
    info = run_info(cfg)
    assert info == RunInfo(name="r16", group=None, output_dir=tmp_path, multirun=False)
    assert run_info(compose_train([], output_dir=tmp_path)).name == "r8_a16"  # no overrides: from the config


def test_wandb_gets_an_explicit_mode_name_and_group(tmp_path, monkeypatch) -> None:
    cfg = compose_train(["logger.wandb.mode=disabled"], output_dir=tmp_path)
    info = RunInfo(name="r8_a16", group="train-sweep1", output_dir=tmp_path, multirun=True)
    (logger,) = build_loggers(cfg, info)
    assert logger._wandb_init["mode"] == "disabled"
    assert logger._wandb_init["name"] == "r8_a16" and logger._wandb_init["group"] == "train-sweep1"
    monkeypatch.delenv("WANDB_MODE", raising=False)
    node = OmegaConf.create({"mode": None})
    assert tracking._wandb_settings(node, info)["mode"] == "offline"  # never left unset
    with pytest.raises(ValueError, match=r"logger\.wandb\.mode='onlin'"):
        tracking._wandb_settings(OmegaConf.create({"mode": "onlin"}), info)


def test_the_csv_logger_for_people_without_wandb(tmp_path) -> None:
    cfg = compose_train(["logger=csv"], output_dir=tmp_path)
    (logger,) = build_loggers(cfg, run_info(cfg))
    assert type(logger).__name__ == "CSVLogger" and Path(logger.log_dir) == tmp_path / "csv"
    assert build_loggers(compose_train(["~logger"], output_dir=tmp_path), run_info(cfg)) == []


def test_finish_ends_the_wandb_run(monkeypatch) -> None:
    wandb = pytest.importorskip("wandb")
    run = wandb.init(mode="disabled")
    assert wandb.run is run
    tracking.finish()
    assert wandb.run is None
    tracking.finish()  # no run: nothing to do

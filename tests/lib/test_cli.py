"""LightningCLI: every `LoRAFinetuneCallback` argument, and every `LoRAConfig` field, from a YAML file (the extra
``cli``), with a real ``fit`` on a tiny module."""

from __future__ import annotations

import inspect
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

import lightning.pytorch as pl
import pytest
import torch
import yaml
from torch.optim import Optimizer

from lora_lightning import AdapterSpec, LoRAConfig, LoRAFinetuneCallback, adapter_names
from lora_lightning.kernels import KERNELS
from tests.helpers.models import MLPModule, classification_data, make_mlp
from tests.helpers.processes import ROOT

pytest.importorskip("jsonargparse", reason="LightningCLI needs the extra 'cli' (jsonargparse[signatures])")
from lightning.pytorch.cli import LightningCLI

LR, RATIO, GAMMA = 0.01, 4.0, 0.5
# every LoRAConfig field away from its default
LORA = {
    "r": 4,
    "alpha": 8.0,
    "dropout": 0.1,
    "target_modules": r"net\.[024]",
    "exclude_modules": ["net.4"],
    "use_rslora": True,
    "modules_to_save": ["net.4"],
    "use_dora": True,
    "init": "gaussian",
    "rank_pattern": {r"net\.2": 2},
    "alpha_pattern": {r"net\.2": 6.0},
}


@pytest.fixture(autouse=True)
def _no_command_line(monkeypatch):
    """LightningCLI reads ``args=``, as from the command line; pytest's own arguments are not for it."""
    monkeypatch.setattr(sys, "argv", ["lora-cli"])


class MLPData(pl.LightningDataModule):
    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return classification_data()


def halve_every_step(optimizer: Optimizer) -> dict[str, Any]:
    """A scheduler factory that returns Lightning's dict: stepped after every optimizer step."""
    return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=GAMMA), "interval": "step"}


def callback_node(**init_args: Any) -> dict[str, Any]:
    return {"class_path": "lora_lightning.LoRAFinetuneCallback", "init_args": init_args}


def write_config(tmp_path: Path, callback: dict[str, Any], epochs: int = 2) -> Path:
    trainer = {
        "max_epochs": epochs,
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": str(tmp_path),
        "callbacks": [callback],
    }
    path = tmp_path / "lora.yaml"
    path.write_text(yaml.safe_dump({"seed_everything": 0, "trainer": trainer, "model": {"seed": 0}}))
    return path


def run_cli(*args: str) -> LightningCLI:
    return LightningCLI(MLPModule, MLPData, args=list(args))


def lora_callback(cli: LightningCLI) -> LoRAFinetuneCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRAFinetuneCallback)]
    return callback


def test_fit_from_a_yaml_sets_every_argument_trains_the_adapters_and_steps_the_scheduler(tmp_path):
    callback = callback_node(
        config=LORA,
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": LR}},
        lr_scheduler={"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 1, "gamma": GAMMA}},
        adapter_name="mine",
        loraplus_lr_ratio=RATIO,
        kernels="none",
    )
    cli = run_cli("fit", "--config", str(write_config(tmp_path, callback)))

    lora = lora_callback(cli)
    assert lora.config == LoRAConfig(**LORA)
    assert (lora.adapter_name, lora.loraplus_lr_ratio, lora.kernels) == ("mine", RATIO, "none")
    net, base = cli.model.net, make_mlp(0)
    assert adapter_names(cli.model) == ["mine"]
    shared = {"dropout": 0.1, "use_rslora": True, "use_dora": True, "init": "gaussian"}
    assert net[0].spec("mine") == AdapterSpec(r=4, alpha=8.0, **shared)
    assert net[2].spec("mine") == AdapterSpec(r=2, alpha=6.0, **shared)  # rank_pattern, alpha_pattern
    for i in (0, 2):  # the base frozen, the adapters trained (B starts at zero)
        torch.testing.assert_close(net[i].base_layer.weight, base[i].weight, rtol=0, atol=0)
        assert net[i].factors("mine")[1].abs().sum() > 0
    assert not torch.equal(net[4].weight, base[4].weight)  # modules_to_save trains in full

    (optimizer,) = cli.trainer.optimizers
    assert isinstance(optimizer, torch.optim.AdamW)
    # LoRA+ groups, each halved once per epoch by the StepLR from the YAML
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([LR * GAMMA**2, LR * RATIO * GAMMA**2])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())  # LightningCLI's record of the run
    assert saved["trainer"]["callbacks"][0]["init_args"]["config"] == LORA


def test_the_yaml_of_the_docs_fits_and_one_field_is_overridden_from_the_command_line(tmp_path):
    text = (ROOT / "docs" / "adapters.md").read_text()
    block = text.split("```yaml\n# lora.yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "lora.yaml").write_text(block)
    settings = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    settings += ["--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}"]
    cli = run_cli("fit", "--config", str(tmp_path / "lora.yaml"), *settings, "--trainer.callbacks.config.r=16")
    assert lora_callback(cli).config == LoRAConfig(r=16, alpha=16, dropout=0.05, target_modules="all-linear")
    assert cli.trainer.current_epoch == 3 and cli.model.net[0].factors("default")[1].abs().sum() > 0


def test_a_scheduler_factory_returning_lightnings_dict_steps_every_optimizer_step(tmp_path):
    callback = callback_node(
        config={"r": 2, "target_modules": ["net.0"]},
        optimizer="torch.optim.SGD",
        lr_scheduler=f"{halve_every_step.__module__}.halve_every_step",
    )
    cli = run_cli("fit", "--config", str(write_config(tmp_path, callback, epochs=1)))
    (config,) = cli.trainer.lr_scheduler_configs
    assert config.interval == "step" and cli.trainer.global_step == 4
    assert config.scheduler.get_last_lr() == pytest.approx([1e-3 * GAMMA**4])  # SGD's default lr


def test_kernels_and_a_null_config_parse_from_yaml(tmp_path):
    """``kernels: liger`` needs CUDA at setup, so it is only parsed here; ``config: null`` trains existing
    adapters."""
    callback = callback_node(config=None, kernels="liger")
    cli = LightningCLI(MLPModule, MLPData, run=False, args=["--config", str(write_config(tmp_path, callback))])
    lora = lora_callback(cli)
    assert (lora.config, lora.kernels, lora.optimizer) == (None, "liger", None)


@pytest.mark.parametrize(
    ("init_args", "message"),
    [
        ({"kernels": "ligr"}, "Expected a typing.Literal['none', 'liger']"),
        ({"config": {"alpah": 4}}, "Option 'alpah' is not accepted"),
        ({"config": {"r": 4}, "optimizer": "torch.optim.NoSuchOptimizer"}, "optimizer"),
    ],
)
def test_a_bad_value_in_the_yaml_is_refused_before_any_training(tmp_path, capsys, init_args, message):
    path = write_config(tmp_path, callback_node(**init_args))
    with pytest.raises(SystemExit):
        run_cli("fit", "--config", str(path))
    assert message in capsys.readouterr().err


def test_an_invalid_config_value_fails_with_lora_configs_message(tmp_path):
    path = write_config(tmp_path, callback_node(config={"r": 0}))
    with pytest.raises(ValueError, match="invalid LoRAConfig") as error:
        run_cli("fit", "--config", str(path))
    assert "r=0: the rank must be a positive int" in str(error.value.__cause__ or error.value)


def test_help_documents_every_argument(capsys):
    with pytest.raises(SystemExit) as done:
        run_cli("fit", "--trainer.callbacks.help", "lora_lightning.LoRAFinetuneCallback")
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in inspect.signature(LoRAFinetuneCallback).parameters:
        assert f"--trainer.callbacks.{name} " in text
    assert "the adapters to inject" in text and "LoRA+: the ``B`` matrices learn" in text


def test_every_lora_config_field_has_a_type_hint_that_jsonargparse_reads():
    """A field whose hint jsonargparse cannot read would be missing from the parser (so not settable from YAML)."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(LoRAConfig, "lora")
    parsed = parser.parse_args([])
    assert set(vars(parsed.lora)) == {f.name for f in fields(LoRAConfig)}
    assert parser.instantiate_classes(parser.parse_object({"lora": LORA})).lora == LoRAConfig(**LORA)


def test_the_kernels_hint_lists_the_known_kernels():
    hint = inspect.signature(LoRAFinetuneCallback).parameters["kernels"].annotation
    assert get_args(eval(hint, vars(sys.modules[LoRAFinetuneCallback.__module__]))) == KERNELS


def test_importing_the_library_imports_neither_jsonargparse_nor_lightnings_cli():
    code = "import sys, lora_lightning; print(sorted({'jsonargparse', 'lightning.pytorch.cli'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"

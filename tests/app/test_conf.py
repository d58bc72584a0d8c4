"""The Hydra config tree: every option of every group and every preset composes and passes the schema;
typos and wrong types fail at start, naming the key."""

from __future__ import annotations

import dataclasses
import re

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf, read_write

from lora_lightning import LoRAConfig
from lora_lightning.app.schema import ConfigError, LoRASchema, check_config, config_problems
from lora_lightning.app.train import CONF_DIR
from tests.helpers.app import compose_train

GROUPS = ["model", "data", "lora", "optimizer", "scheduler", "trainer", "logger", "callbacks", "paths", "hydra"]
# A launcher or sweeper whose Hydra plugin is an optional extra that is not installed here.
MISSING_PLUGIN = re.compile(r"Could not find 'hydra/(launcher|sweeper)/\w+'")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def all_choices() -> list[tuple[str, str]]:
    return [(g, o) for g in [*GROUPS, "launcher", "sweep", "experiment"] for o in options(g)]


@pytest.mark.parametrize(("group", "option"), all_choices(), ids=lambda v: str(v))
def test_every_config_composes_and_passes_the_schema(group: str, option: str, tmp_path) -> None:
    overrides = [f"{group}={option}"] if group != "hydra" else []
    try:
        cfg = compose_train(overrides, output_dir=tmp_path)
    except ConfigCompositionException as err:
        missing = MISSING_PLUGIN.search(str(err))
        if group in ("launcher", "sweep") and missing:
            pytest.skip(f"{group}={option} needs an optional Hydra plugin ({missing.group(0)})")
        raise
    assert config_problems(cfg) == []
    assert isinstance(instantiate(cfg.lora), LoRAConfig)


def test_the_lora_group_maps_field_for_field_onto_loraconfig(tmp_path) -> None:
    schema_fields = {f.name for f in dataclasses.fields(LoRASchema)} - {"_target_"}
    assert schema_fields == {f.name for f in dataclasses.fields(LoRAConfig)}
    cfg = compose_train([], output_dir=tmp_path)
    assert set(cfg.lora) - {"_target_"} == schema_fields
    assert instantiate(cfg.lora) == LoRAConfig()  # the YAML defaults are LoRAConfig's defaults
    cfg = compose_train(["lora.r=16", "lora.alpha=32", "lora.target_modules=[query,value]"], output_dir=tmp_path)
    assert instantiate(cfg.lora) == LoRAConfig(r=16, alpha=32.0, target_modules=["query", "value"])


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("lora.rank=4", "rank"),  # misspelled key of the LoRA schema
        ("lora.r=four", "lora.r"),  # mistyped value
        ("lora.use_rslora=maybe", "lora.use_rslora"),
        ("seeed=3", "seeed"),  # misspelled top-level key
        ("seed=x", "seed"),
        ("trainer.max_epoch=2", "max_epoch"),  # misspelled key of a group
    ],
)
def test_misspelled_or_mistyped_keys_fail_at_compose_time_naming_the_key(override: str, named: str, tmp_path) -> None:
    with pytest.raises(ConfigCompositionException) as failure:
        compose_train([override], output_dir=tmp_path)
    message = str(failure.value) + str(failure.value.__cause__)
    assert named in message


def test_target_nodes_are_checked_against_their_signatures(tmp_path) -> None:
    cfg = compose_train(
        ["+trainer.max_epoch=3", "+optimizer.lr_rate=0.1", "data.batch_size=many", "+model.backbone.colour=red"],
        output_dir=tmp_path,
    )
    with pytest.raises(ConfigError) as failure:
        check_config(cfg)
    message = str(failure.value)
    assert "trainer.max_epoch: unknown key for lightning.pytorch.Trainer (did you mean 'max_epochs'?)" in message
    assert "optimizer.lr_rate: unknown key for torch.optim.AdamW (did you mean 'lr'?)" in message
    assert "data.batch_size='many'" in message and "expects int" in message
    assert "model.backbone.colour: unknown key for lora_lightning.app.models.packaged_minilm" in message


def test_an_unimportable_target_is_reported(tmp_path) -> None:
    cfg = compose_train(["model._target_=lora_lightning.app.models.NoSuchModule"], output_dir=tmp_path)
    assert any("cannot import" in p for p in config_problems(cfg))


def test_the_default_is_the_main_job(tmp_path) -> None:
    cfg = compose_train([], output_dir=tmp_path)
    assert cfg.model.backbone._target_ == "lora_lightning.app.models.packaged_minilm"
    assert cfg.data.dataset == "vader_movies"
    assert cfg.logger.wandb._target_ == "lightning.pytorch.loggers.WandbLogger"
    assert cfg.optimizer._partial_ and cfg.scheduler._partial_


def test_wandb_mode_is_offline_unless_configured(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert compose_train([], output_dir=tmp_path).logger.wandb.mode == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_train([], output_dir=tmp_path).logger.wandb.mode == "disabled"
    assert compose_train(["logger.wandb.mode=online"], output_dir=tmp_path).logger.wandb.mode == "online"


def test_the_rank_alpha_sweep_is_a_multirun_grid(tmp_path) -> None:
    cfg = compose_train(["sweep=rank_alpha"], output_dir=tmp_path)
    assert str(cfg.hydra.mode) == "RunMode.MULTIRUN"
    params = OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)
    assert set(params) == {"lora.r", "lora.alpha", "seed"}
    assert len(params["lora.r"].split(",")) >= 3 and len(params["lora.alpha"].split(",")) >= 3
    assert params["seed"] == "42"  # one seed: the same for every trial, not swept


def test_sweep_seeds_repeats_every_trial_over_seeds(tmp_path) -> None:
    cfg = compose_train(["sweep=rank_alpha", "sweep.seeds=3", "seed=7"], output_dir=tmp_path)
    assert OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)["seed"] == "7,8,9"
    with read_write(cfg.hydra):
        cfg.hydra.job.num = 0
        cfg.hydra.overrides.task = ["seed=8", "lora.r=2", "lora.alpha=8"]
        assert cfg.hydra.sweep.subdir == "r2_a8_seed8"
    single = compose_train(["sweep=rank_alpha"], output_dir=tmp_path)
    with read_write(single.hydra):
        single.hydra.job.num = 0
        single.hydra.overrides.task = ["seed=42", "lora.r=2", "lora.alpha=8"]
        assert single.hydra.sweep.subdir == "r2_a8"  # one seed: not part of the name


def test_sweep_trials_are_named_by_their_overrides(tmp_path) -> None:
    cfg = compose_train(["lora.alpha=16", "lora.r=8"], output_dir=tmp_path)
    with read_write(cfg.hydra):
        cfg.hydra.job.num = 3  # set by the launcher for each job
        assert cfg.hydra.sweep.subdir == "r8_a16"
        cfg.hydra.overrides.task = ["trainer.fast_dev_run=true"]
        assert cfg.hydra.sweep.subdir == "job3"  # nothing that names a trial: numbered instead


def test_the_smollm2_preset_pairs_the_causal_lm_with_text_data(tmp_path) -> None:
    cfg = compose_train(["experiment=smollm2_lm"], output_dir=tmp_path)
    assert cfg.model._target_ == "lora_lightning.app.models.CausalLM"
    assert cfg.model.backbone._target_ == "lora_lightning.app.models.packaged_smollm2"
    assert cfg.data._target_ == "lora_lightning.app.data.CausalLMDataModule"
    assert "q_proj" in cfg.lora.target_modules

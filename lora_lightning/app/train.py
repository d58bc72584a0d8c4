"""The Hydra training task: a LoRA fine-tune of the configured model on the configured data.

``train(cfg)`` checks the config, builds everything from ``_target_`` nodes, evaluates the held-out metric
before and after training, saves the adapter (PEFT format) into the run folder, writes ``metrics.json`` there
and returns ``(metrics, objects)``. ``main`` is the ``@hydra.main`` entry (``scripts/train.py``); it returns
the optimized metric so Hydra sweepers (e.g. Optuna) can use it.
"""

from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torchmetrics import Metric

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, find_targets, load_adapter, param_summary
from lora_lightning.app import console, outputs, schema, switches, throughput, tracking
from lora_lightning.app.resume import LoaderPosition
from lora_lightning.app.runstats import RunStats
from lora_lightning.files import write_text_atomically

log = logging.getLogger(__name__)


def config_dir() -> Path:
    """The Hydra configs: ``conf/`` at the top of a source checkout, shipped inside the wheel as
    ``lora_lightning/app/conf``."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[2] / "conf"


CONF_DIR = config_dir()
METRICS_FILE = "metrics.json"
IN_PROCESS_LAUNCHERS = {"BasicLauncher", "JoblibLauncher"}

schema.register()


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one fine-tune as configured; see the module docstring."""
    started = time.perf_counter()
    console.quiet()
    check_launch(cfg)
    lora_config = with_new_modules(LoRAConfig.from_dict(lora_fields(cfg.lora)), new_modules_of(cfg.model))
    info = tracking.run_info(cfg)
    info.output_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {"run_name": info.name, "group": info.group, "status": "running"}
    metrics.update(r=lora_config.r, alpha=lora_config.alpha, seed=cfg.seed, tags=list(cfg.tags))
    metrics.update(pid=os.getpid(), host=socket.gethostname())
    write_metrics(info.output_dir / METRICS_FILE, metrics)  # a trial killed mid-run is told from one never started
    objects: dict[str, Any] = {"cfg": cfg, "lora_config": lora_config}
    failed = True
    try:
        if cfg.seed is not None:
            pl.seed_everything(cfg.seed, workers=True, verbose=False)
        stats = RunStats()
        extra = [stats, LoaderPosition(), console.LoRASummary(lora_config)]
        trainer = objects["trainer"] = build_trainer(cfg, None if cfg.adapter_path else lora_config, extra)
        refuse_ranks_in_a_shared_sweep_process(trainer)  # before any model or logger exists
        if cfg.export.merged:
            outputs.check_merged_export(trainer)

        module = objects["module"] = instantiate(cfg.model)
        datamodule = objects["datamodule"] = instantiate(cfg.data, tokenizer=module.tokenizer)
        check_task_fit(module, datamodule)
        prepare_network(cfg, module, lora_config)
        metric_name, mode = objective(cfg, module)
        metrics.update(metric_name=metric_name, metric_mode=mode)

        loggers = objects["loggers"] = tracking.build_loggers(cfg, info)  # only now: a config error leaves no run
        trainer.loggers = loggers
        tracking.log_config(loggers, cfg, {"run_name": info.name, "lora_effective": lora_config.to_dict()})

        if cfg.eval_before:  # of the weights training starts from: the checkpoint's when resuming
            metrics["before"] = evaluate(trainer, module, datamodule, cfg.ckpt_path)
            report(trainer, f"held-out {metric_name} before training", metrics["before"], metric_name)
        if cfg.train:
            fit_started = time.perf_counter()
            trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            metrics["train_time_s"] = round(time.perf_counter() - fit_started, 2)
            metrics.update(stats.summary(), global_step=trainer.global_step)
            metrics.update(throughput.summary(trainer.logged_metrics, trainer.world_size))
        if cfg.eval_after:
            metrics["after"] = evaluate(trainer, module, datamodule, None if cfg.train else cfg.ckpt_path)
            report(trainer, f"held-out {metric_name} after training", metrics["after"], metric_name)
        metrics["metric"] = metrics.get("after", {}).get(metric_name, math.nan)
        metrics["params"] = trainable_counts(module)

        summary = summary_values(metrics)
        if cfg.save_adapter and cfg.train:
            card = outputs.card_metrics(summary)
            metrics.update(outputs.save_run_outputs(trainer, module, info.output_dir, card, merged=cfg.export.merged))
            if cfg.log_adapter_artifact:
                aliases = tracking.artifact_aliases(metrics, stats.validations)
                tracking.log_adapter_artifact(loggers, Path(metrics["adapter_dir"]), info.name, card, aliases)
        tracking.log_summary(loggers, summary)
        metrics["status"] = "ok"
        failed = False
        return metrics, objects
    except Exception as err:
        metrics.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    finally:
        metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
        write_metrics(info.output_dir / METRICS_FILE, metrics)
        tracking.finish(failed=failed)
        gc.collect()  # the next job of an in-process multirun starts from a cleaner heap


def check_launch(cfg: DictConfig) -> None:
    """The checks that need nothing built: the schema and the switches' values (`schema.ConfigError`)."""
    schema.check_config(cfg)
    try:
        switches.check(cfg.quant, cfg.kernels)
    except ValueError as err:
        raise schema.ConfigError(f"invalid config:\n  - {err}") from None


def new_modules_of(model_cfg: DictConfig) -> tuple[str, ...]:
    """The modules a task creates from scratch (its class says, e.g. a classifier head), known before building."""
    return tuple(getattr(get_class(model_cfg._target_), "new_modules", ()))


def prepare_network(cfg: DictConfig, module: pl.LightningModule, lora_config: LoRAConfig) -> None:
    """The switches on the task's network, a saved adapter if evaluating one, and the target check (before
    any logger starts): the LoRA callback injects into this network at ``setup``."""
    for note in switches.apply(module.model, cfg.quant, cfg.gradient_checkpointing, cfg.quant_dtype):
        log.info(note)
    if cfg.adapter_path:
        load_adapter(module.model, cfg.adapter_path)
        log.info("adapter loaded from %s", cfg.adapter_path)
    else:
        find_targets(module, lora_config)  # a TargetError naming the layers that could be adapted
    if cfg.compile:
        switches.compile_network(module)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """The command-line entry: prints the resolved config, then trains. In a multirun, a trial that fails is
    logged and recorded (``status: failed`` in its ``metrics.json``) and the sweep goes on, but a config that
    cannot launch (`schema.ConfigError`: the schema, the switches, the sweep guard) stops the whole sweep at
    that trial with exit status 1; a single run raises."""
    console.quiet()
    if cfg.print_config:
        console.print_config_tree(cfg)
    try:
        metrics, _ = train(cfg)
    except Exception as err:
        multirun = tracking.run_info(cfg).multirun
        if multirun and isinstance(err, schema.ConfigError):  # every trial would fail alike: stop the sweep now
            log.error("%s\nthe sweep stops here: this config cannot launch", err)
            raise SystemExit(1) from err  # Hydra's launchers record an Exception and go on to the next trial
        if not multirun:
            raise
        log.exception("this trial failed; the sweep goes on")
        return math.nan
    return metrics.get("metric")


def refuse_ranks_in_a_shared_sweep_process(trainer: pl.Trainer) -> None:
    """Lightning's DDP launcher re-runs ``sys.argv`` for each extra rank; inside a sweep run by an in-process
    launcher that re-runs the whole sweep (Hydra #2070, Lightning #11300). Fail at start instead."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = str(OmegaConf.select(HydraConfig.get(), "launcher._target_") or "")
    relaunches = type(trainer.strategy.launcher).__name__ == "_SubprocessScriptLauncher"
    if relaunches and trainer.world_size > 1 and launcher.rsplit(".", 1)[-1] in IN_PROCESS_LAUNCHERS:
        raise schema.ConfigError(
            f"trainer.strategy={type(trainer.strategy).__name__} with {trainer.world_size} processes cannot run "
            f"inside a -m sweep launched by {launcher.rsplit('.', 1)[-1]}: every extra rank would re-run the whole "
            "sweep. Give each trial its own process: add launcher=gpu_pool (with hydra.launcher.gpus_per_trial="
            f"{trainer.num_devices}) on one node, or launcher=submitit_slurm on a cluster"
        )


def lora_fields(node: DictConfig) -> dict[str, Any]:
    """The ``lora`` group as `LoRAConfig` keyword arguments (without ``_target_``)."""
    values = OmegaConf.to_container(node, resolve=True)
    assert isinstance(values, dict)
    values.pop("_target_", None)
    return values


def with_new_modules(config: LoRAConfig, new_modules: tuple[str, ...] | list[str]) -> LoRAConfig:
    """Add the modules a task creates from scratch (e.g. a classifier head) to ``modules_to_save``."""
    saved = list(config.modules_to_save or [])
    added = [m for m in new_modules if m not in saved]
    if not added:
        return config
    log.info("new modules trained in full and saved with the adapter (modules_to_save): %s", added)
    return dataclasses.replace(config, modules_to_save=saved + added)


def check_task_fit(module: pl.LightningModule, datamodule: pl.LightningDataModule) -> None:
    """Fail early when model and data belong to different tasks (e.g. a causal LM on labelled data)."""
    from lora_lightning.app.data import CausalLMDataModule, ClassificationDataModule
    from lora_lightning.app.models import CausalLM, SequenceClassifier

    pairs = {SequenceClassifier: ClassificationDataModule, CausalLM: CausalLMDataModule}
    known = tuple(pairs.values())
    for model_type, data_type in pairs.items():
        if isinstance(module, model_type) and isinstance(datamodule, known) and not isinstance(datamodule, data_type):
            raise ValueError(
                f"model {type(module).__name__} needs {data_type.__name__} data, got {type(datamodule).__name__}; "
                "pick a matching data config (e.g. experiment=smollm2_lm for the causal LM)"
            )


def objective(cfg: DictConfig, module: pl.LightningModule) -> tuple[str, str]:
    """The metric to report and optimize, with ``max`` or ``min``."""
    default_name, default_mode = getattr(module, "default_metric", ("val/loss", "min"))
    name = cfg.optimized_metric or default_name
    if name == default_name:
        return name, default_mode
    return name, "min" if any(w in name for w in ("loss", "ppl", "perplexity", "error")) else "max"


def build_trainer(cfg: DictConfig, lora_config: LoRAConfig | None, extra_callbacks: list[pl.Callback]) -> pl.Trainer:
    """The Trainer from ``cfg.trainer`` with the configured callbacks, the LoRA callback (which builds the
    optimizer and LR schedule over the adapter parameters; ``lora_config=None`` trains a loaded adapter) and
    ``extra_callbacks``. No logger yet: the caller sets ``trainer.loggers`` once the model is known to fit."""
    callbacks = [instantiate(node) for node in (cfg.get("callbacks") or {}).values() if node is not None]
    optimizer = instantiate(cfg.optimizer)
    trainer: pl.Trainer | None = None

    def make_scheduler(opt: Any) -> Any:
        factory = instantiate(cfg.scheduler)
        if "total_steps" not in inspect.signature(factory).parameters:
            return factory(opt)  # e.g. a torch scheduler stepped once per epoch
        assert trainer is not None
        return {"scheduler": factory(opt, total_steps=trainer.estimated_stepping_batches), "interval": "step"}

    scheduler = make_scheduler if cfg.get("scheduler") else None
    lora_callback = LoRAFinetuneCallback(
        lora_config,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        loraplus_lr_ratio=cfg.get("loraplus_lr_ratio"),
        kernels=cfg.kernels,
    )
    trainer = instantiate(cfg.trainer, callbacks=[*callbacks, lora_callback, *extra_callbacks], logger=False)
    return trainer


def evaluate(
    trainer: pl.Trainer, module: pl.LightningModule, datamodule: pl.LightningDataModule, ckpt_path: str | None = None
) -> dict[str, float]:
    """Validation metrics on the held-out split, as plain floats (of ``ckpt_path``'s weights if given)."""
    results = trainer.validate(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    for metric in module.modules():  # states made under inference mode cannot be updated in training's loop
        if isinstance(metric, Metric):
            metric.reset()
    return {k: round(float(v), 6) for k, v in (results[0] if results else {}).items()}


def report(trainer: pl.Trainer, title: str, values: dict[str, float], metric: str) -> None:
    if trainer.is_global_zero:
        others = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if k != metric)
        log.info("%s: %.4f (%s)", title, values.get(metric, math.nan), others)


def trainable_counts(module: pl.LightningModule) -> dict[str, int]:
    summary = param_summary(module)
    return {"trainable": summary.trainable, "total": summary.total, "adapter": summary.adapter}


def summary_values(metrics: dict[str, Any]) -> dict[str, Any]:
    values = {f"before/{k}": v for k, v in metrics.get("before", {}).items()}
    values.update({f"final/{k}": v for k, v in metrics.get("after", {}).items()})
    values.update({f"params/{k}": v for k, v in metrics.get("params", {}).items()})
    for key in ("time_per_step_s", "peak_memory_mib", "train_time_s", "steps", *throughput.SUMMARY_KEYS.values()):
        if metrics.get(key) is not None:
            values[f"run/{key}"] = metrics[key]
    return values


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json`` in the run folder, written by rank 0 only, atomically."""
    if pl.utilities.rank_zero.rank_zero_only.rank != 0:
        return
    write_text_atomically(path, json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n")


__all__ = ["main", "train"]

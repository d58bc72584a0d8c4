"""Run naming from Hydra overrides, logger construction (W&B offline unless configured otherwise), and the
end of every job (``wandb.finish``) so that jobs of one multirun never share a W&B run."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf

from hydra_plugins.lora_lightning_launcher.gpu_pool import SWEEP_DIR_ENV
from lora_lightning.peft_format import CONFIG_NAME

log = logging.getLogger(__name__)

WANDB_MODES = ("online", "offline", "disabled", "dryrun", "run")
# Overrides that say where or how a run happens, not what it trains: left out of run names.
_NOT_IN_NAME = re.compile(
    r"(hydra|paths|logger|callbacks|launcher|sweep|export)(\..*)?|"
    r"trainer\.(fast_dev_run|limit_\w+|accelerator|devices|num_nodes|enable_\w+|log_every_n_steps|default_root_dir)|"
    r"data\.(num_workers|cache_dir|\w*_file)|task_name|tags|save_adapter|log_adapter_artifact|eval_before|print_config|debug"
)
_SHORT = {"lora.r": "r", "lora.alpha": "a", "lora.dropout": "d", "optimizer.lr": "lr", "seed": "seed"}
_FIRST = ("lora.r", "lora.alpha")
_GROUPS = frozenset({"model", "data", "lora", "optimizer", "scheduler", "trainer", "experiment"})


@dataclass(frozen=True)
class RunInfo:
    """Who this job is: its name (from the overrides), its W&B group (shared by a sweep's jobs), its folder."""

    name: str
    group: str | None
    output_dir: Path
    multirun: bool


def run_name(overrides: Sequence[str], job_num: Any = None, swept: Any = None) -> str:
    """``["lora.alpha=16", "lora.r=8"]`` -> ``"r8_a16"``; other overrides as ``key=value`` by their last key
    segment (group choices by their value). With ``swept`` (the keys a sweep varies) only those count;
    otherwise paths and settings that do not change what is trained are left out. Empty when nothing is
    left (then ``job<job_num>`` if a job number is given)."""
    swept = set(swept or ())
    parts: dict[str, str] = {}
    for override in overrides:
        key, _, value = str(override).lstrip("+~").partition("=")
        value = _short_number(value)
        if swept and key not in swept:
            continue
        if not swept and (not value or _NOT_IN_NAME.fullmatch(key) or "/" in value or os.sep in value):
            continue
        if key in _SHORT:
            parts[key] = f"{_SHORT[key]}{value}"
        elif key in _GROUPS:
            parts[key] = value  # a config group choice such as model=tiny_classifier
        else:
            parts[key] = f"{re.split(r'[./]', key)[-1]}={value}"
    ordered = [parts.pop(k) for k in _FIRST if k in parts] + list(parts.values())
    name = re.sub(r"[^\w.=+-]+", "-", "_".join(ordered)).strip("-")
    if not name and job_num is not None:
        return f"job{job_num}"
    return name


def _short_number(value: str) -> str:
    """Long floats (as Optuna samples them) to 3 significant digits: 0.00012897950480855554 -> 0.000129."""
    if len(value) <= 8:
        return value
    try:
        return f"{float(value):.3g}"
    except ValueError:
        return value


def swept_keys(sweeper_params: Any = None, argv: Sequence[str] | None = None) -> list[str]:
    """The keys a multirun varies: those of ``hydra.sweeper.params`` and those given on the command line
    with sweep syntax (``lora.r=4,8``, ``range(...)``, ``choice(...)``, ...)."""
    keys = [str(k) for k, v in (sweeper_params or {}).items() if _is_sweep(str(v))]
    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.lstrip("+~").partition("=")
        if sep and not arg.startswith("-") and _is_sweep(value) and key not in keys:
            keys.append(key)
    return keys


def _is_sweep(value: str) -> bool:
    if re.match(r"\s*(range|choice|interval|glob|tag)\(", value):
        return True
    depth, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def _subdir_name(overrides: Sequence[str], job_num: Any = None, sweeper_params: Any = None) -> str:
    """A job's folder name. A sweeper parameter with one value (``seed`` under ``sweep.seeds=1``) names nothing."""
    fixed = {str(k) for k, v in (sweeper_params or {}).items() if not _is_sweep(str(v))}
    kept = [o for o in overrides if str(o).lstrip("+~").partition("=")[0] not in fixed]
    return run_name(kept, job_num, swept_keys(sweeper_params))


def seed_values(seed: int | None, seeds: int) -> str:
    """The sweeper's value for ``seed`` under ``sweep.seeds``: ``42, 3`` -> ``"42,43,44"`` (one value: no sweep)."""
    if seeds < 1:
        raise ValueError(f"sweep.seeds={seeds}: must be at least 1")
    if seed is None:
        return "null" if seeds == 1 else ",".join(str(i) for i in range(seeds))
    return ",".join(str(seed + i) for i in range(seeds))


OmegaConf.register_new_resolver("run_name", _subdir_name, replace=True)
OmegaConf.register_new_resolver("seeds", seed_values, replace=True)


def run_info(cfg: DictConfig) -> RunInfo:
    """Name, group and folder of the current job (also outside Hydra, e.g. in tests)."""
    name, multirun, group = "", False, None
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
        multirun = hydra_cfg.mode == RunMode.MULTIRUN
        sweep_dir = os.environ.get(SWEEP_DIR_ENV) if not multirun else str(Path(hydra_cfg.runtime.output_dir).parent)
        if sweep_dir:  # every job of a sweep (also one the gpu_pool launcher started) is in the sweep's group
            group = f"{cfg.task_name}-{Path(sweep_dir).name}"
            name = _subdir_name(overrides, sweeper_params=OmegaConf.select(hydra_cfg, "sweeper.params"))
        else:
            name = run_name(overrides)
    name = name or f"r{cfg.lora.r}_a{cfg.lora.alpha:g}"
    return RunInfo(name=name, group=group, output_dir=Path(cfg.paths.output_dir), multirun=multirun)


def build_loggers(cfg: DictConfig, info: RunInfo) -> list[Logger]:
    """The loggers under ``cfg.logger`` (a mapping of name -> node); a W&B logger gets the run's name and
    group unless set, and an explicit mode (``offline`` unless configured otherwise)."""
    loggers: list[Logger] = []
    for key, node in (cfg.get("logger") or {}).items():
        if node is None:
            continue
        if issubclass(get_class(node._target_), WandbLogger):
            logger = instantiate(node, **_wandb_settings(node, info))
            # Lightning always passes anonymous=None to wandb.init, which W&B answers with a deprecation notice
            if logger._wandb_init.get("anonymous", "") is None:
                del logger._wandb_init["anonymous"]
            loggers.append(logger)
        else:
            loggers.append(instantiate(node))
        log.debug("logger %s: %s", key, type(loggers[-1]).__name__)
    return loggers


def _wandb_settings(node: DictConfig, info: RunInfo) -> dict[str, Any]:
    mode = node.get("mode") or os.environ.get("WANDB_MODE") or "offline"
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: must be one of {', '.join(WANDB_MODES)}")
    settings: dict[str, Any] = {"mode": mode}
    if not node.get("name"):
        settings["name"] = info.name
    if not node.get("group") and info.group:
        settings["group"] = info.group
    if node.get("offline"):
        raise ValueError("logger.wandb.offline=true changes the process environment; use logger.wandb.mode=offline")
    return settings


def log_config(loggers: Sequence[Logger], cfg: DictConfig, extra: dict[str, Any] | None = None) -> None:
    """Log the resolved config (from rank 0: `Logger.log_hyperparams` is rank-zero only) to every logger."""
    resolved = {str(k): _resolved(cfg, str(k)) for k in cfg if k != "hydra"}
    for logger in loggers:
        logger.log_hyperparams({**resolved, **(extra or {})})


def _resolved(cfg: DictConfig, key: str) -> Any:
    node = cfg._get_node(key)
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return cfg[key]


@rank_zero_only
def log_summary(loggers: Sequence[Logger], values: dict[str, Any]) -> None:
    """Final numbers: into W&B's run summary, and as one last metrics row for the other loggers."""
    numbers = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.experiment.summary.update(values)
        else:
            logger.log_metrics(numbers)
            logger.save()


@rank_zero_only
def log_adapter_artifact(
    loggers: Sequence[Logger], adapter_dir: Path, name: str, metrics: Mapping[str, Any], aliases: Sequence[str]
) -> None:
    """Upload (or, offline, stage for ``wandb sync``) the adapter folder as a W&B ``model`` artifact with
    ``aliases``; its metadata holds the LoRA config (``adapter_config.json``'s values, under ``lora``) and
    ``metrics``."""
    import wandb

    lora = json.loads((adapter_dir / CONFIG_NAME).read_text())
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            artifact = wandb.Artifact(
                name=re.sub(r"[^\w.-]+", "-", f"adapter-{name}"), type="model", metadata={"lora": lora, **metrics}
            )
            artifact.add_dir(str(adapter_dir))
            logger.experiment.log_artifact(artifact, aliases=list(aliases))


def artifact_aliases(metrics: Mapping[str, Any], validations: Sequence[Mapping[str, float]]) -> list[str]:
    """``latest`` for the run's adapter, and ``best`` too when its held-out metric (``metrics["after"]``) is at
    least as good as every other held-out evaluation of the run (before training and ``validations`` during it),
    as Lightning's W&B logger marks the best checkpoint."""
    name, mode = metrics.get("metric_name"), metrics.get("metric_mode")
    final = metrics.get("after", {}).get(name)
    if final is None or math.isnan(final):
        return ["latest"]
    seen = [v[name] for v in (metrics.get("before", {}), *validations) if name in v and not math.isnan(v[name])]
    optimum = max if mode == "max" else min
    return ["latest", "best"] if optimum([final, *seen]) == final else ["latest"]


def finish(failed: bool = False) -> None:
    """End the W&B run of this job, if one was started, so the next job of a multirun starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=1 if failed else 0)

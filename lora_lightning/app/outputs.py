"""What a run leaves for others: the adapter as PEFT's folder with its model card, and on request
(``export.merged=true``) the merged model as a transformers folder.

Every output names the base as transformers rebuilds it: ``base_model_name_or_path`` (a Hub id or a folder) and
the task's ``load_kwargs`` (``gguf_file`` of a GGUF base, ``num_labels`` of a classifier), so that
``PeftModel.from_pretrained(Auto*.from_pretrained(base, **load_kwargs), adapter_dir)`` gives the run's model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

from lora_lightning import save_adapter, save_merged, write_model_card
from lora_lightning.app.schema import ConfigError

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"


def save_run_outputs(
    trainer: pl.Trainer, module: pl.LightningModule, output_dir: Path, metrics: Mapping[str, Any], merged: bool
) -> dict[str, str]:
    """The adapter folder with its model card (``metrics`` in it) and, with ``merged``, the merged model, in the
    run folder ``output_dir``; returns their paths (``adapter_dir``, ``merged_dir``) for ``metrics.json``."""
    saved = {"adapter_dir": str(save_run_adapter(trainer, module, output_dir / ADAPTER_DIR))}
    if trainer.is_global_zero:
        write_run_card(output_dir / ADAPTER_DIR, module, metrics)
    if merged:
        saved["merged_dir"] = str(save_run_merged(trainer, module, output_dir / MERGED_DIR))
    return saved


def save_run_adapter(trainer: pl.Trainer, module: pl.LightningModule, adapter_dir: Path) -> Path:
    """The PEFT folder, written by global rank 0 with the task's ``task_type``. Every rank joins the gather of a
    sharded strategy (FSDP). Keys are relative to ``module.model``, the transformers model PEFT wraps."""
    state = trainer.strategy.lightning_module_state_dict()
    if trainer.is_global_zero:
        prefix = "model."
        save_adapter(
            module.model,
            adapter_dir,
            overwrite=True,
            base_model_name_or_path=getattr(module, "base_model_name_or_path", None),
            task_type=getattr(module, "task_type", None),
            state_dict={k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)},
        )
        log.info("adapter saved to %s (PEFT format: PeftModel.from_pretrained or load_adapter)", adapter_dir)
    return adapter_dir


def write_run_card(adapter_dir: Path, module: pl.LightningModule, metrics: Mapping[str, Any]) -> Path | None:
    """The adapter folder's ``README.md``: base model, LoRA config (read from the folder), the run's metrics and
    how to load it; a README the user wrote there is kept (`lora_lightning.write_model_card`)."""
    base = getattr(module, "base_model_name_or_path", None)
    return write_model_card(
        adapter_dir, base_model=base, metrics=metrics, task_type=getattr(module, "task_type", None),
        base_model_kwargs=getattr(module, "base_load_kwargs", None) if base else None,
    )  # fmt: skip


def card_metrics(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The held-out metrics before and after training, the steps and the trainable parameters, for the card
    and the W&B artifact (``summary``: the run's W&B summary values)."""
    kept = ("before/", "final/", "params/trainable", "run/steps", "run/train_time_s")
    return {key: value for key, value in summary.items() if key.startswith(kept)}


def check_merged_export(trainer: pl.Trainer) -> None:
    """``export.merged`` needs the whole model in the saving process: one device, or DDP's full replicas."""
    if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ConfigError(
            f"export.merged=true with trainer.strategy={type(trainer.strategy).__name__}: the merged model is "
            "written from one process that holds all its weights (one device or DDP); drop export.merged and run "
            "lora_lightning.save_merged after load_adapter on the unsharded model"
        )


def save_run_merged(trainer: pl.Trainer, module: pl.LightningModule, merged_dir: Path) -> Path:
    """The active adapter folded into a copy of the weights, as a transformers folder with the tokenizer
    (``AutoModel*.from_pretrained(merged_dir)``), written by global rank 0."""
    if trainer.is_global_zero:
        save_merged(module.model, merged_dir, tokenizer=getattr(module, "tokenizer", None), overwrite=True)
        log.info("merged model saved to %s (transformers folder: from_pretrained loads it)", merged_dir)
    return merged_dir

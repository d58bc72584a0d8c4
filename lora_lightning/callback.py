"""`LoRAFinetuneCallback`: turns any LightningModule into a LoRA fine-tune. Hook glue only: the work is done by
`inject.prepare_adapter`, `optim` and `checkpoint_io`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from typing_extensions import override

from lora_lightning.checkpoint_io import (
    check_checkpoint_config,
    check_checkpoint_dirs_writable,
    install_safe_checkpoint_io,
    make_checkpoints_adapter_only,
)
from lora_lightning.config import LoRAConfig, _is_positive_finite, is_adapter_name
from lora_lightning.fused import (
    WIRING_KEY,
    fold_gated_mlps,
    fused_wiring,
    install_fused_paths,
    remove_fused_paths,
    restore_fused_wiring,
)
from lora_lightning.inject import find_targets, prepare_adapter
from lora_lightning.kernels import KERNELS, apply_kernels, check_kernels
from lora_lightning.modules import shadow_method
from lora_lightning.optim import build_optimizer, keep_only_trainable_params
from lora_lightning.params import adapter_names, param_summary

if TYPE_CHECKING:  # jsonargparse (LightningCLI) reads these hints; importing lightning.pytorch.cli would import it
    from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
    from torch.optim import Optimizer


class LoRAFinetuneCallback(Callback):
    """Inject LoRA adapters at ``setup``, train only them, and checkpoint only them.

    Args:
        config: the adapters to inject. ``None`` trains adapters the module already has (e.g. from
            ``load_adapter``).
        optimizer: optional factory ``params -> Optimizer`` (``functools.partial``, a Hydra ``_partial_`` node, or
            in a LightningCLI YAML an optimizer's ``class_path`` and ``init_args``); when given, the callback builds
            the optimizer over the trainable parameters instead of the module's ``configure_optimizers``.
        lr_scheduler: optional factory ``optimizer -> LRScheduler`` (stepped once per epoch), or ``optimizer ->``
            a Lightning scheduler dict (e.g. ``{"scheduler": ..., "interval": "step"}``); used with ``optimizer``.
        adapter_name: the adapter to inject (or, with ``config=None``, the existing one) and train; the
            module's other adapters stay frozen.
        loraplus_lr_ratio: LoRA+: the ``B`` matrices learn at ``ratio`` times the learning rate of the rest
            (a separate param group); needs ``optimizer``. The LoRA+ paper suggests 2 to 16.
        kernels: ``"none"`` (default) or ``"liger"``: patch the Hugging Face model(s) inside the module with
            Liger-Kernel (`kernels.apply_kernels`; the extra ``kernels``) before the adapters go in.

    Injection happens in ``setup``, or right after ``configure_model`` when the module builds its
    layers there, so it always precedes checkpoint loading, the DDP/FSDP wrap and the optimizer.
    Checkpoints keep only adapter (and ``modules_to_save``) tensors plus the config under
    ``"lora_config"``, also for ``save_weights_only``. Loading stays strict for adapter tensors and
    tolerates the absent base weights. Whatever the module's optimizer was given, it ends up holding
    only trainable parameters. After injection the fused paths of `fused.install_fused_paths` go in (q/k/v and
    gated MLPs as single nodes where their structure fits; one info line says what was not fused); teardown takes
    them out. One Trainer takes one such callback. Every argument can be set from a LightningCLI YAML file
    (``trainer.callbacks``; the extra ``cli``), ``config`` as a mapping of `LoRAConfig` fields.
    """

    def __init__(
        self,
        config: LoRAConfig | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | Callable[[Optimizer], dict[str, Any]] | None = None,
        adapter_name: str = "default",
        loraplus_lr_ratio: float | None = None,
        kernels: Literal["none", "liger"] = "none",
    ) -> None:
        if config is not None and not isinstance(config, LoRAConfig):
            raise TypeError(
                f"LoRAFinetuneCallback(config=...) must be a LoRAConfig or None, got {type(config).__name__}; "
                "build one with LoRAConfig(r=8, ...) or LoRAConfig.from_dict(values)"
            )
        if lr_scheduler is not None and optimizer is None:
            raise ValueError("LoRAFinetuneCallback(lr_scheduler=...) needs optimizer=... too")
        if loraplus_lr_ratio is not None:
            if not _is_positive_finite(loraplus_lr_ratio):
                raise ValueError(
                    f"LoRAFinetuneCallback(loraplus_lr_ratio={loraplus_lr_ratio!r}) must be a positive number, e.g. 16"
                )
            if optimizer is None:
                raise ValueError(
                    "LoRAFinetuneCallback(loraplus_lr_ratio=...) needs optimizer=... (a factory) to build the "
                    "LoRA+ param groups"
                )
        if not is_adapter_name(adapter_name):
            raise ValueError(
                f"LoRAFinetuneCallback(adapter_name={adapter_name!r}) must be a non-empty name without dots"
            )
        for name, factory, called_with, example in (
            ("optimizer", optimizer, "the trainable parameters", "torch.optim.AdamW, lr=1e-4"),
            ("lr_scheduler", lr_scheduler, "the optimizer", "torch.optim.lr_scheduler.StepLR, step_size=1"),
        ):
            if factory is not None and not callable(factory):
                raise TypeError(
                    f"LoRAFinetuneCallback({name}=...) must be a factory called with {called_with}, got "
                    f"{type(factory).__name__}; e.g. functools.partial({example}) or a Hydra _partial_ node"
                )
        if kernels not in KERNELS:
            raise ValueError(f"LoRAFinetuneCallback(kernels={kernels!r}) must be 'none' (default) or 'liger'")
        self.config = config
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.adapter_name = adapter_name
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.kernels = kernels
        self._patched: set[str] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        _refuse_unsupported(trainer, self)
        check_kernels(self.kernels)
        install_safe_checkpoint_io(trainer)
        if is_overridden("configure_model", pl_module):
            self._patch(pl_module, "configure_model", self._prepare_after)
        else:
            self._prepare(pl_module)
        if self.optimizer is not None:
            build = functools.partial(
                build_optimizer, pl_module, self.optimizer, self.lr_scheduler, self.loraplus_lr_ratio
            )
            self._patch(pl_module, "configure_optimizers", lambda _: build)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep_only_trainable_params(trainer.optimizers, pl_module)
        fold_gated_mlps(pl_module)  # on the training device: a compiled MLP's custom op then folds nothing per call
        if trainer.is_global_zero:
            check_checkpoint_dirs_writable(trainer)
        summary = param_summary(pl_module)
        for logger in trainer.loggers:
            logger.log_hyperparams(
                {
                    "params/trainable": summary.trainable,
                    "params/total": summary.total,
                    "params/adapter": summary.adapter,
                }
            )

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        check_checkpoint_config(checkpoint, self.config)
        restore_fused_wiring(pl_module, checkpoint.get(WIRING_KEY, {}))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[WIRING_KEY] = fused_wiring(pl_module)  # a resumed run's first step fuses as this run does

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_fused_paths(pl_module)
        for name in self._patched:
            delattr(pl_module, name)  # the class's own method shows through again
        self._patched.clear()

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        if self.kernels != "none":
            injecting = self.config is not None and self.adapter_name not in adapter_names(pl_module)
            adapting = find_targets(pl_module, self.config, self.adapter_name) if injecting else []
            apply_kernels(pl_module, self.kernels, adapting)
        report = prepare_adapter(pl_module, self.config, self.adapter_name)
        # one line: the injection report (which already counts the parameters), or the counts where none was made
        rank_zero_info(f"LoRAFinetuneCallback: {report if report is not None else param_summary(pl_module)}")
        make_checkpoints_adapter_only(pl_module, self.config)
        install_fused_paths(pl_module)

    def _prepare_after(self, original: Callable[[], None]) -> Callable[[], None]:
        def configure_model() -> None:
            original()
            self._prepare(original.__self__)  # type: ignore[attr-defined]

        return configure_model

    def _patch(self, module: nn.Module, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
        """Shadow ``module.name`` with ``make(original_bound_method)`` until teardown."""
        if name not in self._patched:
            shadow_method(module, name, make)
            self._patched.add(name)


def _refuse_unsupported(trainer: pl.Trainer, callback: LoRAFinetuneCallback) -> None:
    """DeepSpeed, and a second `LoRAFinetuneCallback` in the same Trainer (each would patch the same hooks, and
    only one adapter would train), fail before anything changes."""
    if type(trainer.strategy).__name__.startswith("DeepSpeed"):
        raise RuntimeError("LoRAFinetuneCallback does not support DeepSpeed; use DDP or FSDP")
    others = [c for c in trainer.callbacks if isinstance(c, LoRAFinetuneCallback) and c is not callback]
    if others:
        names = [c.adapter_name for c in (callback, *others)]
        raise RuntimeError(
            f"this Trainer has {len(others) + 1} LoRAFinetuneCallbacks (adapters {names}); one Trainer takes one. "
            "To train several adapters, fit them one after another, each with its own "
            "LoRAFinetuneCallback(config, adapter_name=...) and Trainer"
        )

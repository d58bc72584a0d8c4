"""`LoRAFinetuneCallback`: turns any LightningModule into a LoRA fine-tune. Hook glue only."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn
from torch.optim import Optimizer
from typing_extensions import override

from lora_lightning.adapters import set_active_adapter
from lora_lightning.checkpoint_io import SafeCheckpointIO, check_checkpoint_dirs_writable
from lora_lightning.config import LoRAConfig, _is_positive_finite, is_adapter_name
from lora_lightning.inject import inject_lora
from lora_lightning.names import canonical_name
from lora_lightning.params import (
    adapter_names,
    adapter_state_dict,
    lora_layers,
    mark_only_adapters_trainable,
    param_summary,
)

CHECKPOINT_KEY = "lora_config"


class LoRAFinetuneCallback(Callback):
    """Inject LoRA adapters at ``setup``, train only them, and checkpoint only them.

    Args:
        config: the adapters to inject. ``None`` trains adapters the module already has (e.g. from
            ``load_adapter``).
        optimizer: optional factory ``params -> Optimizer`` (a Hydra ``_partial_`` fits); when given,
            the callback builds the optimizer over the trainable parameters instead of the module's
            ``configure_optimizers``.
        lr_scheduler: optional factory ``optimizer -> LRScheduler`` (or a Lightning scheduler dict),
            used with ``optimizer``.
        adapter_name: the adapter to inject (or, with ``config=None``, the existing one) and train; the
            module's other adapters stay frozen.
        loraplus_lr_ratio: LoRA+: the ``B`` matrices learn at ``ratio`` times the learning rate of the rest
            (a separate param group); needs ``optimizer``. The LoRA+ paper suggests 2 to 16.

    Injection happens in ``setup``, or right after ``configure_model`` when the module builds its
    layers there, so it always precedes checkpoint loading, the DDP/FSDP wrap and the optimizer.
    Checkpoints keep only adapter (and ``modules_to_save``) tensors plus the config under
    ``"lora_config"``, also for ``save_weights_only``. Loading stays strict for adapter tensors and
    tolerates the absent base weights. Whatever the module's optimizer was given, it ends up holding
    only trainable parameters.
    """

    def __init__(
        self,
        config: LoRAConfig | None = None,
        optimizer: Callable[[list[nn.Parameter]], Optimizer] | None = None,
        lr_scheduler: Callable[[Optimizer], Any] | None = None,
        adapter_name: str = "default",
        loraplus_lr_ratio: float | None = None,
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
        self.config = config
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.adapter_name = adapter_name
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self._patched: set[str] = set()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if type(trainer.strategy).__name__.startswith("DeepSpeed"):
            raise RuntimeError("LoRAFinetuneCallback does not support DeepSpeed; use DDP or FSDP")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # Lightning's default, not a custom one
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        if is_overridden("configure_model", pl_module):
            self._patch(pl_module, "configure_model", self._inject_after)
        else:
            self._prepare(pl_module)
        if self.optimizer is not None:
            build = functools.partial(self._configure_optimizers, pl_module)
            self._patch(pl_module, "configure_optimizers", lambda _: build)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keep_only_trainable_params(trainer.optimizers, pl_module)
        if trainer.is_global_zero:
            check_checkpoint_dirs_writable(trainer)
        summary = param_summary(pl_module)
        rank_zero_info(f"LoRAFinetuneCallback: {summary}")
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
        saved = checkpoint.get(CHECKPOINT_KEY)
        if self.config is not None and saved is not None and LoRAConfig.from_dict(saved) != self.config:
            raise ValueError(
                f"the checkpoint was trained with {LoRAConfig.from_dict(saved)}, this callback has {self.config}; "
                "resume with the same LoRAConfig"
            )

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name in self._patched:
            delattr(pl_module, name)  # the class's own method shows through again
        self._patched.clear()

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        """Inject (unless the module already has adapters), freeze the base, relax loading for base keys."""
        name = self.adapter_name
        if next(lora_layers(pl_module, name), None) is None:
            if self.config is None:
                raise ValueError(
                    f"LoRAFinetuneCallback(config=None) needs a module that already has adapter {name!r}; "
                    f"it has {adapter_names(pl_module)}"
                )
            _refuse_sharded(pl_module)
            rank_zero_info(f"LoRAFinetuneCallback: {inject_lora(pl_module, self.config, name)}")
        else:
            _check_existing_adapters(pl_module, self.config, name)
            set_active_adapter(pl_module, name)
            mark_only_adapters_trainable(pl_module, name)
        make_checkpoints_adapter_only(pl_module, self.config)

    def _inject_after(self, original: Callable[[], None]) -> Callable[[], None]:
        def configure_model() -> None:
            original()
            self._prepare(original.__self__)  # type: ignore[attr-defined]

        return configure_model

    def _configure_optimizers(self, pl_module: pl.LightningModule) -> Any:
        assert self.optimizer is not None
        trainable = [p for p in pl_module.parameters() if p.requires_grad]
        if self.loraplus_lr_ratio is None:
            optimizer = self.optimizer(trainable)
        else:
            optimizer = _loraplus_optimizer(self.optimizer, trainable, pl_module, self.loraplus_lr_ratio)
        if self.lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.lr_scheduler(optimizer)}

    def _patch(self, module: nn.Module, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
        """Shadow ``module.name`` with ``make(original_bound_method)`` until teardown."""
        if name not in self._patched:
            _shadow_method(module, name, make)
            self._patched.add(name)


def _check_existing_adapters(module: nn.Module, config: LoRAConfig | None, name: str) -> None:
    """A module that already has the adapter (a second fit, or ``load_adapter``) trains it as it is; a config
    that disagrees with it would be silently ignored, so it is refused."""
    if config is None:
        return
    for layer_name, layer in lora_layers(module, name):
        found, wanted = layer.spec(name), config.spec_for(canonical_name(layer_name))
        if found != wanted:
            raise ValueError(
                f"the module already has adapter {name!r}, with {found} on {layer_name!r}, but "
                f"LoRAFinetuneCallback(config=...) asks for {wanted}; pass config=None to train the existing "
                "adapter, or give the new one another adapter_name"
            )


def _refuse_sharded(module: nn.Module) -> None:
    """Adapters injected after FSDP2's ``fully_shard`` would be plain tensors that no rank shares: every rank
    would silently train its own. Injection must come first."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in module.parameters()):
        raise RuntimeError(
            "LoRAFinetuneCallback: the module's parameters are already sharded (fully_shard ran in configure_model), "
            "so adapters injected now would not be sharded or synchronised; call inject_lora(self, config) in "
            "configure_model before fully_shard and pass LoRAFinetuneCallback(None) (docs/multi_gpu.md)"
        )


def _loraplus_optimizer(
    factory: Callable[[list[Any]], Optimizer], params: list[nn.Parameter], module: nn.Module, ratio: float
) -> Optimizer:
    """LoRA+: the factory's optimizer over two param groups, the ``B`` matrices at ``ratio`` times its lr."""
    b_ids = {id(layer.factors(n)[1]) for _, layer in lora_layers(module) for n in layer.adapter_names}
    groups = [
        {"params": [p for p in params if id(p) not in b_ids]},
        {"params": [p for p in params if id(p) in b_ids]},
    ]
    optimizer = factory(groups)
    optimizer.param_groups[1]["lr"] *= ratio
    return optimizer


def make_checkpoints_adapter_only(module: pl.LightningModule, config: LoRAConfig | None) -> None:
    """From now on, every checkpoint of ``module`` (full or ``weights_only``) keeps only adapter and
    ``modules_to_save`` tensors plus ``config``; loading one tolerates the absent base weights but still
    fails strictly on missing adapter tensors. Lightning calls the module's ``on_save_checkpoint`` for
    every checkpoint, unlike callback hooks, which ``weights_only`` saves skip.

    Keys are compared by `canonical_name`: under FSDP1 or activation checkpointing, module names carry
    wrapper segments that the full state dicts Lightning saves and loads do not. Sharded (distributed)
    checkpoints are refused: loading one needs every tensor of the model. ``ModelParallelStrategy`` (FSDP2)
    loads a full checkpoint tensor by tensor, without ``load_state_dict`` post-hooks, so there
    ``strict_loading`` is turned off and a missing adapter tensor goes unnoticed."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = module._trainer.strategy if module._trainer is not None else None
    # Both settings are private in Lightning 2.6: FSDPStrategy(state_dict_type=...) and
    # ModelParallelStrategy(save_distributed_checkpoint=...).
    if (isinstance(strategy, FSDPStrategy) and getattr(strategy, "_state_dict_type", "full") != "full") or (
        isinstance(strategy, ModelParallelStrategy) and getattr(strategy, "_save_distributed_checkpoint", False)
    ):
        raise ValueError(
            f"{type(strategy).__name__} is set to save sharded (distributed) checkpoints, which cannot be loaded "
            "without the base weights that LoRA checkpoints leave out; use FSDPStrategy(state_dict_type='full') "
            "or ModelParallelStrategy(save_distributed_checkpoint=False): rank 0 then writes the adapter tensors, "
            "gathered"
        )
    if isinstance(strategy, ModelParallelStrategy):
        module.strict_loading = False
    if getattr(module, "_lora_checkpoints", False):
        return
    module._lora_checkpoints = True
    module.register_load_state_dict_post_hook(_tolerate_missing_base_keys)

    def prune_after(original: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def on_save_checkpoint(checkpoint: dict[str, Any]) -> None:
            original(checkpoint)
            keep = {canonical_name(k) for k in adapter_state_dict(module)}
            if keep:  # after merge_lora/unload_lora the module is a plain model again
                state = checkpoint["state_dict"]
                checkpoint["state_dict"] = {k: v for k, v in state.items() if canonical_name(k) in keep}
                if config is not None:
                    checkpoint[CHECKPOINT_KEY] = config.to_dict()

        return on_save_checkpoint

    _shadow_method(module, "on_save_checkpoint", prune_after)


def _shadow_method(module: nn.Module, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
    """Set an instance attribute ``name`` that wraps the bound method; ``delattr`` undoes it."""
    original = getattr(module, name)
    object.__setattr__(module, name, functools.update_wrapper(make(original), original))


def keep_only_trainable_params(optimizers: list[Optimizer], model: nn.Module) -> None:
    """Drop frozen parameters from every param group in place (groups stay, so LR schedulers still line up)."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) in trainable]
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    if optimizers and not held:
        raise ValueError(
            "the optimizer from configure_optimizers holds none of the LoRA parameters; pass "
            "self.parameters() to it, or give LoRAFinetuneCallback(optimizer=...) a factory"
        )
    if optimizers and trainable - held:
        rank_zero_warn(f"{len(trainable - held)} trainable LoRA parameters are in no optimizer and will not train")


def _tolerate_missing_base_keys(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: an adapter-only checkpoint lacks the frozen base weights, which is
    fine; missing adapter tensors stay in ``missing_keys`` and still fail a strict load. Names are compared
    by `canonical_name` (FSDP1 reports missing keys with wrapper segments)."""
    required = {canonical_name(k) for k in adapter_state_dict(module)}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if canonical_name(k) in required]

"""Lightning checkpoints of a LoRA fine-tune: adapter-only, safe to load, atomic to write."""

from __future__ import annotations

import os
import pickle
import re
import stat
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.model_helpers import _restricted_classmethod
from torch import nn
from typing_extensions import Self, override

from lora_lightning.config import AdapterSpec, LoRAConfig
from lora_lightning.files import reworded, write_file_atomically
from lora_lightning.inject import find_targets, inject_lora
from lora_lightning.modules import canonical_name, shadow_method
from lora_lightning.params import adapter_names, adapter_state_dict, lora_layers
from lora_lightning.peft_format import CONFIG_NAME

CHECKPOINT_KEY = "lora_config"  # the LoRAConfig a checkpoint was trained with, as a dict (when the callback had one)
ADAPTERS_KEY = "lora_adapters"  # every adapter the checkpoint holds: {adapter: {layer: AdapterSpec as a dict}}


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's `TorchCheckpointIO` with safe defaults; `LoRAFinetuneCallback` installs it in place of the
    default one (pass it as ``Trainer(plugins=[SafeCheckpointIO()])`` to use it without the callback).

    - Loading unpickles with ``weights_only=True`` unless the caller passes ``weights_only=False`` explicitly
      (``trainer.fit(..., weights_only=False)``, for a file you trust): a checkpoint from a stranger cannot run
      code, on any torch version and whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says.
    - Local saves go to a temporary file next to the target that replaces it in one ``os.replace`` after an
      fsync: a process killed mid-save leaves the previous file intact (and a ``.<name>.tmp-*`` file that the
      next successful save of that name deletes). Lightning's own save stages in the system temp folder and,
      when that is another file system, copies over the target in place.
    - Unreadable files, and paths that are not regular files (a FIFO would block the reader forever), fail with
      an error that names the file; a failed write (a full disk) raises the operating system's error, with the file
      named.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        try:
            write_file_atomically(Path(path), lambda file: torch.save(checkpoint, file))
        except OSError as err:
            message = (
                f"cannot write checkpoint {str(path)!r}: {err}; choose a writable folder with free space "
                "(ModelCheckpoint(dirpath=...))"
            )
            raise reworded(err, message) from err

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        weights_only = True if weights_only is None else weights_only
        if _is_local_file_protocol(path) and Path(path).is_dir():
            hint = (
                "; it is a PEFT adapter folder: load it with load_adapter(model, path) and train on with "
                "LoRAFinetuneCallback(config=None)"
                if (Path(path) / CONFIG_NAME).is_file()
                else ""
            )
            raise IsADirectoryError(f"checkpoint {str(path)!r} is a folder, not a Lightning checkpoint file{hint}")
        if _is_local_file_protocol(path) and Path(path).exists() and not Path(path).is_file():
            kind = "a FIFO" if stat.S_ISFIFO(os.stat(path).st_mode) else "not a regular file"
            raise OSError(f"checkpoint {str(path)!r} is {kind}; give the path of a checkpoint file")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
            reason = f"it holds a pickled {found.group(1)}, which could run code" if found else "it is corrupted"
            raise pickle.UnpicklingError(
                f"checkpoint {str(path)!r} was refused by the weights-only loader: {reason}. Only for a file you "
                "trust, pass weights_only=False (e.g. trainer.fit(model, ckpt_path=..., weights_only=False))"
            ) from err
        except FileNotFoundError:
            raise
        except (RuntimeError, EOFError, OSError) as err:  # a truncated zip fails in seek() as EINVAL, say
            raise type(err)(
                f"checkpoint {str(path)!r} is not a readable torch checkpoint (truncated or corrupted?): "
                f"{err or 'it ended early'}"
            ) from err


def check_checkpoint_dirs_writable(trainer: pl.Trainer) -> None:
    """Fail before the first step, not at the first save, when a `ModelCheckpoint` folder cannot be written. The
    probe is a file created and deleted in the folder, or in its nearest existing parent: nothing is left."""
    for callback in trainer.checkpoint_callbacks:
        folder = getattr(callback, "dirpath", None) if isinstance(callback, ModelCheckpoint) else None
        if folder is None or not _is_local_file_protocol(folder):
            continue
        nearest = next(p for p in (Path(folder), *Path(folder).parents) if p.exists())
        try:
            if not nearest.is_dir():
                raise NotADirectoryError(f"{str(nearest)!r} is a file")
            probe = nearest / f".write-test-{os.urandom(6).hex()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise type(err)(
                f"ModelCheckpoint(dirpath={str(folder)!r}) is not writable ({err}); choose a writable folder "
                "(ModelCheckpoint(dirpath=...) or Trainer(default_root_dir=...)) before training starts"
            ) from err


def install_safe_checkpoint_io(trainer: pl.Trainer) -> None:
    """Put `SafeCheckpointIO` in place of Lightning's default checkpoint IO (a custom one is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = SafeCheckpointIO()


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
            prune_to_adapters(checkpoint, module, config)

        return on_save_checkpoint

    def check_before(original: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            check_checkpoint_adapters(checkpoint, module)
            original(checkpoint)

        return on_load_checkpoint

    shadow_method(module, "on_save_checkpoint", prune_after)
    shadow_method(module, "on_load_checkpoint", check_before)  # Lightning calls it before it loads the weights


def prune_to_adapters(checkpoint: dict[str, Any], module: nn.Module, config: LoRAConfig | None) -> None:
    """Keep only ``module``'s adapter and ``modules_to_save`` tensors in ``checkpoint``, record the hyperparameters
    of every adapter of every layer (`ADAPTERS_KEY`) and ``config``. A module without adapters (after
    ``merge_lora``/``unload_lora``) keeps its whole state."""
    keep = {canonical_name(k) for k in adapter_state_dict(module)}
    if keep:
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if canonical_name(k) in keep}
        checkpoint[ADAPTERS_KEY] = {name: _adapter_specs(module, name) for name in adapter_names(module)}
        if config is not None:
            checkpoint[CHECKPOINT_KEY] = config.to_dict()


def check_checkpoint_adapters(checkpoint: dict[str, Any], module: nn.Module) -> None:
    """Refuse to resume a checkpoint whose adapters were trained with other hyperparameters than ``module``'s
    adapters of the same name have on the same layers: their tensors would load, and train on with, say, the wrong
    scaling. (Other ranks or layers fail the strict load of the tensors.) Checkpoints written before the record
    existed pass."""
    _trained_with(checkpoint)  # refused before the weights load, if this version cannot read it
    recorded = checkpoint.get(ADAPTERS_KEY)
    if not isinstance(recorded, dict):
        return
    known = {f.name for f in fields(AdapterSpec)}
    for adapter, layers in recorded.items():
        unknown = sorted({key for spec in layers.values() for key in spec} - known)
        if unknown:
            raise ValueError(
                f"the checkpoint's {ADAPTERS_KEY!r} gives adapter {adapter!r} fields {unknown} that this version of "
                "lora-lightning does not know (a newer version wrote it?); resume it with that version"
            )
        mine = _adapter_specs(module, adapter)
        differ = sorted(n for n in set(layers) & set(mine) if layers[n]["r"] == mine[n]["r"] and layers[n] != mine[n])
        if differ:
            raise ValueError(
                f"the checkpoint's adapter {adapter!r} was trained with other hyperparameters on {len(differ)} "
                f"layer(s), e.g. {differ[0]!r}: {AdapterSpec(**layers[differ[0]])} in the checkpoint, "
                f"{AdapterSpec(**mine[differ[0]])} in the module; resume with the same LoRAConfig (or, with "
                "LoRAFinetuneCallback(None), an adapter loaded with those hyperparameters)"
            )


def check_checkpoint_config(checkpoint: dict[str, Any], config: LoRAConfig | None) -> None:
    """Refuse to resume a checkpoint trained with another `LoRAConfig` than ``config``."""
    trained_with = _trained_with(checkpoint)
    if config is not None and trained_with is not None and trained_with != config:
        raise ValueError(
            f"the checkpoint was trained with {trained_with}, this callback has {config}; resume with the same "
            "LoRAConfig"
        )


def _trained_with(checkpoint: dict[str, Any]) -> LoRAConfig | None:
    """The checkpoint's `CHECKPOINT_KEY`, if it has one."""
    saved = checkpoint.get(CHECKPOINT_KEY)
    if saved is None:
        return None
    try:
        return LoRAConfig.from_dict(saved)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"the checkpoint's {CHECKPOINT_KEY!r} cannot be read by this version of lora-lightning (a newer "
            f"version wrote it?): {err}"
        ) from None


def _adapter_specs(module: nn.Module, adapter: str) -> dict[str, dict[str, Any]]:
    return {canonical_name(n): asdict(layer.spec(adapter)) for n, layer in lora_layers(module, adapter)}


def _tolerate_missing_base_keys(module: nn.Module, incompatible: Any) -> None:
    """``load_state_dict`` post-hook: an adapter-only checkpoint lacks the frozen base weights, which is
    fine; missing adapter tensors stay in ``missing_keys`` and still fail a strict load. Names are compared
    by `canonical_name` (FSDP1 reports missing keys with wrapper segments)."""
    required = {canonical_name(k) for k in adapter_state_dict(module)}
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if canonical_name(k) in required]


def inject_from_checkpoint(module: pl.LightningModule, checkpoint: dict[str, Any]) -> list[str]:
    """Give a freshly built ``module`` the adapters that an adapter-only checkpoint of it records (`ADAPTERS_KEY`:
    every adapter's hyperparameters per layer; ``modules_to_save`` from `CHECKPOINT_KEY`), as the callback
    injected them, so that the checkpoint's weights load strictly: the absent base weights are tolerated, a missing
    adapter tensor still fails. Adapters the module already has are kept (their hyperparameters are checked); of
    those injected, the last one recorded becomes active (`set_active_adapter` picks another). A checkpoint
    without the record (a full one) changes nothing. Everything is checked before the module changes. Returns the
    names of the adapters injected."""
    recorded = checkpoint.get(ADAPTERS_KEY)
    if not isinstance(recorded, dict) or not recorded:
        return []
    check_checkpoint_adapters(checkpoint, module)
    trained_with = _trained_with(checkpoint)
    saved = trained_with.modules_to_save if trained_with is not None and len(recorded) == 1 else None
    have = set(adapter_names(module))
    configs = {name: _recorded_config(layers, saved) for name, layers in recorded.items() if name not in have}
    for name, config in configs.items():  # every adapter fits before any goes in
        absent = sorted(set(recorded[name]) - set(find_targets(module, config, name)))
        if absent:
            raise ValueError(
                f"the checkpoint's adapter {name!r} is on {len(absent)} layer(s) that this "
                f"{type(module).__name__} does not have (e.g. {absent[0]!r}); load it into the module it was "
                "trained as, built with the same arguments"
            )
    for name, config in configs.items():
        inject_lora(module, config, name)
    make_checkpoints_adapter_only(module, trained_with)
    return list(configs)


def _recorded_config(layers: dict[str, dict[str, Any]], modules_to_save: list[str] | None) -> LoRAConfig:
    """The `LoRAConfig` that injects exactly ``layers`` (``{layer: AdapterSpec as a dict}``) with their specs."""
    specs = {name: AdapterSpec(**values) for name, values in layers.items()}
    shared = {(s.dropout, s.use_rslora, s.use_dora, s.init) for s in specs.values()}
    if len(shared) > 1:
        raise ValueError(
            f"the checkpoint's {ADAPTERS_KEY!r} gives one adapter layers with different dropout, rslora, dora or "
            f"init {sorted(shared)}, which no LoRAConfig describes"
        )
    ((dropout, use_rslora, use_dora, init),) = shared
    r = Counter(s.r for s in specs.values()).most_common(1)[0][0]
    alpha = Counter(s.alpha for s in specs.values()).most_common(1)[0][0]
    exactly = {name: "^" + re.escape(name) for name in specs}  # a pattern key matches a name or a dotted suffix
    return LoRAConfig(
        r=r,
        alpha=alpha,
        dropout=dropout,
        target_modules="|".join(re.escape(name) for name in specs),  # a regex matches whole names
        use_rslora=use_rslora,
        modules_to_save=modules_to_save,
        use_dora=use_dora,
        init=init,
        rank_pattern={exactly[n]: s.r for n, s in specs.items() if s.r != r},
        alpha_pattern={exactly[n]: s.alpha for n, s in specs.items() if s.alpha != alpha},
    )


class LoRACheckpointMixin:
    """Mix into a LightningModule (``class MyModule(LoRACheckpointMixin, pl.LightningModule)``) so that the module
    loads its adapter-only checkpoints without the callback: ``MyModule.load_from_checkpoint(path)`` and
    ``trainer.validate/test/predict(module, ckpt_path=path)`` inject the recorded adapters
    (`inject_from_checkpoint`) before the weights load. ``load_from_checkpoint`` unpickles weights-only unless
    given ``weights_only=False`` (for a file you trust)."""

    @_restricted_classmethod  # Lightning's: refused on an instance, whose result would be dropped
    def load_from_checkpoint(
        cls,
        checkpoint_path: _PATH,
        map_location: Any = None,
        hparams_file: _PATH | None = None,
        strict: bool | None = None,
        weights_only: bool | None = None,
        **kwargs: Any,
    ) -> Self:
        weights_only = True if weights_only is None else weights_only
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict, weights_only, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        inject_from_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)

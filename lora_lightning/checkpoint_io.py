"""Lightning checkpoint files that are safe to load and atomic to write."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lora_lightning.io import CONFIG_NAME, fsync_path, remove_stale_staging


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
    - Unreadable files fail with an error that names the file.
    """

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")
        try:
            with open(staging, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(staging, path)
            fsync_path(path.parent)
            remove_stale_staging(path)
        finally:
            staging.unlink(missing_ok=True)

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

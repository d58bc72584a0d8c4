"""Writes that the operating system fails: a file size limit reached in the middle of the tensors (the kernel
refuses the write, as on a full disk), and a full disk reported when the data is synced (what network file
systems do). Each fault meets each kind of write: an adapter folder, a checkpoint through `SafeCheckpointIO`, and
one through Lightning's ``trainer.save_checkpoint``.

Promise under test: the error is the operating system's own `OSError`, saying which file could not be written
and what to do, and the previous adapter or checkpoint is left byte for byte, with nothing else beside it.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, SafeCheckpointIO, save_adapter
from tests.helpers.adapters import adapted_mlp, folder_bytes, leftovers
from tests.helpers.models import MLPModule, classification_data, make_trainer

resource = pytest.importorskip("resource")  # POSIX


@dataclass(frozen=True)
class Fault:
    inject: Callable[[pytest.MonkeyPatch], contextlib.AbstractContextManager]
    message: str  # what the operating system's error says


@contextlib.contextmanager
def file_size_limit(monkeypatch: pytest.MonkeyPatch, limit: int = 1024) -> Iterator[None]:
    """``ulimit -f``: a write past ``limit`` bytes fails in the kernel with EFBIG (Python ignores SIGXFSZ)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


@contextlib.contextmanager
def disk_full_at_sync(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", fsync)
        yield


FAULTS = {
    "file_size_limit_mid_write": Fault(file_size_limit, "File too large"),
    "disk_full_at_sync": Fault(disk_full_at_sync, "No space left on device"),
}


@dataclass(frozen=True)
class Write:
    prepare: Callable[[Path], tuple[Path, Callable[[], object]]]  # -> (the target, a write that overwrites it)
    message: str  # how the error names the target ({path})


def adapter_folder(tmp: Path) -> tuple[Path, Callable[[], object]]:
    path = save_adapter(adapted_mlp(), tmp / "adapter")
    return path, lambda: save_adapter(adapted_mlp(noise_seed=9), path, overwrite=True)


def checkpoint_file(tmp: Path) -> tuple[Path, Callable[[], object]]:
    path = tmp / "ckpt" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1000)}}, path)
    return path, lambda: SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, path)


def lightning_checkpoint(tmp: Path) -> tuple[Path, Callable[[], object]]:
    trainer = make_trainer(tmp / "run", max_steps=1, callbacks=[LoRAFinetuneCallback(LoRAConfig(r=16, alpha=8))])
    trainer.fit(MLPModule(), classification_data())
    path = tmp / "ckpt" / "last.ckpt"
    trainer.save_checkpoint(path)
    return path, lambda: trainer.save_checkpoint(path)


WRITES = {
    "adapter": Write(adapter_folder, "save_adapter: cannot write '{path}': "),
    "checkpoint": Write(checkpoint_file, "cannot write checkpoint '{path}': "),
    "trainer_save_checkpoint": Write(lightning_checkpoint, "cannot write checkpoint '{path}': "),
}


def contents(path: Path) -> dict[str, bytes] | bytes:
    return folder_bytes(path) if path.is_dir() else path.read_bytes()


@pytest.mark.parametrize("write_name", WRITES)
@pytest.mark.parametrize("fault_name", FAULTS)
def test_a_failed_write_says_what_the_system_said_and_keeps_the_previous_one(
    tmp_path, monkeypatch, fault_name, write_name
):
    """The operating system's error, naming the file and saying what to do; the previous adapter or checkpoint
    byte for byte; nothing left beside it; the next write works."""
    fault, write = FAULTS[fault_name], WRITES[write_name]
    path, overwrite = write.prepare(tmp_path)
    before = contents(path)
    with pytest.raises(OSError) as err, fault.inject(monkeypatch):
        overwrite()
    message = str(err.value)
    assert write.message.format(path=path) in message and fault.message in message, message
    assert "choose a writable folder with free space" in message
    assert contents(path) == before
    assert leftovers(path.parent) == [], "a staging file or folder was left behind"
    overwrite()  # the next write, with the fault gone, works
    assert leftovers(path.parent) == []

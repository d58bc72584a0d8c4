"""Atomic writes: a file or a folder is replaced whole, or not at all.

Everything is written into a staging sibling (``.<name>.tmp-<random>``), flushed to disk, and moved over the
target in one step: ``os.replace`` for a file, ``renameat2(RENAME_EXCHANGE)`` for a folder on Linux. A process
killed mid-write leaves the previous target intact and a staging sibling that the next successful write of that
name deletes.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` with a binary file that replaces ``path`` once it is written and synced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(path)
    try:
        with open(staging, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(staging, path)
        fsync_path(path.parent)
        remove_stale_staging(path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_file_atomically(path, lambda file: file.write(text.encode()))


def write_folder_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write`` with an empty folder that then replaces the folder ``path``, so readers see the old or the
    new folder, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(path)
    staging.mkdir()  # not tempfile.mkdtemp: its folders are always 0700, this one honours the umask
    try:
        write(staging)
        for file in staging.iterdir():
            fsync_path(file)
        if path.exists():
            _exchange(staging, path)  # staging now holds the old folder
            shutil.rmtree(staging)
        else:
            os.rename(staging, path)
        fsync_path(path.parent)
        remove_stale_staging(path)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def remove_stale_staging(path: Path) -> None:
    """Delete what writers killed mid-save left next to ``path`` (``.<name>.tmp-*``), after a save succeeded."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _staging(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere, two renames."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    old = a.with_name(a.name + ".old")
    os.rename(b, old)
    os.rename(a, b)
    os.rename(old, a)

"""Atomic writes: a file or a folder is replaced whole, or not at all, also with several writers at once.

A writer builds the new file or folder in a staging sibling (``.<name>.tmp-<random>``) that it holds an
exclusive ``flock`` on while it lives, syncs it, and moves it over the target: ``os.replace`` for a file,
``renameat2(RENAME_EXCHANGE)`` for a folder (Linux, local file systems). Where that exchange is missing (macOS,
NFS, other kernels) a folder takes two renames, the old folder to a backup (``.<name>.tmp-<random>.old``) and the
new one into place; a process killed between them leaves the target missing, and the next write or locked read
of it puts the backup back.

Making a staging entry, the swap, and deleting leftovers all run under a ``flock`` of the parent folder, and
`read_files` reads under a shared one: writers of one target take turns at the swap, the last to swap wins
whole, and a locked reader sees the old or the new target, never none and never a mix. A leftover is deleted
only once its writer is gone (its lock is free). On a network mount a folder's ``flock`` is seen only on the
host that took it (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # Windows: no locks; writes stay atomic, leftovers of other writers are kept
    fcntl = None

_BACKUP = ".old"


def write_file_atomically(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Call ``write`` with a binary file that replaces ``path`` once it is written and synced. A failure of the
    operating system underneath (a full disk, a file size limit) is raised as its own `OSError`, even when
    ``write``'s code wrapped it in another exception. A symlink at ``path`` is replaced, as Lightning's own save
    does (its ``last.ckpt`` may link to a top-k checkpoint that must stay)."""
    path = Path(path)
    file = _staging_file(path)
    staging = Path(file.name)
    try:
        with file:  # closing it releases the staging lock, after the swap
            _raise_os_errors(write, file)
            file.flush()
            os.fsync(file.fileno())
            with _locked(path.parent):
                os.replace(staging, path)
                fsync_path(path.parent)
                _remove_leftovers(path)
    finally:
        staging.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    write_file_atomically(path, lambda file: file.write(text.encode()))


def write_folder_atomically(path: Path, write: Callable[[Path], None], keep: Iterable[str] = ()) -> None:
    """Call ``write`` with an empty folder that then replaces the folder ``path`` (through a symlink: its target);
    the files named in ``keep`` that the old folder has and ``write`` did not write are carried over in the same
    step."""
    path = _resolved(path)
    staging, fd = _staging_folder(path)
    try:
        _raise_os_errors(write, staging)
        for file in staging.iterdir():
            fsync_path(file)
        with _locked(path.parent):
            _restore_backup(path)
            for name in keep:
                if (path / name).is_file() and not (staging / name).exists():
                    shutil.copy2(path / name, staging / name)
                    fsync_path(staging / name)
            old = _swap(staging, path)
            fsync_path(path.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)  # the new folder is in place; a leftover is swept later
            _remove_leftovers(path)
    finally:
        os.close(fd)
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def read_files(folder: Path, limits: Mapping[str, int | None]) -> dict[str, bytes]:
    """The bytes of the regular files of ``folder`` named in ``limits``, read together under a shared lock (a
    missing or non-regular file is left out). A folder that an interrupted two-rename swap left missing is put
    back first. Raises `NotADirectoryError` when ``folder`` is not a folder, and `OSError` (``EFBIG``) for a
    file larger than its limit in bytes."""
    folder = _resolved(folder)
    with _locked(folder.parent, shared=True):
        if os.path.lexists(folder):
            return _read_folder(folder, limits)
    with _locked(folder.parent):  # maybe a swap killed midway: restoring it takes the exclusive lock
        _restore_backup(folder)
        return _read_folder(folder, limits)


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def reworded(err: OSError, message: str) -> OSError:
    """``err`` as the same `OSError` type and ``errno``, with ``message`` as its text."""
    new = type(err)(message)
    new.errno = err.errno  # (with only errno set, str(new) stays the message)
    return new


# ------------------------------------------------------------------------------------------------ internals


def _resolved(path: Path) -> Path:
    """A folder reached through a symlink is the folder written or read: the link stays a link."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _raise_os_errors(write: Callable, arg: object) -> None:
    """Run ``write(arg)``; an `OSError` in the exception's chain (torch.save reports a failed write as a
    RuntimeError, "unexpected pos ...") is raised instead."""
    try:
        write(arg)
    except Exception as err:
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        if cause is None or cause is err:
            raise
        raise cause from err


def _staging_file(path: Path) -> BinaryIO:
    """A new staging file next to ``path``, locked; made under the parent's lock, so that no clean-up sees it
    before it is locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        file = open(_staging_name(path), "xb")  # noqa: SIM115 (the caller closes it); the umask applies
        _flock(file.fileno(), "exclusive")
    return file


def _staging_folder(path: Path) -> tuple[Path, int]:
    """A new staging folder next to ``path`` and a descriptor that holds its lock (as `_staging_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent):
        staging = _staging_name(path)
        staging.mkdir()  # not tempfile.mkdtemp: its folders are always 0700, this one honours the umask
        fd = os.open(staging, os.O_RDONLY)
        _flock(fd, "exclusive")
    return staging, fd


def _staging_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.urandom(6).hex()}")


def _swap(staging: Path, path: Path) -> Path | None:
    """Put ``staging`` at ``path``; returns where the old folder went (to be deleted), if there was one."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return None
    if _exchange(staging, path):
        return staging
    backup = staging.with_name(staging.name + _BACKUP)
    os.rename(path, backup)  # from here to the next rename there is no folder at path: see _restore_backup
    os.rename(staging, path)
    return backup


def _exchange(a: Path, b: Path) -> bool:
    """Swap two folders in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is unavailable."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


def _restore_backup(path: Path) -> None:
    """Under the parent's lock: a target missing with a backup beside it is a two-rename swap that was killed
    in between; the backup (the complete old folder) goes back."""
    if os.path.lexists(path):
        return
    backups = sorted(_leftovers(path, backups=True), key=lambda p: p.lstat().st_mtime_ns)
    if backups:
        os.rename(backups[-1], path)
        fsync_path(path.parent)


def _remove_leftovers(path: Path) -> None:
    """Under the parent's lock, with ``path`` in place: delete the staging entries whose writer is gone and
    the backups of swaps that were killed after their second rename."""
    for stale in _leftovers(path):
        if stale.name.endswith(_BACKUP) or not _in_use(stale):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


def _leftovers(path: Path, backups: bool = False) -> Iterator[Path]:
    for entry in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        if not backups or entry.name.endswith(_BACKUP):
            yield entry


def _in_use(entry: Path) -> bool:
    """Whether a writer holds ``entry``'s lock (or it cannot be told: then it is kept)."""
    try:
        fd = os.open(entry, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    except OSError:  # a symlink is no writer's entry: delete it; gone or unreadable: leave it
        return not os.path.islink(entry)
    try:
        return not _flock(fd, "exclusive", wait=False)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _locked(folder: Path, shared: bool = False) -> Iterator[None]:
    """Hold a ``flock`` on ``folder`` (exclusive unless ``shared``) for the block; no lock where the folder
    cannot be opened or locked."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        _flock(fd, "shared" if shared else "exclusive")
        yield
    finally:
        os.close(fd)


def _flock(fd: int, mode: str, wait: bool = True) -> bool:
    """Lock ``fd``; False when the lock is held elsewhere (``wait=False``) or locks are not supported."""
    if fcntl is None:
        return False
    operation = fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, operation if wait else operation | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError: held elsewhere; EOPNOTSUPP/ENOLCK/EBADF: no locks here
        return False
    return True


def _read_folder(folder: Path, limits: Mapping[str, int | None]) -> dict[str, bytes]:
    if not folder.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(folder))
    found = {name: _read_regular(folder / name, limit) for name, limit in limits.items()}
    return {name: data for name, data in found.items() if data is not None}


def _read_regular(file: Path, limit: int | None) -> bytes | None:
    """The bytes of ``file``, or None unless it is a regular file (a FIFO is opened without blocking)."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as handle:
        if limit is not None and info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit:,} bytes ({info.st_size:,})", str(file))
        return handle.read()

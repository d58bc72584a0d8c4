"""Several writers at once, for real: processes (tests/workers/concurrent_saves.py) and threads save adapters to
one folder while a reader loads it, with and without ``RENAME_EXCHANGE``; and a swap without it killed between
its two renames.

Promise under test: concurrent saves never lose the folder and none fails; the last completed save wins whole; a
reader through `load_adapter` sees a whole old or new adapter, never none and never half of each, and never one
older than it saw before; a swap killed midway is put back by the next load or save.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from lora_lightning import load_adapter, save_adapter
from lora_lightning.files import _staging_folder
from tests.helpers.adapters import folder_bytes, leftovers
from tests.helpers.processes import Worker
from tests.workers.concurrent_saves import adapter, base, seed_of

pytestmark = pytest.mark.multiprocess

WRITERS, ROUNDS = 3, 25


def check_reads(seen: list[int]) -> None:
    """Every read was one whole save, and no writer's saves were seen going back in time."""
    assert seen, "the reader never read"
    assert -1 not in seen, "a read mixed the config of one save with the tensors of another"
    for writer in range(1, WRITERS + 1):
        rounds = [s for s in seen if s // 1000 == writer]
        assert rounds == sorted(rounds), f"writer {writer}'s saves were seen out of order: {rounds}"


def check_final(path: Path) -> None:
    """The folder holds the last save of one of the writers, and the next save replaces it and clears up."""
    model = base()
    load_adapter(model, path)
    assert seed_of(model) in {w * 1000 + ROUNDS for w in range(1, WRITERS + 1)}
    save_adapter(adapter(9999), path, overwrite=True)
    model = base()
    load_adapter(model, path)
    assert seed_of(model) == 9999
    assert leftovers(path.parent) == [], "a staging folder or backup was left behind"


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["rename_exchange", "two_renames"])
def test_processes_saving_one_folder_at_once_never_lose_it(tmp_path, exchange):
    """3 writer processes x 25 saves and a reader process. Without RENAME_EXCHANGE the folder is briefly absent
    during each swap (the reader counts how often it saw that); `load_adapter` waits for the swap instead."""
    path = tmp_path / "adapter"
    save_adapter(adapter(1), path)
    flags = [] if exchange else ["--no-exchange"]
    stop = tmp_path / "stop"
    reader = Worker(tmp_path, "concurrent_saves", "read", path, stop, *flags)
    reader.wait_for("READY")
    try:
        command = ("concurrent_saves", "write", path)
        writers = [Worker(tmp_path, *command, w, ROUNDS, *flags) for w in range(1, 1 + WRITERS)]
        for writer in writers:
            lines = writer.finish(timeout=180)
            assert lines[-1] == "DONE 0", [line for line in lines if line.startswith("FAILED")][:3]
    finally:
        stop.touch()  # the reader stops also when a writer failed
    report = json.loads(reader.wait_for("SEEN").removeprefix("SEEN "))
    assert reader.proc.wait(timeout=60) == 0
    assert report["error_count"] == 0, report["errors"]
    check_reads(report["seen"])
    if exchange:
        assert report["gone"] == 0, "the folder was missing during a swap"
    check_final(path)


def test_threads_saving_one_folder_at_once_never_lose_it(tmp_path):
    """3 writer threads x 25 saves and a reader thread in one process, with the same checks."""
    path = tmp_path / "adapter"
    save_adapter(adapter(1), path)
    failures: list[BaseException] = []
    seen: list[int] = []
    done = threading.Event()

    def write(writer: int) -> None:
        for round_ in range(ROUNDS):
            try:
                save_adapter(adapter(writer * 1000 + round_ + 1), path, overwrite=True)
            except Exception as err:
                failures.append(err)

    def read() -> None:
        while not done.is_set():
            model = base()
            try:
                load_adapter(model, path)
            except Exception as err:
                failures.append(err)
                continue
            seen.append(seed_of(model))

    reader = threading.Thread(target=read)
    writers = [threading.Thread(target=write, args=(w,)) for w in range(1, 1 + WRITERS)]
    reader.start()
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    done.set()
    reader.join()
    assert failures == []
    check_reads(seen)
    check_final(path)


@pytest.mark.parametrize("recovered_by", ["load", "save"])
def test_a_swap_without_rename_exchange_killed_between_its_renames_is_put_back(tmp_path, recovered_by):
    """Killed after the old folder went to its backup name and before the new one took its place: the folder is
    missing (what any reader that does not go through the library sees), and the next load or save puts the
    complete old folder back first."""
    path = tmp_path / "adapter"
    save_adapter(adapter(1), path)
    before = folder_bytes(path)
    worker = Worker(tmp_path, "concurrent_saves", "stop-between-renames", path, 2)
    backup = Path(worker.kill_at("PAUSED").split(" ", 1)[1])
    assert not path.exists() and folder_bytes(backup) == before

    model = base()
    if recovered_by == "load":
        load_adapter(model, path)
        assert seed_of(model) == 1 and folder_bytes(path) == before
    else:
        save_adapter(adapter(3), path)  # no overwrite=True needed: as far as the caller knew, nothing was there
        load_adapter(model, path)
        assert seed_of(model) == 3
    assert not backup.exists()
    if recovered_by == "save":
        assert leftovers(tmp_path) == [], "the dead writer's staging folder stayed"


def test_a_save_deletes_leftovers_of_dead_writers_only(tmp_path):
    """The clean-up after a save takes only staging entries whose writer is gone (their lock is free): another
    writer's folder in progress survives it (before, every ``.<name>.tmp-*`` was deleted)."""
    path = tmp_path / "adapter"
    save_adapter(adapter(1), path)
    live, fd = _staging_folder(path)  # a writer in the middle of its save: it holds the lock
    (live / "half").write_bytes(b"in progress")
    dead = path.with_name(f".{path.name}.tmp-deadbeef0000")  # what a killed writer left: no one holds its lock
    dead.mkdir()
    save_adapter(adapter(2), path, overwrite=True)
    assert (live / "half").read_bytes() == b"in progress" and not dead.exists()
    os.close(fd)  # the writer died
    save_adapter(adapter(3), path, overwrite=True)
    assert not live.exists() and leftovers(tmp_path) == []

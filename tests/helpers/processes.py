"""Running the subprocess workers of ``tests/workers`` as modules, so that they import ``tests.helpers`` like the
tests do."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "tests" / "workers"


def worker_command(name: str, *args: object) -> list[str]:
    """``python -m tests.workers.<name> ARGS``."""
    return [sys.executable, "-m", f"tests.workers.{name}", *map(str, args)]


def worker_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``, ``drop`` removed, ``extra`` added."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class Worker:
    """``python -m tests.workers.NAME ARGS`` with its stdout read line by line (stderr goes to a file)."""

    def __init__(self, tmp_path: Path, name: str, *args: object) -> None:
        self.log = tmp_path / f"worker-{os.urandom(3).hex()}.err"
        env = worker_env(WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
        with open(self.log, "w") as stderr:
            command = worker_command(name, *args)
            self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)

    def wait_for(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()
                pytest.fail(f"no {prefix!r} from the worker in {timeout} s; it said {self.seen}")
            if line is None:
                self.proc.wait()
                pytest.fail(f"worker exited ({self.proc.returncode}) before {prefix!r}: {self.seen}\n{self.stderr()}")
            self.seen.append(line)
            if line.startswith(prefix):
                return line

    def kill_at(self, prefix: str) -> str:
        """Wait for a line starting with ``prefix``, then SIGKILL the worker (it is paused right there)."""
        line = self.wait_for(prefix)
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL
        return line

    def finish(self, timeout: float = 60) -> list[str]:
        line = self.wait_for("DONE", timeout)
        assert self.proc.wait(timeout=timeout) == 0, self.stderr()
        return [*self.seen[:-1], line]

    def stderr(self) -> str:
        return self.log.read_text()[-3000:]

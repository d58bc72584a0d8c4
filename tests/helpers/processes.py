"""Running the subprocess workers of ``tests/workers`` as modules, so that they import ``tests.helpers`` like the
tests do."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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

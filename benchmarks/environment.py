"""The environment record of a measurement: versions, device, git state and the measured library's sources."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a measurement ran, for the JSON reports."""
    import transformers

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        device_name = f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
        memory = None
    commit, dirty = _git_state()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "device_memory_bytes": memory,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "lightning": _version("lightning") or _version("pytorch_lightning"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": commit,
        "git_dirty": dirty,
        "lora_lightning_sha256": library_digest(),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def library_digest() -> str | None:
    """Hash of the Python sources of the ``lora_lightning`` that ``import`` finds (without importing it), to tie
    figures to the code measured even with uncommitted changes."""
    spec = importlib.util.find_spec("lora_lightning")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package.rglob("*.py"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)

"""What several workers share: stopping at a chosen point to be killed there, and importing the library's
torch-only modules without Lightning."""

from __future__ import annotations

import importlib.util
import sys
import time
import types


def pause(tag: str) -> None:
    """Announce where we are and wait to be killed (the test sends SIGKILL as soon as it reads the line)."""
    print(tag, flush=True)
    time.sleep(600)
    sys.exit("never killed")


def without_lightning() -> None:
    """Register the bare ``lora_lightning`` package, so that its submodules import without running
    lora_lightning/__init__.py, which imports Lightning (~6 s of a 2-core machine per process). Saving and loading
    adapters need only torch; the modules under test (``lora_lightning.io``, ``lora_lightning.files`` and what they
    import) are the very same files. Call it before importing anything from ``lora_lightning``."""
    if "lora_lightning" not in sys.modules:
        package = types.ModuleType("lora_lightning")
        package.__path__ = list(importlib.util.find_spec("lora_lightning").submodule_search_locations)
        sys.modules["lora_lightning"] = package

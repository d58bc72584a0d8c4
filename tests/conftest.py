"""Test-session settings, applied before any test module imports W&B or the Hugging Face hub. Shared builders
live in ``tests/helpers`` (imported as ``tests.helpers.<module>``); subprocess workers in ``tests/workers``."""

from __future__ import annotations

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub

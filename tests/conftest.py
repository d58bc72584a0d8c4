"""Test-session settings, applied before any test module imports W&B or the Hugging Face hub. Shared builders
live in ``tests/helpers`` (imported as ``tests.helpers.<module>``); subprocess workers in ``tests/workers``."""

from __future__ import annotations

import os
import sys

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from a clean Dynamo cache: compiles of earlier tests (the same model code, other instances)
    count towards Dynamo's recompile limit, past which it runs a compiled model eagerly without a word, and a test of
    a compiled path would pass on the eager one."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()

"""App tests run the app in this process, and the app quiets some loggers (`lora_lightning.app.console.quiet`)
for the rest of its process: each app test takes those filters off again, so later tests see every record."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lora_lightning.app import console


@pytest.fixture(autouse=True)
def _loggers_as_they_were() -> Iterator[None]:
    yield
    console.unquiet()

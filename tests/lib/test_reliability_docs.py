"""docs/reliability.md stays true: its tables are what the test tables give now, and every file it names exists."""

from __future__ import annotations

import re

import pytest

from tests.helpers.processes import ROOT
from tests.helpers.reliability_tables import DOC, render


def test_the_generated_tables_are_current():
    pytest.importorskip("hydra")  # the app's table comes from tests/app
    text = DOC.read_text()
    assert render(text) == text, "docs/reliability.md is stale: python -m tests.helpers.reliability_tables"


def test_every_file_it_names_exists():
    text = DOC.read_text()
    named = set(re.findall(r"[\w/]+\.(?:py|md|yaml)\b", text)) - {"reliability.md"}
    paths = {name: [p for p in (ROOT / name, *ROOT.glob(f"**/{name}")) if p.exists()] for name in named}
    assert named and all(paths.values()), sorted(name for name, found in paths.items() if not found)
    assert "xfail" not in text

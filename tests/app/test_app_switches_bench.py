"""benchmarks.app_switches, the measurement of the app's switches: one real CPU row through scripts/train.py,
a CUDA-only row skipped on CPU, and the report's table."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import app_switches


@pytest.mark.slow
def test_one_cpu_row_and_a_skipped_cuda_row(tmp_path) -> None:
    assert app_switches.main(["--tiny", "--out", str(tmp_path), "--rows", "fp32", "Liger"]) == 0
    report = json.loads((tmp_path / "app_switches.json").read_text())
    (measured, liger) = report["rows"]
    assert measured["status"] == "ok" and measured["steps"] == 30 and measured["tokens_per_sec"] > 0
    assert liger["status"] == ("skipped" if not torch.cuda.is_available() else liger["status"])
    assert report["machine"]["device"].startswith("CPU")
    table = (tmp_path / "app_switches.md").read_text()
    assert "| tiny: fp32 (baseline) |" in table and "skipped: needs CUDA" in table

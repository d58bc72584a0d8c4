"""CPU smoke tests of the benchmark rows this branch adds: ``ours-layer`` (the per-layer path) beside ``ours`` (the
fused paths), and the long-context measurement (benchmarks.max_context), on the tiny shape. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.benchmark as bench
import benchmarks.max_context as max_context
from benchmarks.benchmark_report import JSON_NAME

pytest.importorskip("transformers")


@pytest.mark.slow
def test_ours_and_the_per_layer_path_train_the_same_adapters(tmp_path: Path) -> None:
    argv = ["--shape=tiny", "--steps=2", "--warmup=1", "--isolation=none", f"--out={tmp_path}", "--device=cpu"]
    assert bench.main([*argv, "--configs", "ours:eager", "ours-layer:eager", "frozen:eager"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / JSON_NAME).read_text())["rows"]}
    ours, layer = rows["ours:eager"], rows["ours-layer:eager"]
    assert ours["ok"] and layer["ok"] and ours["kernels"] == "none"
    assert ours["trainable_params"] == layer["trainable_params"] > 0
    assert ours["loss_first"] == pytest.approx(layer["loss_first"], rel=1e-3)  # bf16, the same function
    # After two fused AdamW steps, the same training: 1e-3 apart when the MLP kept its first factors.
    assert ours["loss_last"] == pytest.approx(layer["loss_last"], rel=3e-4)
    assert f"{ours['loss_last']:.4f} |" in (tmp_path / "benchmark.md").read_text()
    assert ours["adapter_file_bytes"] == layer["adapter_file_bytes"]


@pytest.mark.slow
def test_max_context_writes_every_length_and_the_line(tmp_path: Path) -> None:
    argv = ["--shape=tiny", "--device=cpu", "--steps=1", "--lengths", "16", "32", "48", f"--out={tmp_path}"]
    assert max_context.main([*argv, "--rows", "ours:eager:gc", "--long-steps=1"]) == 0
    report = json.loads((tmp_path / "max_context.json").read_text())
    (record,) = report["rows"]
    assert record["ok"] and [p["tokens"] for p in record["points"]] == [16, 32, 48]
    assert all(p["fits"] and p["step_ms"] > 0 for p in record["points"])
    assert [p["cold"] for p in record["points"]] == [False, True, True]  # one step past the first length: cold
    assert record["fit"] is None  # no peak memory on CPU: no line, nothing made up
    assert "| ours:eager:gc | 32 | " in (tmp_path / "max_context.md").read_text()
    assert "(cold)" in (tmp_path / "max_context.md").read_text()


def test_the_line_through_the_peaks_and_its_crossing() -> None:
    gib = 2**30
    points = [
        {"tokens": 1000, "fits": True, "peak_memory_bytes": 20 * gib},
        {"tokens": 3000, "fits": True, "peak_memory_bytes": 30 * gib},
    ]
    line = max_context.fit_line([*points, {"tokens": 9000, "fits": False}], 140 * gib)
    assert line["intercept_gib"] == pytest.approx(15.0)
    assert line["extrapolated_max_tokens"] == 25000


def test_long_context_rows_must_checkpoint() -> None:
    with pytest.raises(ValueError, match="gradient checkpointing"):
        max_context.measure("ours:eager", "tiny", [16], 1, 10.0, "cpu")

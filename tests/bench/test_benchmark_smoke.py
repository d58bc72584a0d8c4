"""CPU smoke test of the training-step benchmark (benchmarks.benchmark) on the tiny shape: the outputs are
written and their fields are sane.

No timing assertions: only that times are positive, parameter counts match between our LoRA and PEFT's,
and adapter files are about as large as the raw tensors they hold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import benchmarks.benchmark as bench
from benchmarks.benchmark_report import JSON_NAME, MARKDOWN_NAME, merge_reports
from benchmarks.rows import all_rows, parse_row, select_rows

pytest.importorskip("transformers")
pytest.importorskip("peft")

SMOKE_ROWS = ["ours:eager", "peft:eager", "frozen:eager", "full:eager"]
# safetensors adds a JSON header (names, dtypes, shapes, offsets) of a few hundred bytes per tensor.
HEADER_ALLOWANCE = 16 * 1024


def expected_lora_params(model: dict[str, int], r: int) -> int:
    hidden, inter = model["hidden_size"], model["intermediate_size"]
    kv = hidden // model["num_attention_heads"] * model["num_key_value_heads"]
    shapes = [(hidden, hidden), (hidden, kv), (hidden, kv), (hidden, hidden), (hidden, inter), (hidden, inter)]
    shapes.append((inter, hidden))
    return model["num_hidden_layers"] * sum(r * (n_in + n_out) for n_in, n_out in shapes)


def test_row_names_select_and_parse() -> None:
    rows = all_rows()
    names = [r.name for r in rows]
    # modes x checkpointing x (LoRA x dropout + frozen + full), and the Liger rows: checkpointing x 3
    assert len(names) == len(set(names)) == 2 * 2 * (4 * 2 + 2) + 2 * 3
    assert all(parse_row(n).name == n for n in names)
    assert len(select_rows(["ours:*"])) == 8 + 2
    assert parse_row("ours:eager:gc:liger").floor.name == "frozen:eager:gc:liger"
    assert [r.name for r in select_rows(["peft:eager,frozen:eager"])] == ["frozen:eager", "peft:eager"]
    assert parse_row("ours:compile:gc:drop0.05").floor.name == "frozen:compile:gc"
    with pytest.raises(ValueError, match="match no row"):
        select_rows(["ours:jit"])


@pytest.mark.slow
def test_tiny_benchmark_writes_sane_json_and_markdown(tmp_path: Path) -> None:
    argv = ["--shape=tiny", "--steps=2", "--warmup=1", "--isolation=none", f"--out={tmp_path}", "--device=cpu"]
    assert bench.main([*argv, "--configs", *SMOKE_ROWS]) == 0

    report = json.loads((tmp_path / JSON_NAME).read_text())
    env, settings = report["environment"], report["settings"]
    assert env["torch"] == torch.__version__
    assert env["transformers"] and env["peft"] and env["lightning"] and env["device"].startswith("CPU")
    assert "git_commit" in env
    rows = {r["name"]: r for r in report["rows"]}
    assert sorted(rows) == sorted(SMOKE_ROWS)

    for row in rows.values():
        assert row["ok"], row["error"]
        assert len(row["step_ms"]) == 2 and all(t > 0 for t in row["step_ms"])
        assert row["median_step_ms"] > 0 and row["tokens_per_s"] > 0 and row["first_step_s"] > 0
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"])
        assert row["floor"] == "frozen:eager" and row["step_ratio_to_floor"] > 0
        assert row["peak_memory_bytes"] is None  # CPU rows sharing one process: not measured, not made up
        assert row["lora_lightning_sha256"] == env["lora_lightning_sha256"]
    assert rows["frozen:eager"]["step_ratio_to_floor"] == 1.0

    ours, peft, frozen, full = (rows[n] for n in ("ours:eager", "peft:eager", "frozen:eager", "full:eager"))
    n_lora = expected_lora_params(settings["model"], settings["r"])
    assert ours["trainable_params"] == peft["trainable_params"] == n_lora
    assert frozen["trainable_params"] == 0 and frozen["optimizer"] == "none" and frozen["input_embeddings_require_grad"]
    assert full["trainable_params"] == full["total_params"] > n_lora
    # Ours keeps adapters in the base dtype (bf16); PEFT's defaults autocast them to fp32.
    assert ours["trainable_dtypes"] == ["bfloat16"] and ours["trainable_bytes"] == 2 * n_lora
    assert peft["trainable_dtypes"] == ["float32"] and peft["trainable_bytes"] == 4 * n_lora
    for row in (ours, peft):
        raw = row["trainable_bytes"]
        assert raw <= row["adapter_file_bytes"] <= raw + HEADER_ALLOWANCE
        assert 2 * raw <= row["optimizer_state_bytes"] <= 2 * raw + HEADER_ALLOWANCE  # exp_avg, exp_avg_sq, step
        assert row["trainable_plus_optimizer_bytes"] == raw + row["optimizer_state_bytes"]
    assert frozen["adapter_file_bytes"] is None and full["adapter_file_bytes"] is None

    markdown = (tmp_path / MARKDOWN_NAME).read_text()
    assert f"torch {torch.__version__}" in markdown and "x floor" in markdown
    assert all(f"| {name} |" in markdown for name in SMOKE_ROWS)


@pytest.mark.slow
def test_row_in_its_own_process_with_profile(tmp_path: Path) -> None:
    args = bench.parse_args(["--shape=tiny", "--steps=1", "--warmup=1", "--device=cpu", f"--profile={tmp_path}"])
    # The frozen base: the cheapest row to import (no peft, no lora_lightning); adapters are checked above.
    row = bench.run_row_in_subprocess(parse_row("frozen:eager"), bench.settings_from_args(args), timeout_s=300)
    assert row["ok"], row["error"]
    assert row["median_step_ms"] > 0 and row["tokens_per_s"] > 0 and row["input_embeddings_require_grad"]
    assert row["peak_memory_kind"] == "cpu_peak_rss_growth"
    assert row["peak_memory_bytes"] is None or row["peak_memory_bytes"] > 0
    assert "aten::" in (tmp_path / "profile_frozen_eager.txt").read_text()


def test_merge_recomputes_floor_ratios(tmp_path: Path) -> None:
    def report(rows: dict[str, float]) -> dict:
        records = [
            {"name": name, "ok": True, "median_step_ms": ms, "peak_memory_bytes": int(ms)} for name, ms in rows.items()
        ]
        env = {"device": "cpu", "torch": "x", "git_commit": None, "lora_lightning_sha256": "s", "timestamp": "t"}
        return {"environment": env, "settings": {"shape": "tiny"}, "rows": records}

    files = [tmp_path / "a.json", tmp_path / "b.json"]
    files[0].write_text(json.dumps(report({"ours:eager": 30.0})))
    files[1].write_text(json.dumps(report({"frozen:eager": 20.0})))
    merged = merge_reports(files)
    assert [r["name"] for r in merged["rows"]] == ["frozen:eager", "ours:eager"]
    assert merged["rows"][1]["step_ratio_to_floor"] == 1.5 and merged["rows"][1]["memory_ratio_to_floor"] == 1.5
    assert len(merged["environment"]["merged_from"]) == 2


def test_the_overhead_shape_measures_the_frameworks_time_around_tiny_kernels(tmp_path: Path) -> None:
    """The `overhead` shape: Llama-3.2-1B's 16 layers with tensors so small that a step is the framework's own time.
    Every row runs and is timed; which is faster is what the measurement is for, not a test."""
    argv = ["--shape=overhead", "--steps=2", "--warmup=1", "--isolation=none", f"--out={tmp_path}", "--device=cpu"]
    assert bench.main([*argv, "--configs", "frozen:eager", "ours:eager", "ours-layer:eager"]) == 0
    report = json.loads((tmp_path / JSON_NAME).read_text())
    assert report["settings"]["model"]["num_hidden_layers"] == 16 and report["settings"]["dtype"] == "fp32"
    assert [row["name"] for row in report["rows"]] == ["frozen:eager", "ours:eager", "ours-layer:eager"]
    assert all(row["ok"] and row["median_step_ms"] > 0 for row in report["rows"])

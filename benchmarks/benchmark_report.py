"""The training-step benchmark's report: floor ratios, runs merged into one table, JSON and Markdown."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.rows import all_rows, parse_row
from benchmarks.shapes import TARGET_MODULES

JSON_NAME = "benchmark.json"
MARKDOWN_NAME = "benchmark.md"


def add_floor_ratios(records: list[dict[str, Any]]) -> None:
    """Step time and peak memory of each row over those of the frozen base with the same mode and checkpointing."""
    by_name = {r["name"]: r for r in records}
    for record in records:
        floor_name = parse_row(record["name"]).floor.name
        floor = by_name.get(floor_name)
        record["floor"] = floor_name
        usable = record["ok"] and floor is not None and floor["ok"]
        record["step_ratio_to_floor"] = record["median_step_ms"] / floor["median_step_ms"] if usable else None
        memory, floor_memory = (record.get("peak_memory_bytes"), floor.get("peak_memory_bytes")) if usable else (0, 0)
        record["memory_ratio_to_floor"] = memory / floor_memory if memory and floor_memory else None


def merge_reports(files: Sequence[Path]) -> dict[str, Any]:
    """One report of the rows of several runs with the same settings, software and device (a later file's row
    replaces an earlier one of the same name); floor ratios are recomputed over the merged rows."""
    reports = [json.loads(Path(f).read_text()) for f in files]
    first = reports[0]
    same_env = ("device", "torch", "cuda", "transformers", "peft")
    same_settings = ("shape", "steps", "warmup", "device", "dtype", "batch_size", "seq_len", "r", "alpha", "lr")
    for file, other in zip(files[1:], reports[1:], strict=True):
        differ = [k for k in same_env if other["environment"].get(k) != first["environment"].get(k)]
        differ += [k for k in same_settings if other["settings"].get(k) != first["settings"].get(k)]
        if differ:
            raise ValueError(f"--merge: {file} differs from {files[0]} in {differ}; only like runs can share a table")
    rows = {r["name"]: r for report in reports for r in report["rows"]}
    records = [rows[row.name] for row in all_rows() if row.name in rows]
    add_floor_ratios(records)
    sources = [
        {key: report["environment"].get(key) for key in ("timestamp", "git_commit", "lora_lightning_sha256")}
        | {"file": str(file), "rows": [r["name"] for r in report["rows"]]}
        for file, report in zip(files, reports, strict=True)
    ]
    return {**first, "environment": {**first["environment"], "merged_from": sources}, "rows": records}


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / MARKDOWN_NAME).write_text(render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    env, settings, model = report["environment"], report["settings"], report["settings"]["model"]
    commit = env["git_commit"][:12] if env["git_commit"] else "no commit"
    if env["git_dirty"]:
        commit += " (uncommitted changes)"
    versions = (
        f"torch {env['torch']}"
        + (f" (CUDA {env['cuda']})" if env["cuda"] else "")
        + f", transformers {env['transformers']}, peft {env['peft']}, lightning {env['lightning']}"
    )
    if env["device_type"] == "cuda":
        memory_note = "`torch.cuda.max_memory_allocated` (weights included)"
    elif settings["isolation"] == "process":
        memory_note = (
            "growth of the row process's peak RSS from before the model is built (rough: includes lazily loaded "
            "libraries, Python and compiler overhead)"
        )
    else:
        memory_note = "not measured on CPU when rows share one process (use `--isolation process`)"
    isolation = "each row in its own process" if settings["isolation"] == "process" else "all rows in one process"
    lines = [
        f"# LoRA training-step benchmark: `{settings['shape']}` shape",
        "",
        f"- **device**: {env['device']}",
        f"- **versions**: {versions}, Python {env['python']}",
        f"- **commit**: {commit}; lora_lightning sources sha256 {env['lora_lightning_sha256']}; {env['timestamp']}",
        *[
            f"- **merged run** {i}: {src['file']} (sources sha256 {src['lora_lightning_sha256']}, {src['timestamp']}): "
            + ", ".join(src["rows"])
            for i, src in enumerate(env.get("merged_from", []), 1)
        ],
        f"- **model**: Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']}/{model['num_key_value_heads']} heads, intermediate "
        f"{model['intermediate_size']}, vocab {model['vocab_size']}, {settings['dtype']}, sdpa, random init; "
        f"batch {settings['batch_size']} x {settings['seq_len']} tokens",
        f"- **LoRA**: r={settings['r']} alpha={settings['alpha']:g} on {', '.join(TARGET_MODULES)}; "
        f"AdamW lr {settings['lr']:g} (fused where available)",
        f"- **timing**: median of {settings['steps']} steps after {settings['warmup']} warm-up "
        f"(1st step, compile included, listed apart); {isolation}",
        f"- **peak mem**: {memory_note}",
        "- **x floor**: over the frozen base (activation gradients only) of the same mode and checkpointing",
    ]
    by_sources: dict[str, list[str]] = {}
    for r in report["rows"]:
        if r.get("lora_lightning_sha256"):
            by_sources.setdefault(r["lora_lightning_sha256"], []).append(r["name"])
    if len(by_sources) > 1:
        lines.append(
            "- **warning**: the lora_lightning sources changed between rows: "
            + "; ".join(f"{sha}: {', '.join(names)}" for sha, names in by_sources.items())
        )
    lines += [
        "",
        "| config | trainable params | step ms | x floor | tokens/s | peak mem | mem x floor | 1st step s "
        "| adapter file | adapters + AdamW raw | last loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if not r["ok"]:
            last_line = str(r["error"]).strip().splitlines()[-1] if str(r["error"]).strip() else ""
            error = " ".join(last_line.split())[:160].replace("|", "/")
            lines.append(f"| {r['name']} | failed: {error} |  |  |  |  |  |  |  |  |  |")
            continue
        cells = [
            r["name"],
            f"{r['trainable_params']:,}",
            f"{r['median_step_ms']:.1f}",
            _ratio(r["step_ratio_to_floor"]),
            f"{r['tokens_per_s']:,.0f}",
            _bytes(r["peak_memory_bytes"]),
            _ratio(r["memory_ratio_to_floor"]),
            f"{r['first_step_s']:.2f}" if r["first_step_s"] < 10 else f"{r['first_step_s']:.1f}",
            _bytes(r["adapter_file_bytes"]),
            _bytes(r["trainable_plus_optimizer_bytes"]) if r["trainable_params"] else "-",
            # Rows that train the same adapters end close together: a path that trains wrongly shows here.
            "-" if r.get("loss_last") is None else f"{r['loss_last']:.4f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value} B"

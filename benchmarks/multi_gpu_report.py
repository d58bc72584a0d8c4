"""The multi-GPU report: Markdown tables of the DDP, packed-trial and GPU-test phases; JSON and Markdown files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.shapes import TARGET_MODULES

JSON_NAME = "multi_gpu.json"
MARKDOWN_NAME = "multi_gpu.md"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown table lines; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    return lines + ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]


def render_markdown(report: dict[str, Any]) -> str:
    env, spec, phases = report["environment"], report["spec"], report["phases"]
    commit = (env["git_commit"] or "none")[:12] + (" (uncommitted changes)" if env["git_dirty"] else "")
    lines = [
        "# Multi-GPU measurements" + (" (tiny CPU smoke run)" if report["tiny"] else ""),
        "",
        f"- **device**: {env['device']}" + (f" x {report['gpus_found']}" if report["gpus_found"] else ""),
        f"- **versions**: torch {env['torch']} (CUDA {env['cuda']}), transformers {env['transformers']}, "
        f"lightning {env['lightning']}; commit {commit}",
        f"- **run**: `{spec['shape']}` shape, {spec['dtype']}, precision {spec['precision']}, batch "
        f"{spec['batch_size']} x {spec['seq_len']} per device, LoRA r={spec['r']} alpha={spec['alpha']:g} on "
        f"{', '.join(TARGET_MODULES)}; {spec['warmup']} warm-up + {spec['steps']} timed steps "
        f"(packed trials: {report['trial_spec']['steps']} timed steps)",
    ]
    lines += [f"- **{name}**: skipped ({result['skipped']})" for name, result in phases.items() if "skipped" in result]

    if "runs" in phases.get("ddp", {}):
        ddp, rows = phases["ddp"], []
        for r in ddp["runs"]:
            if not r["ok"]:
                rows.append([str(r["devices"]), "failed: " + r["error"][-200:], "", "", "", ""])
                continue
            peak = f"{r['peak_memory_bytes'] / 2**30:.1f}" if r["peak_memory_bytes"] else "-"
            per_gpu = r["tokens_per_s"] / r["devices"]
            rows.append(
                [
                    str(r["devices"]),
                    f"{r['median_step_ms']:.1f}",
                    f"{r['tokens_per_s']:,.0f}",
                    f"{per_gpu:,.0f}",
                    peak,
                    f"{r['process_wall_s']:.0f}",
                ]
            )
        header = ["GPUs", "median step ms", "tokens/s (all GPUs)", "tokens/s per GPU", "peak GiB (rank 0)", "wall s"]
        lines += ["", "## DDP: 2 GPUs against 1", "", *table(header, rows)]
        if "speedup_2_over_1" in ddp:
            speedup, efficiency = ddp["speedup_2_over_1"], 100 * ddp["scaling_efficiency"]
            lines += ["", f"2 GPUs give {speedup:.2f}x the tokens/s of 1 (scaling efficiency {efficiency:.0f}%)."]

    if "sweeps" in phases.get("packed", {}):
        packed, rows = phases["packed"], []
        for name, s in packed["sweeps"].items():
            head = [name, str(s["trials"]), ",".join(s["gpus"])]
            if not s["ok"]:
                rows.append([*head, "failed: " + s["error"][-200:], "", ""])
                continue
            rows.append(
                [
                    *head,
                    f"{s['sweep_wall_s']:.1f}",
                    f"{s['mean_trial_wall_s']:.1f}",
                    f"{s['mean_trial_tokens_per_s']:,.0f}",
                ]
            )
        header = ["sweep", "trials", "GPU slots", "sweep wall s", "mean trial wall s", "mean trial tokens/s"]
        lines += ["", "## Packed single-GPU trials (gpu_pool launcher)", "", *table(header, rows)]
        if "wall_ratio_packed_over_alone" in packed:
            summary = (
                f"Wall time of {packed['sweeps']['packed']['trials']} packed trials over 1 alone: "
                f"{packed['wall_ratio_packed_over_alone']:.2f}x (1.00x: packing is free); trial tokens/s, packed "
                f"over alone: {packed['trial_tokens_per_s_ratio']:.2f}x; "
                f"{packed['speedup_over_one_after_another']:.2f}x as fast as the trials one after another."
            )
            lines += ["", summary]

    if "cases" in phases.get("tests", {}):
        tests = phases["tests"]
        rows = [[c["test"], c["outcome"], f"{c['seconds']:.1f}"] for c in tests["cases"]]
        lines += ["", "## tests/lib/test_fsdp.py -m gpu", "", *table(["test", "outcome", "seconds"], rows)]
        if tests.get("error"):
            lines += ["", f"pytest: {tests['error'][-600:]}"]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: Path) -> None:
    (out / JSON_NAME).write_text(json.dumps(report, indent=2) + "\n")
    (out / MARKDOWN_NAME).write_text(render_markdown(report))

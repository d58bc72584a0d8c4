"""What each speed and memory switch of the training app does, measured through the app itself: every row is
``scripts/train.py`` with one switch changed, in its own process, and reads the run's ``metrics.json``
(tokens/s and MFU from Lightning's ThroughputMonitor, peak memory, time per step, the held-out metric).

    python -m benchmarks.app_switches --out outputs/app_switches            # one GPU: about 8 minutes on an H200
    python -m benchmarks.app_switches --tiny --out outputs/app_switches-cpu  # the same rows on CPU, tiny models
    python -m benchmarks.app_switches --main --out outputs/app_main          # the main job's documented figures

GPU rows: the 1B-class preset (``experiment=llama1b_lm_gpu``: Llama-3.2-1B's shape from its config, LoRA r=16 on
every projection, 4 x 2048 tokens a step) with each precision and memory switch, and the SmolLM2 preset for one
H200 as shipped (Liger), without Liger, and without Liger but with LoRA+ (a switch of quality, not speed).
CPU rows: the same switches on ``experiment=tiny_lm`` (widened to 64, so that bitsandbytes' CPU kernels apply).
Rows a machine cannot run (Liger without CUDA) are recorded as skipped. Writes ``app_switches.json`` and
``app_switches.md`` with the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import REPO_ROOT, environment

QUIET = ("logger=csv", "print_config=false", "save_adapter=false", "eval_before=false")


@dataclass(frozen=True)
class Row:
    name: str
    switch: str
    overrides: tuple[str, ...]
    cuda_only: bool = False
    quiet: tuple[str, ...] = QUIET


def gpu_rows() -> list[Row]:
    base = ("experiment=llama1b_lm_gpu", "trainer.max_steps=20", "eval_after=false")
    smol = ("experiment=smollm2_lm_gpu", "trainer.max_steps=100")
    return [
        Row("1B: bf16-mixed (baseline)", "precision", base),
        Row("1B: bf16-true", "precision", (*base, "trainer.precision=bf16-true")),
        Row("1B: gradient checkpointing", "gradient_checkpointing", (*base, "gradient_checkpointing=true")),
        Row("1B: torch.compile", "compile", (*base, "compile=true")),
        Row("1B: QLoRA bnb-nf4", "quant", (*base, "quant=bnb-nf4")),
        Row("1B: QLoRA torchao-nf4", "quant", (*base, "quant=torchao-nf4")),
        Row("SmolLM2 preset (smollm2_lm_gpu, Liger)", "kernels", smol, cuda_only=True),
        Row("SmolLM2 preset, kernels=none", "kernels", (*smol, "kernels=none")),
        Row("SmolLM2 preset, kernels=none, LoRA+ 16", "loraplus", (*smol, "kernels=none", "loraplus_lr_ratio=16")),
    ]


def cpu_rows() -> list[Row]:
    base = (
        "experiment=tiny_lm",
        "trainer.max_steps=30",
        "trainer.log_every_n_steps=5",
        "model.backbone.hidden_size=64",
        "model.backbone.intermediate_size=128",
    )  # bitsandbytes' CPU shapes
    return [
        Row("tiny: fp32 (baseline)", "precision", base),
        Row("tiny: bf16-mixed", "precision", (*base, "trainer.precision=bf16-mixed")),
        Row("tiny: gradient checkpointing", "gradient_checkpointing", (*base, "gradient_checkpointing=true")),
        Row("tiny: torch.compile", "compile", (*base, "compile=true")),
        Row("tiny: QLoRA bnb-nf4", "quant", (*base, "quant=bnb-nf4", "quant_dtype=float32")),
        Row("tiny: QLoRA torchao-nf4", "quant", (*base, "quant=torchao-nf4", "quant_dtype=float32")),
        Row("tiny: Liger kernels", "kernels", (*base, "kernels=liger"), cuda_only=True),
        Row("tiny: LoRA+ (ratio 16)", "loraplus", (*base, "loraplus_lr_ratio=16")),
    ]


def main_rows() -> list[Row]:
    """The figures docs/training.md quotes for the main job and the SmolLM2 preset, as a user runs them."""
    return [
        Row("main job (python scripts/train.py)", "main", (), quiet=("logger=csv", "print_config=false")),
        Row("experiment=smollm2_lm", "main", ("experiment=smollm2_lm",), quiet=("logger=csv", "print_config=false")),
    ]


def run_row(row: Row, out: Path, timeout: int) -> dict[str, Any]:
    """``scripts/train.py`` for one row in a fresh process; the row's numbers from its ``metrics.json``."""
    folder = out / "runs" / re.sub(r"[^\w.+-]+", "_", row.name).strip("_")  # Hydra's override grammar
    record: dict[str, Any] = {"row": row.name, "switch": row.switch, "overrides": list(row.overrides)}
    if row.cuda_only and not torch.cuda.is_available():
        return {**record, "status": "skipped", "error": "needs CUDA"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *row.overrides, *row.quiet]
    command.append(f"hydra.run.dir={folder}")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env())
        output = done.stdout + done.stderr
    except subprocess.TimeoutExpired:
        output = f"timed out after {timeout} s"
        record.update(status="timed out", error=output)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    (out / "logs" / f"{folder.name}.log").write_text(output)
    metrics = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").is_file() else {}
    wanted = ("status", "error", "steps", "tokens_per_sec", "samples_per_sec", "mfu", "time_per_step_s",
              "peak_memory_mib", "memory_kind", "metric_name", "metric", "train_time_s")  # fmt: skip
    record.update({k: metrics[k] for k in wanted if k in metrics and k not in record})
    if metrics.get("before"):
        record["before"] = metrics["before"].get(metrics.get("metric_name"))
    record.setdefault("status", "failed")
    if record["status"] != "ok" and "error" not in record:
        record["error"] = output.strip().splitlines()[-1][:300] if output.strip() else "no output"
    record["wall_s"] = round(time.perf_counter() - started, 1)
    return record


def env() -> dict[str, str]:
    """This environment with the repository first on ``PYTHONPATH`` (the app of this checkout is measured)."""
    paths = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "WANDB_MODE": "disabled"}


def markdown(records: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        "# App switches",
        "",
        f"Machine: {machine.get('device')}; torch {machine.get('torch')}, transformers {machine.get('transformers')};"
        f" {machine.get('timestamp', '')}.",
        "",
        "| row | tokens/s | MFU | time/step (ms) | peak memory (MiB) | held-out metric | steps | wall (s) | status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        step = r.get("time_per_step_s")
        metric = f"{r['metric_name']} {r['metric']:.4g}" if isinstance(r.get("metric"), float) else ""
        metric = f"{r['before']:.4g} -> {metric}" if metric and r.get("before") is not None else metric
        cells = [
            r["row"],
            f"{r['tokens_per_sec']:,.0f}" if r.get("tokens_per_sec") else "",
            f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "",
            f"{1000 * step:.1f}" if step else "",
            f"{r['peak_memory_mib']:,.0f} ({r.get('memory_kind', '')})" if r.get("peak_memory_mib") else "",
            metric if metric != "nan" else "",
            str(r.get("steps", "")),
            str(r.get("wall_s", "")),
            r["status"] + (f": {' '.join(r['error'].split())[:160]}" if r.get("error") else ""),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="the CPU rows on tiny models")
    parser.add_argument("--main", action="store_true", help="the main job and experiment=smollm2_lm, as documented")
    parser.add_argument("--rows", nargs="*", default=None, help="only rows whose name contains one of these")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per row")
    args = parser.parse_args(argv)
    rows = main_rows() if args.main else cpu_rows() if args.tiny or not torch.cuda.is_available() else gpu_rows()
    if args.rows:
        rows = [r for r in rows if any(part in r.name for part in args.rows)]
    args.out.mkdir(parents=True, exist_ok=True)
    machine = environment(torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    records = []
    for row in rows:
        records.append(run_row(row, args.out, args.timeout))
        print(json.dumps(records[-1]), flush=True)
    report = {"machine": machine, "rows": records}
    (args.out / "app_switches.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (args.out / "app_switches.md").write_text(markdown(records, machine))
    print((args.out / "app_switches.md").read_text())
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

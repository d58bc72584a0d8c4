"""Long context at batch 1: step time and peak memory of LoRA rows with gradient checkpointing at growing sequence
lengths, on the Llama-3.1-8B shape (``llama-8b``).

Each row (default ``ours:eager:gc:liger`` and ``peft:eager:gc``, see `benchmarks.rows`) runs in its own process:
it builds the model once, sets it up as the row says, then trains at each of ``--lengths`` in turn (``--steps``
timed steps after one warm-up at the first length, one warm-up and one timed step at the others) until a length
runs out of memory or ``--budget`` seconds have passed. Per row the report gives every length measured (step ms,
peak GiB, or out of memory), the longest that fitted, and a least-squares line ``peak = a + b * tokens`` over the
fitted lengths with the length at which it would reach ``--limit-gib``: an extrapolation, labelled as such in the
report, never taken for a measurement.

    python -m benchmarks.max_context --out outputs/max-context --lengths 4096 16384 32768 65536
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import REPO_ROOT, environment
from benchmarks.memory import resolve_device
from benchmarks.rows import Settings, attach, enable_checkpointing, make_optimizer, parse_row
from benchmarks.timing import median_ms, timed_steps

DEFAULT_ROWS = ("ours:eager:gc:liger", "peft:eager:gc")
GIB = 2**30


def measure(
    row_name: str, shape: str, lengths: Sequence[int], steps: int, budget_s: float, device: str, long_steps: int = 2
) -> dict:
    """Train ``row_name`` at each length in this process; its JSON record. After the first length each length runs
    ``long_steps`` steps: the first a warm-up, the others timed (a single step is timed with its warm-up, cold)."""
    row = parse_row(row_name)
    if not row.checkpointing:
        raise ValueError(f"{row_name}: long-context rows need gradient checkpointing (a ':gc' row)")
    settings = Settings.for_shape(shape, seq_len=max(lengths), device=device)
    device_ = resolve_device(settings.device)
    cuda = device_.type == "cuda"
    if cuda:
        torch.cuda.set_device(device_)
    model = settings.build_model(device_)
    enable_checkpointing(model)
    net, _ = attach(row, model, settings)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, _ = make_optimizer(params, settings.lr)
    started, points = time.perf_counter(), []
    for index, length in enumerate(lengths):
        generator = torch.Generator().manual_seed(settings.seed + 1)
        tokens = torch.randint(0, settings.model["vocab_size"], (1, length), generator=generator).to(device_)

        def step(tokens: torch.Tensor = tokens) -> None:
            net(input_ids=tokens, labels=tokens, use_cache=False).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device_)
        count = 1 + steps if index == 0 else long_steps
        try:
            times = [seconds for seconds, _ in timed_steps(step, count, device_)]
        except torch.cuda.OutOfMemoryError:
            points.append({"tokens": length, "fits": False})
            break
        timed = times[1:] or times  # one step: its own warm-up, timed cold
        points.append(
            {
                "tokens": length,
                "fits": True,
                "step_ms": median_ms(timed),
                "steps_timed": len(timed),
                "cold": len(times) == 1,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(device_) if cuda else None,
            }
        )
        print(f"{row_name} {length}: {points[-1]['step_ms']:.0f} ms, peak {points[-1]['peak_memory_bytes']} bytes")
        if time.perf_counter() - started > budget_s and index + 1 < len(lengths):
            points.append({"tokens": lengths[index + 1], "fits": None, "note": f"not run: {budget_s:g} s budget spent"})
            break
    return {
        "name": row_name,
        "ok": True,
        "error": None,
        "points": points,
        "trainable_params": sum(map(torch.numel, params)),
    }


def fit_line(points: list[dict[str, Any]], limit_bytes: float) -> dict[str, float] | None:
    """Least squares ``peak = a + b * tokens`` over the lengths that fitted, and the length reaching ``limit``."""
    fitted = [(p["tokens"], p["peak_memory_bytes"]) for p in points if p.get("fits") and p["peak_memory_bytes"]]
    if len(fitted) < 2:
        return None
    n = len(fitted)
    mean_t, mean_m = sum(t for t, _ in fitted) / n, sum(m for _, m in fitted) / n
    slope = sum((t - mean_t) * (m - mean_m) for t, m in fitted) / sum((t - mean_t) ** 2 for t, _ in fitted)
    intercept = mean_m - slope * mean_t
    return {
        "intercept_gib": intercept / GIB,
        "kib_per_token": slope / 1024,
        "extrapolated_max_tokens": int((limit_bytes - intercept) / slope) if slope > 0 else None,
    }


def run_in_subprocess(row: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory(prefix="max-context-") as tmp:
        out_file = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "benchmarks.max_context", f"--row={row}", f"--row-out={out_file}"]
        command += [
            f"--shape={args.shape}",
            f"--steps={args.steps}",
            f"--budget={args.budget}",
            f"--device={args.device}",
            f"--long-steps={args.long_steps}",
        ]
        command += ["--lengths", *map(str, args.lengths)]
        proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        sys.stderr.write(proc.stdout)
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return {"name": row, "ok": False, "error": f"exit code {proc.returncode}: {tail}", "points": []}
        return json.loads(out_file.read_text())


def render_markdown(report: dict) -> str:
    env, limit = report["environment"], report["limit_gib"]
    lines = [
        f"# Long context at batch 1, `{report['shape']}` shape, gradient checkpointing",
        "",
        f"- **device**: {env['device']}; torch {env['torch']}, transformers {env['transformers']}, peft {env['peft']}",
        f"- **extrapolated max**: where a least-squares line through the measured peaks reaches {limit:g} GiB; "
        "an estimate, not a measurement",
        "",
        "| row | tokens | step ms | peak GiB | fits |",
        "|---|---:|---:|---:|---|",
    ]
    for record in report["rows"]:
        if not record["ok"]:
            lines.append(f"| {record['name']} | failed: {record['error'].splitlines()[-1][:160]} |  |  |  |")
            continue
        for p in record["points"]:
            step = f"{p['step_ms']:.0f}" + (" (cold)" if p.get("cold") else "") if p.get("step_ms") is not None else "-"
            peak = f"{p['peak_memory_bytes'] / GIB:.2f}" if p.get("peak_memory_bytes") else "-"
            fits = {True: "yes", False: "out of memory", None: p.get("note", "-")}[p["fits"]]
            lines.append(f"| {record['name']} | {p['tokens']:,} | {step} | {peak} | {fits} |")
    lines += [
        "",
        "| row | longest measured that fits | GiB per 1k tokens | extrapolated max tokens |",
        "|---|---:|---:|---:|",
    ]
    for record in report["rows"]:
        fitted = [p["tokens"] for p in record["points"] if p.get("fits")]
        line = record.get("fit") or {}
        per_k = f"{line['kib_per_token'] * 1000 / 2**20:.3f}" if line else "-"
        extrapolated = f"{line['extrapolated_max_tokens']:,}" if line.get("extrapolated_max_tokens") else "-"
        lines.append(f"| {record['name']} | {max(fitted, default=0):,} | {per_k} | {extrapolated} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--shape", default="llama-8b")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384, 32768, 65536])
    parser.add_argument("--steps", type=int, default=3, help="timed steps at the first length")
    parser.add_argument(
        "--long-steps", type=int, default=2, help="steps at each later length: one warm-up, the rest timed (1: cold)"
    )
    parser.add_argument("--budget", type=float, default=300.0, help="seconds per row before no longer length starts")
    parser.add_argument("--limit-gib", type=float, default=140.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=Path("outputs/max-context"))
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        record = measure(args.row, args.shape, args.lengths, args.steps, args.budget, args.device, args.long_steps)
        args.row_out.write_text(json.dumps(record))
        return 0
    records = []
    for row in args.rows:
        record = run_in_subprocess(row, args)
        record["fit"] = fit_line(record["points"], args.limit_gib * GIB) if record["ok"] else None
        records.append(record)
    report = {
        "environment": environment(resolve_device(args.device)),
        "shape": args.shape,
        "limit_gib": args.limit_gib,
        "lengths": args.lengths,
        "rows": records,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "max_context.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "max_context.md").write_text(render_markdown(report))
    print(render_markdown(report))
    return 0 if all(r["ok"] for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())

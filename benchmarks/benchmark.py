"""Training-step benchmark: lora-lightning against PEFT, the frozen-base floor and full fine-tuning.

Every row trains the same randomly initialised ``LlamaForCausalLM`` (built from a config, nothing is
downloaded) on the same batch with the same LoRA settings, and measures one training step (forward with
labels, backward, fused AdamW step, ``zero_grad``) with the device synchronised around it: the median over
``--steps`` steps after ``--warmup`` warm-up steps (the first warm-up step holds ``torch.compile``'s compile
time, which is reported apart).

Rows (``--list`` prints every name; ``--configs`` takes names or shell-style patterns such as ``'ours:*'``):

    <impl>:<mode>[:gc][:drop0.05][:liger]
    impl  frozen     base frozen, input-embedding output requires grad: backward runs through every layer (the floor)
          ours       lora_lightning.inject_lora + install_fused_paths + fold_gated_mlps (adapters in the base dtype),
                     as the callback
          ours-layer lora_lightning.inject_lora alone: every adapted layer its own node (the path before fusion)
          peft       peft.get_peft_model with its defaults (adapters autocast to fp32)
          peft-bf16  peft.get_peft_model(..., autocast_adapter_dtype=False) (adapters in the base dtype)
          full       full fine-tuning (AdamW states in the base dtype)
    mode  eager | compile (torch.compile of the whole model; the optimizer step stays eager)
    gc    activation checkpointing (non-reentrant) on every decoder layer
    drop  LoRA dropout 0.05 (LoRA rows only; default 0)
    liger lora_lightning.apply_kernels(model, "liger") first (Liger-Kernel RMSNorm, SwiGLU, RoPE, fused linear
          cross-entropy; eager rows of frozen, ours and peft); the floor of such a row is the Liger frozen base

Each row runs in its own Python process by default (``--isolation process``) with its own empty
TorchInductor/Triton cache folder, so compile caches and allocator peaks do not leak between rows.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (model weights included); on CPU it is the
growth of the row process's peak RSS from just before the model is built (``/proc/self`` ``VmHWM``
reset through ``clear_refs``; Python and compiler overhead included, so only a rough figure), or
``null`` where that cannot be read.

Writes ``benchmark.json`` and ``benchmark.md`` to ``--out``; step-time and memory ratios are to the
frozen-base row of the same mode and checkpointing setting. Examples (``python -m benchmarks.benchmark`` from
the repository root runs the same)::

    python scripts/benchmark.py --shape tiny --out outputs/bench-tiny
    python scripts/benchmark.py --shape llama-1b --configs 'frozen:*' 'ours:*' 'peft*:eager' --out outputs/bench
    python scripts/benchmark.py --merge a/benchmark.json b/benchmark.json --out outputs/bench  # one table of both

``--profile DIR`` also writes a ``torch.profiler`` operator table of 3 extra (untimed) steps per row.
On a shared or busy CPU, ``--threads 1`` gives far steadier CPU figures (two OpenMP threads stall whenever
one of them is descheduled).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.benchmark_report import (
    JSON_NAME,
    MARKDOWN_NAME,
    add_floor_ratios,
    merge_reports,
    render_markdown,
    write_report,
)
from benchmarks.environment import REPO_ROOT, environment, library_digest
from benchmarks.memory import MemoryMeter, optimizer_state_bytes, resolve_device, tensor_bytes
from benchmarks.rows import (
    LEARNING_RATE,
    RowSpec,
    Settings,
    all_rows,
    parse_row,
    select_rows,
    set_up,
)
from benchmarks.shapes import DTYPES, SHAPES, TARGET_MODULES
from benchmarks.timing import median_ms, synchronize, timed_steps

# ---------------------------------------------------------------------------------------------------------------
# One row, measured in this process
# ---------------------------------------------------------------------------------------------------------------


def measure_row(row: RowSpec, settings: Settings) -> dict[str, Any]:
    """Build, set up and time one row in this process; returns its JSON record."""
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.empty_cache()
    # Import what the row uses before the memory baseline, so loading libraries is not counted as its memory.
    importlib.import_module("transformers.models.llama.modeling_llama")
    if row.is_lora:
        importlib.import_module("lora_lightning" if row.impl.startswith("ours") else "peft")
    if row.kernels == "liger":
        importlib.import_module("liger_kernel.transformers")
    sources = library_digest()  # the code this row measures, edited or not
    meter = MemoryMeter(device, own_process=settings.isolation == "process")
    model, net, optimizer, optimizer_name, step_net, tokens, save_adapter_to = set_up(row, settings, device)
    params = [p for p in net.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        loss = step_net(input_ids=tokens, labels=tokens, use_cache=False).loss
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    meter.start()
    times: list[float] = []
    losses: list[float] = []
    for seconds, loss in timed_steps(step, settings.warmup + settings.steps, device):
        times.append(seconds)
        losses.append(float(loss))
    peak = meter.peak()
    if settings.profile_dir:  # after the timed steps, so profiling overhead never reaches the figures
        profile_steps(row, step, device, Path(settings.profile_dir))

    timed = times[settings.warmup :]
    step_ms = median_ms(timed)
    trainable_bytes = tensor_bytes(params)
    state_bytes = optimizer_state_bytes(optimizer)
    adapter_file_bytes = None
    if save_adapter_to is not None:
        with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
            adapter_file_bytes = save_adapter_to(Path(tmp) / "adapter").stat().st_size
    hooks = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
    return {
        **row_identity(row),
        "ok": True,
        "error": None,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in net.parameters()),
        "trainable_dtypes": sorted({str(p.dtype).removeprefix("torch.") for p in params}),
        "input_embeddings_require_grad": bool(hooks),
        "optimizer": optimizer_name,
        "torch_threads": torch.get_num_threads(),
        "lora_lightning_sha256": sources,
        "first_step_s": times[0],
        "warmup_step_ms": [1e3 * t for t in times[: settings.warmup]],
        "step_ms": [1e3 * t for t in timed],
        "median_step_ms": step_ms,
        "tokens_per_s": 1e3 * settings.batch_size * settings.seq_len / step_ms,
        "peak_memory_bytes": peak,
        "peak_memory_kind": meter.kind,
        "adapter_file_bytes": adapter_file_bytes,
        "trainable_bytes": trainable_bytes,
        "optimizer_state_bytes": state_bytes,
        "trainable_plus_optimizer_bytes": trainable_bytes + state_bytes,
        "loss_first": losses[0],
        "loss_last": losses[-1],
    }


def profile_steps(row: RowSpec, step: Callable[[], torch.Tensor], device: torch.device, folder: Path) -> None:
    """Write ``profile_<row>.txt``: torch.profiler operator tables (by self time, then by input shape) of 3 steps."""
    from torch.profiler import ProfilerActivity, profile

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"profile_{row.name.replace(':', '_')}.txt"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(3):
                step()
            synchronize(device)
        averages = prof.key_averages()
        by_shape = prof.key_averages(group_by_input_shape=True)
        text = f"# {row.name}: 3 steps, sorted by {sort_by}\n\n{averages.table(sort_by=sort_by, row_limit=40)}\n"
        text += (
            f"\n# grouped by input shape\n\n{by_shape.table(sort_by=sort_by, row_limit=60, max_name_column_width=40)}\n"
        )
    except Exception as err:  # a profile is a by-product: never lose the row over it
        text = f"profiling failed: {type(err).__name__}: {err}\n"
    target.write_text(text)


# ---------------------------------------------------------------------------------------------------------------
# The run: rows in subprocesses, then JSON and Markdown
# ---------------------------------------------------------------------------------------------------------------


def run_row_in_subprocess(row: RowSpec, settings: Settings, timeout_s: float | None) -> dict[str, Any]:
    """Measure ``row`` in a fresh ``python -m benchmarks.benchmark`` process with empty compile caches."""
    with tempfile.TemporaryDirectory(prefix="bench-row-") as tmp:
        out_file = Path(tmp) / "row.json"
        env = dict(os.environ)
        # An empty compile cache per row: compile time is a cold compile, and nothing carries over.
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        command = [sys.executable, "-m", "benchmarks.benchmark", *settings.cli_args()]
        command += [f"--row={row.name}", f"--row-out={out_file}"]
        try:
            proc = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
            )
        except subprocess.TimeoutExpired:
            return failed_row(row, f"timed out after {timeout_s:g} s")
        if proc.returncode != 0 or not out_file.exists():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            return failed_row(row, f"exit code {proc.returncode}: {tail}")
        return json.loads(out_file.read_text())


def run_row_here(row: RowSpec, settings: Settings) -> dict[str, Any]:
    try:
        return measure_row(row, settings)
    except Exception as err:  # one failing row (OOM, compile error) must not lose the others
        return failed_row(row, f"{type(err).__name__}: {err}")
    finally:
        if settings.device.startswith("cuda"):
            torch.cuda.empty_cache()


def failed_row(row: RowSpec, error: str) -> dict[str, Any]:
    return {**row_identity(row), "ok": False, "error": error}


def row_identity(row: RowSpec) -> dict[str, Any]:
    """The fields naming a row in its JSON record."""
    return {
        "name": row.name,
        "impl": row.impl,
        "mode": row.mode,
        "gradient_checkpointing": row.checkpointing,
        "lora_dropout": row.dropout if row.is_lora else None,
        "kernels": row.kernels,
    }


def run_benchmark(rows: Sequence[RowSpec], settings: Settings, out: Path, row_timeout_s: float | None = None) -> dict:
    """Measure ``rows``, write ``benchmark.json`` and ``benchmark.md`` into ``out`` and return the report."""
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for index, row in enumerate(rows, 1):
        print(f"[{index}/{len(rows)}] {row.name} ...", file=sys.stderr, flush=True)
        if settings.isolation == "process":
            record = run_row_in_subprocess(row, settings, row_timeout_s)
        else:
            record = run_row_here(row, settings)
        summary = f"{record['median_step_ms']:.1f} ms" if record["ok"] else "FAILED: " + record["error"][-300:]
        print(f"[{index}/{len(rows)}] {row.name}: {summary}", file=sys.stderr, flush=True)
        records.append(record)
    add_floor_ratios(records)
    report = {
        "schema_version": 1,
        "environment": environment(resolve_device(settings.device)),
        "settings": {**asdict(settings), "target_modules": list(TARGET_MODULES)},
        "rows": records,
    }
    write_report(report, out)
    return report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--configs", nargs="+", default=["all"], help="row names or globs, e.g. 'ours:*' peft:eager")
    parser.add_argument("--list", action="store_true", help="print every row name and exit")
    parser.add_argument("--steps", type=int, help="timed steps (default: the shape's; 20 for llama-1b)")
    parser.add_argument("--warmup", type=int, help="warm-up steps before timing (default: the shape's; 5 for llama-1b)")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmark"), help="folder for the JSON and Markdown")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the shape's, bf16)")
    parser.add_argument("--batch-size", type=int, help="override the shape's batch size")
    parser.add_argument("--seq-len", type=int, help="override the shape's sequence length")
    parser.add_argument("--rank", type=int, default=16, help="LoRA r")
    parser.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--isolation",
        choices=("process", "none"),
        default="process",
        help="'process': every row in a fresh process (default); 'none': all rows in this one (faster, leakier)",
    )
    parser.add_argument("--profile", metavar="DIR", help="also write a torch.profiler table of 3 extra steps per row")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (CPU; 1 is steadier on a shared or busy machine)"
    )
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON", help="merge earlier runs' JSON into one table")
    parser.add_argument("--row-timeout", type=float, default=1800.0, help="seconds before a row process is killed")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: measure this one row in this process
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "seq_len", "rank", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup is not None and args.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step holds compile time and one-off allocations)")
    return args


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.for_shape(
        args.shape,
        steps=args.steps,
        warmup=args.warmup,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        r=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        seed=args.seed,
        isolation=args.isolation,
        profile_dir=str(Path(args.profile).resolve()) if args.profile else None,
        threads=args.threads,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(r.name for r in all_rows()))
        return 0
    if args.merge:
        try:
            report = merge_reports(args.merge)
        except (OSError, ValueError, KeyError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        write_report(report, args.out)
        print(render_markdown(report))
        return 0
    settings = settings_from_args(args)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    if args.row:  # a row process started by run_row_in_subprocess
        record = measure_row(parse_row(args.row), replace(settings, isolation="process"))
        args.row_out.write_text(json.dumps(record, allow_nan=True))
        return 0
    try:
        rows = select_rows(args.configs)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = run_benchmark(rows, settings, args.out, args.row_timeout)
    print(render_markdown(report))
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME}", file=sys.stderr)
    failed = [r["name"] for r in report["rows"] if not r["ok"]]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

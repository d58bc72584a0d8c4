"""Where a LoRA training step's extra time and memory go, next to the frozen-base floor.

For one model and batch shape (``benchmarks.shapes``, the training benchmark's), this builds in turn

    floor         the frozen base, activation gradients only (benchmark row ``frozen:eager``)
    ours          lora_lightning's adapters, eager, dropout 0            (``ours:eager``)
    ours-drop     the same with LoRA dropout ``--dropout`` (0.05)         (``ours:eager:drop0.05``)
    floor-compile, ours-compile   both under ``torch.compile`` (only with ``--compiled``)

and for each one times ``--steps`` training steps (forward with labels, backward, fused AdamW, zero_grad) after
``--warmup``, profiles ``--profile-steps`` more with ``torch.profiler`` (CUDA activity where there is a GPU)
and counts the bytes saved for backward with ``torch.autograd.graph.saved_tensors_hooks``.

Time per category. On CUDA a unit is one kernel (device time); on CPU it is one operator's self CPU time.
Each unit gets a phase (forward, backward, optimizer: ``record_function`` ranges around the step's parts,
and the autograd engine's ``evaluate_function`` ranges for backward work on any thread), a module label
(forward: a ``record_function`` range that the profile opens around every module through forward hooks,
e.g. ``mod::lora:q_proj`` or ``mod::norm``; backward: the label of the forward operator with the autograd
node's sequence number) and an operator. Matrix products in linear layers get their role from their
shapes: with ``T`` tokens and LoRA rank ``r``, ``[T,in]x[in,r]`` is ``x A^T``, ``[T,r]x[r,out]`` is
``h B^T``, ``[r,T]x[T,in]`` the gradient of ``A``, ``[out,T]x[T,r]`` that of ``B``, ``[T,out]x[out,r]`` the
gradient of ``h`` and ``[T,r]x[r,in]`` the input gradient through ``A``; products without an ``r`` are the
base layer's (forward, or input gradient in backward). Under ``torch.compile`` the module ranges are
left out (they would break the graph) and Inductor's fused kernels get a category of their own.

Memory. The CUDA allocator's peak (``max_memory_allocated``, weights included, as in benchmark.py), the
memory still allocated after the forward pass, and every tensor saved for backward, de-duplicated by
storage and attributed to the first module that saved it (parameters apart). For ours, an analytic
account: for each adapted layer its input ``x`` (the gradient of ``A`` needs it; layers reading the same
tensor count it once; a tensor another module saves anyway costs nothing) and ``h = x A^T``.

Writes ``profile.json`` and ``profile.md`` to ``--out``; ``--memory-snapshot`` also writes a CUDA memory
snapshot of one step per config (``memory_snapshot_<config>.pickle``, for https://pytorch.org/memory_viz).
Examples (``python -m benchmarks.profile`` from the repository root runs the same)::

    python scripts/profile_step.py --shape tiny --device cpu --out outputs/profile-tiny
    PYTHONPATH=$PWD python scripts/profile_step.py --shape llama-1b --out outputs/profile-llama1b
    PYTHONPATH=$PWD python scripts/profile_step.py --shape llama-1b --configs floor-compile ours-compile \\
        --out outputs/profile-llama1b-compile
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import environment
from benchmarks.memory import resolve_device
from benchmarks.profile.classify import CATEGORIES
from benchmarks.profile.compare import comparisons, memory_account
from benchmarks.profile.measure import DEFAULT_CONFIGS, all_configs, measure_config
from benchmarks.profile.report import render_markdown, unclaimed_note, where_it_goes
from benchmarks.rows import LEARNING_RATE, LORA_DROPOUT, Settings
from benchmarks.shapes import DTYPES, SHAPES

JSON_NAME = "profile.json"
MARKDOWN_NAME = "profile.md"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help=f"any of {', '.join(all_configs(0.05))} (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--compiled", action="store_true", help="also run floor-compile and ours-compile")
    parser.add_argument("--dropout", type=float, default=LORA_DROPOUT, help="LoRA dropout of ours-drop")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="model dtype (default: the shape's, bf16)")
    parser.add_argument("--batch-size", type=int, help="override the shape's batch size")
    parser.add_argument("--seq-len", type=int, help="override the shape's sequence length")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (>= 2: optimizer state exists)")
    parser.add_argument("--steps", type=int, default=5, help="timed (unprofiled) steps; the median is reported")
    parser.add_argument("--profile-steps", type=int, default=1, help="profiled steps, averaged")
    parser.add_argument("--top", type=int, default=15, help="how many new or grown kernels to list")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (CPU)")
    parser.add_argument("--memory-snapshot", action="store_true", help="CUDA: dump a memory snapshot of one step")
    parser.add_argument("--out", type=Path, default=Path("outputs/profile"))
    args = parser.parse_args(argv)
    if args.warmup < 2:
        parser.error("--warmup must be >= 2 (the first step allocates the optimizer state)")
    if args.steps < 1 or args.profile_steps < 1:
        parser.error("--steps and --profile-steps must be >= 1")
    for name in ("batch_size", "seq_len", "rank"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def settings_for(args: argparse.Namespace) -> Settings:
    """The benchmark settings of this profile (all configurations in this one process)."""
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
        isolation="none",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    known = all_configs(args.dropout)
    names = [n for entry in args.configs for n in entry.split(",") if n]
    if args.compiled:
        names += ["floor-compile", "ours-compile"]
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"error: unknown configs {unknown}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    names = list(dict.fromkeys(names))
    settings = settings_for(args)
    device = resolve_device(settings.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    tokens = settings.batch_size * settings.seq_len
    notes = []
    model = settings.model
    kv = model["hidden_size"] // model["num_attention_heads"] * model["num_key_value_heads"]
    collisions = {settings.r} & {tokens, model["hidden_size"], model["intermediate_size"], kv}
    if collisions:
        notes.append(f"the rank {settings.r} equals a model dimension or the token count: GEMM roles may be mixed up")
    if tokens in (model["hidden_size"], model["intermediate_size"], kv):
        notes.append(
            f"the token count {tokens} equals a layer width: grad B and grad h have the same shape for those layers "
            "and are told apart by the first operand's strides (transposed for grad B)"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    snapshot_dir = args.out if args.memory_snapshot else None
    records: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        records[name] = measure_config(known[name], settings, device, args.profile_steps, snapshot_dir)
        if known[name].mode == "compile":
            torch._dynamo.reset()  # drop the compiled graphs (and what they hold) before the next config
        gc.collect()  # saved-tensor hooks leave reference cycles through the autograd graph
        if device.type == "cuda":
            torch.cuda.empty_cache()
        r = records[name]
        print(
            f"[{index}/{len(names)}] {name}: {r['median_step_ms']:.1f} ms, profiled {r['profile']['total_ms']:.1f} ms, "
            f"{r['wall_s']:.1f} s (profile parse {r['profile_parse_s']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
    env = environment(device)
    env["command"] = [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]
    report: dict[str, Any] = {
        "schema_version": 1,
        "environment": env,
        "settings": {**asdict(settings), "profile_steps": args.profile_steps, "dropout": args.dropout},
        "categories": CATEGORIES,
        "configs": records,
        "comparisons": comparisons(records, args.top),
        "notes": notes,
        "total_s": None,
    }
    note = unclaimed_note(records)
    if note:
        notes.append(note)
    report["memory_account"] = memory_account(records, device.type)
    report["where_it_goes"] = where_it_goes(report)
    report["total_s"] = time.perf_counter() - started
    (args.out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (args.out / MARKDOWN_NAME).write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME} in {report['total_s']:.1f} s", file=sys.stderr)
    return 0

"""Where the GPU waits on the host in a training step: the benchmark's rows, each step synchronised as the
benchmark times it.

For each row (``benchmarks.benchmark``'s names, e.g. ``ours:eager:liger``) this builds the row's model, warms it
up, then

- **host**: times, without the profiler, when the host returns from forward, backward and the optimizer step, and
  how long the device still works after that (mean of the middle steps). A host far ahead of the device waits for
  room in the launch queue, so a long host phase may be the device's pace: the idle split says who waited;
- **device idle**: profiles a few steps (CUDA kernels) and splits each step's wall time into the union of kernel
  time and idle gaps. A gap whose closing kernel the host launched only after the device had run dry is the
  host's: it goes to the phase (forward, backward, optimizer) that launched that kernel (the launch call with the
  kernel's correlation id), ``other`` outside them. A gap whose closing kernel was already queued is the device's
  own (``queued``: the time between queued kernels, waits across streams). ``before`` is the gap at the start of a
  step (the host's work before the first kernel: Python, ``torch.compile``'s guards).

Writes ``idle.json`` and ``idle.md`` to ``--out``. Each row runs in a process of its own, as in the benchmark
(whose step times these are not: the profiled steps carry the profiler's cost); a row that fails is reported as
failed and the others are kept. On CPU there are no kernels: only the host split. Besides the options below, it
takes the benchmark's model, batch and device options (``--shape``, ``--device``, ``--batch-size``, ``--seq-len``,
``--rank``, ``--warmup``, ``--threads``, ...). Example (one H200)::

    python -m benchmarks.idle --shape llama-1b --configs frozen:eager:liger ours:eager:liger --out outputs/idle
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.benchmark import parse_args as benchmark_args
from benchmarks.benchmark import settings_from_args
from benchmarks.environment import REPO_ROOT, environment
from benchmarks.memory import resolve_device
from benchmarks.rows import Settings, parse_row, set_up
from benchmarks.timing import synchronize

PHASES = ("forward", "backward", "optimizer")
_PHASE = "idle_phase::"
_STEP = "idle_step"


def idle_by_phase(
    kernels: Sequence[tuple[float, float, float]],
    phases: Sequence[tuple[float, float, str]],
    steps: Sequence[tuple[float, float]],
) -> dict[str, Any]:
    """Per step (means over ``steps``, ``(start, end)``): wall (step start to its last kernel's end), the union of
    ``kernels`` (``(start, end, launched)``, ``launched``: when the host's launch call returned) and the idle gaps:
    ``before`` the first kernel; on the phase (``(start, end, name)``) that launched the kernel after the gap where
    that launch came after the device ran dry (``other`` outside every phase); ``queued`` where it came before.
    Times in the unit given, results in the same unit."""
    totals: dict[str, float] = {"wall": 0.0, "busy": 0.0}
    idle: dict[str, float] = {}
    ran = 0
    for start, end in steps:
        inside = sorted(k for k in kernels if start <= k[0] <= end)
        if not inside:
            continue
        ran += 1
        busy_until = start
        for a, b, launched in inside:
            if a > busy_until:
                if busy_until == start:
                    where = "before"
                else:
                    where = _phase_at(launched, phases) if launched >= busy_until else "queued"
                idle[where] = idle.get(where, 0.0) + a - busy_until
            totals["busy"] += max(0.0, b - max(a, busy_until))
            busy_until = max(busy_until, b)
        totals["wall"] += busy_until - start
    n = max(1, ran)
    return {
        "wall": totals["wall"] / n,
        "busy": totals["busy"] / n,
        "idle": sum(idle.values()) / n,
        "idle_by_phase": {k: v / n for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
    }


def trace_intervals(events: Sequence[dict[str, Any]]) -> tuple[list, list, list]:
    """``(kernels, phases, steps)`` for `idle_by_phase` from a Chrome trace's events (microseconds): every kernel,
    copy and memset on the device with the end of the runtime or driver call that launched it (its correlation id;
    the kernel's own start where none is recorded), and the host ranges this module opens."""
    spans = [e for e in events if e.get("ph") == "X"]
    launched = {
        e["args"]["correlation"]: e["ts"] + e["dur"]
        for e in spans
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    kernels = [
        (e["ts"], e["ts"] + e["dur"], launched.get(e.get("args", {}).get("correlation"), e["ts"]))
        for e in spans
        if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
    ]
    host = [e for e in spans if e.get("cat") == "user_annotation"]
    phases = [
        (e["ts"], e["ts"] + e["dur"], e["name"].removeprefix(_PHASE)) for e in host if e["name"].startswith(_PHASE)
    ]
    steps = [(e["ts"], e["ts"] + e["dur"]) for e in host if e["name"] == _STEP]
    return kernels, phases, steps


def _phase_at(t: float, phases: Sequence[tuple[float, float, str]]) -> str:
    return next((name for a, b, name in phases if a <= t <= b), "other")


def measure_row(name: str, settings: Settings, device: torch.device, host_steps: int, profile_steps: int) -> dict:
    """Host split and device idle of row ``name``."""
    training = set_up(parse_row(name), settings, device)
    optimizer, step_net, tokens = training.optimizer, training.step_net, training.tokens

    def step(mark: Callable[[str], None]) -> None:
        with torch.profiler.record_function(_PHASE + "forward"):
            loss = step_net(input_ids=tokens, labels=tokens, use_cache=False).loss
        mark("forward")
        with torch.profiler.record_function(_PHASE + "backward"):
            loss.backward()
        mark("backward")
        if optimizer is not None:
            with torch.profiler.record_function(_PHASE + "optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        mark("optimizer")

    for _ in range(settings.warmup):
        step(lambda _: None)
    synchronize(device)
    record: dict[str, Any] = {"name": name, "torch_threads": torch.get_num_threads()}
    record["host_ms"] = host_split(step, device, host_steps)
    record["device_ms"] = None
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(profile_steps):
                with torch.profiler.record_function(_STEP):
                    step(lambda _: None)
                    synchronize(device)
        with tempfile.TemporaryDirectory(prefix="idle-") as tmp:
            trace = Path(tmp) / "trace.json"
            prof.export_chrome_trace(str(trace))
            result = idle_by_phase(*trace_intervals(json.loads(trace.read_text())["traceEvents"]))
        record["device_ms"] = {
            "wall": result["wall"] / 1e3,
            "busy": result["busy"] / 1e3,
            "idle": result["idle"] / 1e3,
            "idle_by_phase": {k: v / 1e3 for k, v in result["idle_by_phase"].items()},
        }
    return record


def host_split(step: Callable[[Callable[[str], None]], None], device: torch.device, steps: int) -> dict[str, float]:
    """Host milliseconds of forward, backward and the optimizer step, and the device's work left after them
    (``device_after``), the means of the middle steps (a quarter of the fastest and slowest left out)."""
    samples = []
    for _ in range(steps):
        marks = {"start": time.perf_counter()}
        step(lambda phase, marks=marks: marks.__setitem__(phase, time.perf_counter()))
        synchronize(device)
        marks["end"] = time.perf_counter()
        samples.append(marks)
    samples.sort(key=lambda m: m["end"] - m["start"])
    middle = samples[len(samples) // 4 : len(samples) - len(samples) // 4] or samples
    order = ("start", *PHASES, "end")
    names = (*PHASES, "device_after")
    return {
        n: 1e3 * sum(m[b] - m[a] for m in middle) / len(middle)
        for n, a, b in zip(names, order[:-1], order[1:], strict=True)
    }


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"# Where the GPU waits on the host: `{report['settings']['shape']}` shape",
        "",
        f"- **device**: {env['device']}; torch {env['torch']}; lora_lightning sources {env['lora_lightning_sha256']}",
        f"- **batch**: {report['settings']['batch_size']} x {report['settings']['seq_len']} tokens; host: means of the "
        "middle steps, no profiler; device: profiled steps, synchronised each",
        "",
        "| row | host forward | host backward | host optimizer | device after host | step (profiled) | GPU busy "
        "| GPU idle | idle by phase |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        if "error" in r:
            reason = r["error"].splitlines()[-1][-200:].replace("|", "/")
            lines.append(f"| {r['name']} | FAILED: {reason} |" + " |" * 7)
            continue
        h, d = r["host_ms"], r["device_ms"]
        device = ["-"] * 4 if d is None else [f"{d['wall']:.1f}", f"{d['busy']:.1f}", f"{d['idle']:.1f}"]
        if d is not None:
            device.append(", ".join(f"{k} {v:.2f}" for k, v in d["idle_by_phase"].items()) or "none")
        lines.append(
            f"| {r['name']} | {h['forward']:.1f} | {h['backward']:.1f} | {h['optimizer']:.1f} | "
            f"{h['device_after']:.1f} | " + " | ".join(device) + " |"
        )
    lines += ["", "All times in ms per step."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--configs", nargs="+", default=[], help="benchmark row names, e.g. ours:eager:liger")
    parser.add_argument("--out", type=Path, help="folder for idle.json and idle.md")
    parser.add_argument("--host-steps", type=int, default=12, help="unprofiled steps timed for the host split")
    parser.add_argument("--profile-steps", type=int, default=3, help="profiled steps for the device idle (CUDA)")
    parser.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)  # internal: one row, in this process
    args, rest = parser.parse_known_args(argv)  # the rest: benchmark.py's model and batch options
    given = benchmark_args(rest)
    unused = [f"--{option}" for option in ("profile", "merge", "list") if getattr(given, option)]
    if unused:
        parser.error(f"{', '.join(unused)}: options of benchmarks.benchmark that benchmarks.idle does not take")
    settings = settings_from_args(given)
    for option in ("host_steps", "profile_steps"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be >= 1, got {getattr(args, option)}")
    device = resolve_device(settings.device)
    for name in args.configs:
        try:
            parse_row(name)
        except ValueError as err:
            parser.error(str(err))
    if args.row_out is not None:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        record = measure_row(args.configs[0], settings, device, args.host_steps, args.profile_steps)
        args.row_out.write_text(json.dumps(record))
        return 0
    if not args.configs or args.out is None:
        parser.error("give --configs and --out")
    steps = [f"--host-steps={args.host_steps}", f"--profile-steps={args.profile_steps}"]
    rows = [_row_in_subprocess(name, [*steps, *settings.cli_args()]) for name in args.configs]
    report = {"environment": environment(device), "settings": asdict(settings), "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "idle.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = render_markdown(report)
    (args.out / "idle.md").write_text(markdown)
    print(markdown)
    failed = [r["name"] for r in rows if "error" in r]
    if failed:
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _row_in_subprocess(name: str, options: list[str]) -> dict[str, Any]:
    """Row ``name`` measured in a fresh process, as the benchmark measures each row; a failure gives ``{"name",
    "error"}`` with its output's tail, so that one failing row (out of memory, say) loses no other."""
    with tempfile.TemporaryDirectory(prefix="idle-row-") as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, "-m", "benchmarks.idle", f"--configs={name}", f"--row-out={out}", *options]
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
            return {"name": name, "error": f"exit code {done.returncode}: {tail}"}
        return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())

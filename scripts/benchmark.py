#!/usr/bin/env python
"""Training-step benchmark: lora-lightning against PEFT, the frozen-base floor and full fine-tuning.

Every row trains the same randomly initialised ``LlamaForCausalLM`` (built from a config, nothing is
downloaded) on the same batch with the same LoRA settings, and measures one training step (forward with
labels, backward, fused AdamW step, ``zero_grad``) with the device synchronised around it: the median over
``--steps`` steps after ``--warmup`` warm-up steps (the first warm-up step holds ``torch.compile``'s compile
time, which is reported apart).

Rows (``--list`` prints every name; ``--configs`` takes names or shell-style patterns such as ``'ours:*'``):

    <impl>:<mode>[:gc][:drop0.05]
    impl  frozen     base frozen, input-embedding output requires grad: backward runs through every layer (the floor)
          ours       lora_lightning.inject_lora (adapters in the base dtype)
          peft       peft.get_peft_model with its defaults (adapters autocast to fp32)
          peft-bf16  peft.get_peft_model(..., autocast_adapter_dtype=False) (adapters in the base dtype)
          full       full fine-tuning (AdamW states in the base dtype)
    mode  eager | compile (torch.compile of the whole model; the optimizer step stays eager)
    gc    activation checkpointing (non-reentrant) on every decoder layer
    drop  LoRA dropout 0.05 (LoRA rows only; default 0)

Each row runs in its own Python process by default (``--isolation process``) with its own empty
TorchInductor/Triton cache folder, so compile caches and allocator peaks do not leak between rows.
Peak memory is ``torch.cuda.max_memory_allocated`` on CUDA (model weights included); on CPU it is the
growth of the row process's peak RSS from just before the model is built (``/proc/self`` ``VmHWM``
reset through ``clear_refs``; Python and compiler overhead included, so only a rough figure), or
``null`` where that cannot be read.

Writes ``benchmark.json`` and ``benchmark.md`` to ``--out``; step-time and memory ratios are to the
frozen-base row of the same mode and checkpointing setting. Examples::

    python scripts/benchmark.py --shape tiny --out outputs/bench-tiny
    python scripts/benchmark.py --shape llama-1b --configs 'frozen:*' 'ours:*' 'peft*:eager' --out outputs/bench
    python scripts/benchmark.py --merge a/benchmark.json b/benchmark.json --out outputs/bench  # one table of both

``--profile DIR`` also writes a ``torch.profiler`` operator table of 3 extra (untimed) steps per row.
On a shared or busy CPU, ``--threads 1`` gives far steadier CPU figures (two OpenMP threads stall whenever
one of them is descheduled).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # benchmark this checkout's lora_lightning, installed or not
    sys.path.insert(0, str(REPO_ROOT))
IMPLS = ("frozen", "ours", "peft", "peft-bf16", "full")
LORA_IMPLS = frozenset({"ours", "peft", "peft-bf16"})
MODES = ("eager", "compile")
LORA_DROPOUT = 0.05
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
JSON_NAME = "benchmark.json"
MARKDOWN_NAME = "benchmark.md"


@dataclass(frozen=True)
class Shape:
    """A Llama model and batch shape, with its default step counts."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    batch_size: int
    seq_len: int
    dtype: str = "bf16"
    tie_word_embeddings: bool = True
    steps: int = 20
    warmup: int = 5


SHAPES: dict[str, Shape] = {
    # Small enough for a CI smoke run on 2 CPU cores; still GQA, still every projection adaptable at r=16.
    "tiny": Shape(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        batch_size=2,
        seq_len=64,
        steps=10,
        warmup=3,
    ),
    # Llama-3.2-1B (its embeddings are tied), random init.
    "llama-1b": Shape(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        batch_size=4,
        seq_len=2048,
    ),
}


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: an implementation under one mode, checkpointing and dropout setting."""

    impl: str
    mode: str
    checkpointing: bool = False
    dropout: float = 0.0

    @property
    def name(self) -> str:
        parts = [self.impl, self.mode] + (["gc"] if self.checkpointing else [])
        return ":".join(parts + ([f"drop{self.dropout:g}"] if self.dropout else []))

    @property
    def floor(self) -> RowSpec:
        """The frozen-base row this row is compared with."""
        return RowSpec("frozen", self.mode, self.checkpointing)

    @property
    def is_lora(self) -> bool:
        return self.impl in LORA_IMPLS


def all_rows() -> list[RowSpec]:
    """Every row, in table order: by mode, then checkpointing, then implementation, then dropout."""
    rows = []
    for mode in MODES:
        for checkpointing in (False, True):
            for impl in IMPLS:
                for dropout in (0.0, LORA_DROPOUT) if impl in LORA_IMPLS else (0.0,):
                    rows.append(RowSpec(impl, mode, checkpointing, dropout))
    return rows


def select_rows(patterns: Sequence[str]) -> list[RowSpec]:
    """Rows whose names match any of ``patterns`` (exact names or shell-style globs, comma lists allowed)."""
    wanted = [p.strip() for entry in patterns for p in entry.split(",") if p.strip()]
    if not wanted or "all" in wanted:
        return all_rows()
    rows = all_rows()
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unmatched:
        raise ValueError(f"--configs {unmatched} match no row; rows are: {', '.join(r.name for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]


def parse_row(name: str) -> RowSpec:
    for row in all_rows():
        if row.name == name:
            return row
    raise ValueError(f"unknown row {name!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a row needs besides its `RowSpec`; the same for every row of one run."""

    shape: str
    steps: int
    warmup: int
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-4
    seed: int = 0
    isolation: str = "process"
    profile_dir: str | None = None
    threads: int | None = None
    model: dict[str, Any] = field(default_factory=dict)

    def cli_args(self) -> list[str]:
        """The command-line arguments that rebuild these settings in a row process."""
        args = [
            f"--shape={self.shape}",
            f"--steps={self.steps}",
            f"--warmup={self.warmup}",
            f"--device={self.device}",
            f"--dtype={self.dtype}",
            f"--batch-size={self.batch_size}",
            f"--seq-len={self.seq_len}",
            f"--rank={self.r}",
            f"--alpha={self.alpha}",
            f"--lr={self.lr}",
            f"--seed={self.seed}",
        ]
        if self.profile_dir:
            args.append(f"--profile={self.profile_dir}")
        if self.threads:
            args.append(f"--threads={self.threads}")
        return args


# ---------------------------------------------------------------------------------------------------------------
# One row, measured in this process
# ---------------------------------------------------------------------------------------------------------------


def build_model(settings: Settings, device: torch.device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **settings.model,
        max_position_embeddings=max(settings.seq_len, 2048),
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(settings.seed)
    with device:
        model = LlamaForCausalLM(config)
    return model.to(DTYPES[settings.dtype]).train()


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer. Transformers then hooks the input
    embeddings so their output requires grad, for every row alike."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach(row: RowSpec, model: nn.Module, settings: Settings) -> tuple[nn.Module, Callable[[Path], Path] | None]:
    """Set ``model`` up for ``row``; returns the module to train and a function saving its adapter to a
    folder (returning the weights file), or None for rows without one."""
    if row.impl == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, None
    if row.impl == "full":
        return model, None
    if row.impl == "ours":
        from lora_lightning import LoRAConfig, inject_lora, save_adapter

        config = LoRAConfig(
            r=settings.r, alpha=settings.alpha, dropout=row.dropout, target_modules=list(TARGET_MODULES)
        )
        inject_lora(model, config)
        return model, lambda folder: save_adapter(model, folder) / "adapter_model.safetensors"

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=row.dropout,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=row.impl == "peft")

    def save(folder: Path) -> Path:
        peft_model.save_pretrained(folder)
        return folder / "adapter_model.safetensors"

    return peft_model, save


def make_optimizer(params: list[nn.Parameter], lr: float) -> tuple[torch.optim.Optimizer | None, str]:
    if not params:
        return None, "none"
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), "AdamW(fused)"
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, lr=lr, foreach=True), "AdamW(foreach)"


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    if optimizer is None:
        return 0
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])


class MemoryMeter:
    """Peak memory of one row: CUDA allocator peak, or on CPU the growth of this process's peak RSS."""

    def __init__(self, device: torch.device, own_process: bool) -> None:
        self.device = device
        self.baseline: int | None = 0
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif own_process:
            self.kind = "cpu_peak_rss_growth"
            self.baseline = _proc_status_bytes("VmRSS")
        else:  # RSS left behind by earlier rows (and their lazily loaded libraries) would make this meaningless
            self.kind = "not_measured_rows_share_a_process"
            self.baseline = None

    def start(self) -> None:
        """Call once the model is built: resets the peak to what is held now (weights included)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.baseline is not None and not _reset_peak_rss():
            self.baseline = None

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        high = _proc_status_bytes("VmHWM")
        return None if high is None or self.baseline is None else max(high - self.baseline, 0)


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak_rss() -> bool:
    """Set VmHWM back to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _resolve(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``: the CUDA memory-statistics calls need an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_row(row: RowSpec, settings: Settings) -> dict[str, Any]:
    """Build, set up and time one row in this process; returns its JSON record."""
    device = _resolve(torch.device(settings.device))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.empty_cache()
    # Import what the row uses before the memory baseline, so loading libraries is not counted as its memory.
    importlib.import_module("transformers.models.llama.modeling_llama")
    if row.is_lora:
        importlib.import_module("lora_lightning" if row.impl == "ours" else "peft")
    sources = _source_digest(REPO_ROOT / "lora_lightning")  # the code this row measures, edited or not
    meter = MemoryMeter(device, own_process=settings.isolation == "process")
    model = build_model(settings, device)
    if row.checkpointing:
        enable_checkpointing(model)
    net, save_adapter_to = attach(row, model, settings)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, settings.lr)
    step_net = torch.compile(net) if row.mode == "compile" else net
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tokens = torch.randint(
        0, settings.model["vocab_size"], (settings.batch_size, settings.seq_len), generator=generator
    )
    tokens = tokens.to(device)

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
    for _ in range(settings.warmup + settings.steps):
        _sync(device)
        start = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    peak = meter.peak()
    if settings.profile_dir:  # after the timed steps, so profiling overhead never reaches the figures
        profile_steps(row, step, device, Path(settings.profile_dir))

    timed = times[settings.warmup :]
    median_s = statistics.median(timed)
    trainable_bytes = tensor_bytes(params)
    state_bytes = optimizer_state_bytes(optimizer)
    adapter_file_bytes = None
    if save_adapter_to is not None:
        with tempfile.TemporaryDirectory(prefix="bench-adapter-") as tmp:
            adapter_file_bytes = save_adapter_to(Path(tmp) / "adapter").stat().st_size
    hooks = getattr(model, "_require_grads_hooks", None) or getattr(model, "_require_grads_hook", None)
    return {
        "name": row.name,
        "impl": row.impl,
        "mode": row.mode,
        "gradient_checkpointing": row.checkpointing,
        "lora_dropout": row.dropout if row.is_lora else None,
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
        "median_step_ms": 1e3 * median_s,
        "tokens_per_s": settings.batch_size * settings.seq_len / median_s,
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
            _sync(device)
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
    with tempfile.TemporaryDirectory(prefix="bench-row-") as tmp:
        out_file = Path(tmp) / "row.json"
        env = dict(os.environ)
        # An empty compile cache per row: compile time is a cold compile, and nothing carries over.
        env["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "triton")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        command = [sys.executable, str(Path(__file__).resolve()), *settings.cli_args()]
        command += [f"--row={row.name}", f"--row-out={out_file}"]
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
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
    return {
        "name": row.name,
        "impl": row.impl,
        "mode": row.mode,
        "gradient_checkpointing": row.checkpointing,
        "lora_dropout": row.dropout if row.is_lora else None,
        "ok": False,
        "error": error,
    }


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


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        device_name = f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"
        memory = None
    commit, dirty = _git_state()
    return {
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_type": device.type,
        "device_memory_bytes": memory,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "peft": _version("peft"),
        "lightning": _version("lightning") or _version("pytorch_lightning"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "git_commit": commit,
        "git_dirty": dirty,
        "lora_lightning_sha256": _source_digest(REPO_ROOT / "lora_lightning"),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def _version(module: str) -> str | None:
    try:
        return str(importlib.import_module(module).__version__)
    except (ImportError, AttributeError):
        return None


def _source_digest(package: Path) -> str | None:
    """Hash of the package's Python sources, to tie figures to the code measured even with uncommitted changes."""
    files = sorted(package.rglob("*.py"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()[:16]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_state() -> tuple[str | None, bool | None]:
    def git(*args: str) -> str | None:
        try:
            proc = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
        except OSError:
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return commit, None if status is None else bool(status)


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
        "| adapter file | adapters + AdamW raw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        if not r["ok"]:
            last_line = str(r["error"]).strip().splitlines()[-1] if str(r["error"]).strip() else ""
            error = " ".join(last_line.split())[:160].replace("|", "/")
            lines.append(f"| {r['name']} | failed: {error} |  |  |  |  |  |  |  |  |")
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
        "environment": environment(_resolve(torch.device(settings.device))),
        "settings": {**asdict(settings), "target_modules": list(TARGET_MODULES)},
        "rows": records,
    }
    write_report(report, out)
    return report


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
    parser.add_argument("--lr", type=float, default=1e-4)
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
    shape = SHAPES[args.shape]
    model = {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "tie_word_embeddings": shape.tie_word_embeddings,
    }
    return Settings(
        shape=args.shape,
        steps=args.steps or shape.steps,
        warmup=args.warmup or shape.warmup,
        device=args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
        dtype=args.dtype or shape.dtype,
        batch_size=args.batch_size or shape.batch_size,
        seq_len=args.seq_len or shape.seq_len,
        r=args.rank,
        alpha=args.alpha,
        lr=args.lr,
        seed=args.seed,
        isolation=args.isolation,
        profile_dir=str(Path(args.profile).resolve()) if args.profile else None,
        threads=args.threads,
        model=model,
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

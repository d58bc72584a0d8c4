"""Measuring one profile configuration: build it, time its steps, record what it saves for backward (by module,
through forward hooks) and profile it."""

from __future__ import annotations

import gc
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.memory import MemoryMeter, optimizer_state_bytes, tensor_bytes
from benchmarks.profile.classify import PHASE_PREFIX, RANGE_PREFIX, Dims, classify_events, summarize_units
from benchmarks.rows import RowSpec, Settings, attach, make_optimizer
from benchmarks.shapes import DTYPES
from benchmarks.timing import median_ms, synchronize, timed_steps
from lora_lightning import LoRALayer

# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One profiled configuration: a benchmark row under a name of its own."""

    name: str
    impl: str  # "frozen" or "ours"
    mode: str  # "eager" or "compile"
    dropout: float = 0.0

    @property
    def is_lora(self) -> bool:
        return self.impl == "ours"

    @property
    def floor(self) -> str:
        """The name of the frozen-base configuration this one is compared with."""
        return "floor" if self.mode == "eager" else "floor-compile"

    def row(self) -> RowSpec:
        """The benchmark row. ``ours`` is profiled on the per-layer path (``ours-layer``): the attribution of kernels
        to adapted layers and their ranks needs one node per layer; the fused paths' kernels are in the benchmark's
        ``--profile`` tables."""
        return RowSpec("ours-layer" if self.impl == "ours" else self.impl, self.mode, False, self.dropout)


def all_configs(dropout: float) -> dict[str, Config]:
    """Every configuration by name, ``ours-drop`` with LoRA dropout ``dropout``."""
    configs = [
        Config("floor", "frozen", "eager"),
        Config("ours", "ours", "eager"),
        Config("ours-drop", "ours", "eager", dropout),
        Config("floor-compile", "frozen", "compile"),
        Config("ours-compile", "ours", "compile"),
    ]
    return {c.name: c for c in configs}


DEFAULT_CONFIGS = ("floor", "ours", "ours-drop")


# ---------------------------------------------------------------------------------------------------------------
# Module labels: record_function ranges (profile) and a module stack (saved-tensor accounting)
# ---------------------------------------------------------------------------------------------------------------


def adapted_layers(model: nn.Module) -> dict[str, dict[str, int]]:
    """Adapted linear layer name -> ``in`` and ``out`` (of its base layer) and its rank ``r``."""
    return {
        name: {"in": module.base_layer.in_features, "out": module.base_layer.out_features, "r": module.r}
        for name, module in model.named_modules()
        if isinstance(module, LoRALayer) and isinstance(module.base_layer, nn.Linear)
    }


def module_labels(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> label, for the modules that get a range; parts of adapted layers get none."""
    labels: dict[str, str] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        leaf = name.rsplit(".", 1)[-1] if name else type(module).__name__
        cls = type(module).__name__
        if isinstance(module, LoRALayer):
            labels[name] = f"lora:{leaf}"
            skip.append(name)
        elif isinstance(module, nn.Linear):
            labels[name] = f"linear:{leaf}"
        elif isinstance(module, nn.Embedding):
            labels[name] = "embedding"
        elif "Rotary" in cls:
            labels[name] = "rotary"
        elif "Norm" in cls:
            labels[name] = "norm"
        elif "Attention" in cls:
            labels[name] = "attention"
        elif "MLP" in cls:
            labels[name] = "mlp"
        elif leaf in ("act_fn", "act", "activation_fn") or cls in ("SiLU", "GELU", "SiLUActivation", "GELUActivation"):
            labels[name] = "activation"
        elif isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        elif "DecoderLayer" in cls or "Block" in cls:
            labels[name] = "decoder_layer"
        else:
            labels[name] = "model"
    return labels


def group_name(qualified: str | None) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layers.*.self_attn.q_proj``: one row per layer type."""
    if not qualified:
        return "(outside any module)"
    return re.sub(r"\.\d+(?=\.|$)", ".*", qualified.removeprefix("model.").removeprefix("base_model.model."))


class ModuleTracker:
    """Forward hooks on every labelled module: a stack of (name, label) and, if asked, profiler ranges."""

    def __init__(self, model: nn.Module, ranges: bool) -> None:
        self.stack: list[tuple[str, str]] = []
        self.ranges = ranges
        self._open: list[Any] = []
        self.handles = []
        labels = module_labels(model)
        for name, module in model.named_modules():
            label = labels.get(name)
            if label is None:
                continue
            self.handles.append(module.register_forward_pre_hook(self._enter(name, label)))
            self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    def _enter(self, name: str, label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any) -> None:
            self.stack.append((name, label))
            if self.ranges:
                context = torch.profiler.record_function(RANGE_PREFIX + label)
                context.__enter__()
                self._open.append(context)

        return hook

    def _exit(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()
        if self.ranges and self._open:
            self._open.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


# ---------------------------------------------------------------------------------------------------------------
# Saved-for-backward accounting
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SavedRecord:
    key: tuple[Any, ...]
    nbytes: int
    module: str | None
    label: str | None
    is_param: bool
    shape: tuple[int, ...]
    dtype: str


@contextmanager
def record_saved_tensors(model: nn.Module, tracker: ModuleTracker) -> Iterator[list[SavedRecord]]:
    """Every tensor autograd saves inside the block, with the module (innermost labelled one) saving it."""
    params = {_storage_key(t)[0] for t in [*model.parameters(), *model.buffers()]}
    records: list[SavedRecord] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key, nbytes = _storage_key(tensor)
        name, label = tracker.stack[-1] if tracker.stack else (None, None)
        records.append(
            SavedRecord(
                key, nbytes, name, label, key in params, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch.")
            )
        )
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield records


def _storage_key(tensor: torch.Tensor) -> tuple[tuple[Any, ...], int]:
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # tensors without a storage of their own
        return ("id", id(tensor)), tensor.numel() * tensor.element_size()


def summarize_saved(records: Sequence[SavedRecord]) -> dict[str, Any]:
    """Unique activation bytes (each storage once, to the first module that saved it), grouped by module type;
    parameters and buffers apart (saving them costs no memory)."""
    groups: dict[str, dict[str, Any]] = {}
    first_owner: dict[tuple[Any, ...], str] = {}
    param_refs = 0
    for rec in records:
        if rec.is_param:
            param_refs += 1
            continue
        group = group_name(rec.module)
        g = groups.setdefault(group, {"label": rec.label, "unique_bytes": 0, "refs": 0, "instances": set()})
        g["refs"] += 1
        g["instances"].add(rec.module)
        if rec.key not in first_owner:
            first_owner[rec.key] = group
            g["unique_bytes"] += rec.nbytes
    for g in groups.values():
        g["instances"] = len(g["instances"])
    unique = {}
    for rec in records:
        if not rec.is_param:
            unique.setdefault(rec.key, rec.nbytes)
    return {
        "activation_bytes": sum(unique.values()),
        "activation_tensors": len(unique),
        "refs": sum(1 for r in records if not r.is_param),
        "parameter_refs": param_refs,
        "groups": dict(sorted(groups.items(), key=lambda kv: -kv[1]["unique_bytes"])),
    }


def lora_saved_account(
    records: Sequence[SavedRecord], layers: dict[str, dict[str, int]], tokens: int, elem: int
) -> list[dict[str, Any]]:
    """Per adapted layer type: the analytic bytes of ``x`` and ``h``, and from the saved-tensor record whether
    ``x`` is shared with an earlier adapted layer or kept anyway by a module other than an adapter."""
    savers: dict[tuple[Any, ...], list[tuple[str, str | None]]] = defaultdict(list)
    for rec in records:
        if not rec.is_param:
            savers[rec.key].append((rec.module or "", rec.label))
    by_type: dict[str, dict[str, Any]] = {}
    for name, dims in layers.items():
        leaf = name.rsplit(".", 1)[-1]
        x_key = None
        x_bytes_measured = None
        for rec in records:
            if rec.module == name and not rec.is_param and rec.shape and rec.shape[-1] == dims["in"]:
                x_key, x_bytes_measured = rec.key, rec.nbytes
                break
        shared_with = kept_by = None
        if x_key is not None:
            non_adapter = [m for m, lab in savers[x_key] if not (lab or "").startswith("lora:")]
            if non_adapter:
                kept_by = group_name(non_adapter[0])
            else:
                first_adapter = next(m for m, lab in savers[x_key] if (lab or "").startswith("lora:"))
                if first_adapter != name:
                    shared_with = first_adapter.rsplit(".", 1)[-1]
        x_bytes = tokens * dims["in"] * elem
        h_bytes = tokens * dims["r"] * elem
        extra = h_bytes + (0 if (shared_with or kept_by) else x_bytes)
        t = by_type.setdefault(
            leaf,
            {
                "layer": leaf,
                "count": 0,
                "in": dims["in"],
                "out": dims["out"],
                "r": dims["r"],
                "x_bytes": x_bytes,
                "x_bytes_measured": x_bytes_measured,
                "h_bytes": h_bytes,
                "x_shared_with": shared_with,
                "x_kept_by": kept_by,
                "extra_bytes_per_layer": extra,
                "extra_bytes": 0,
            },
        )
        t["count"] += 1
        t["extra_bytes"] += extra
    return list(by_type.values())


# ---------------------------------------------------------------------------------------------------------------
# One configuration
# ---------------------------------------------------------------------------------------------------------------


def measure_config(
    config: Config, settings: Settings, device: torch.device, profile_steps: int, snapshot_dir: Path | None
) -> dict[str, Any]:
    """Build, time, profile and account one configuration in this process (a CUDA memory snapshot of one step
    into ``snapshot_dir`` if given)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    started = time.perf_counter()
    meter = MemoryMeter(device, own_process=False)  # configurations share this process: CUDA figures only
    model = settings.build_model(device)
    net, _ = attach(config.row(), model, settings)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, optimizer_name = make_optimizer(params, settings.lr)
    layers = adapted_layers(net)
    step_net = torch.compile(net) if config.mode == "compile" else net
    tokens = settings.tokens(device)

    def step(after_forward: Callable[[], None] | None = None) -> torch.Tensor:
        with torch.profiler.record_function(PHASE_PREFIX + "forward"):
            loss = step_net(input_ids=tokens, labels=tokens, use_cache=False).loss
        if after_forward is not None:
            after_forward()
        with torch.profiler.record_function(PHASE_PREFIX + "backward"):
            loss.backward()
        if optimizer is not None:
            with torch.profiler.record_function(PHASE_PREFIX + "optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    meter.start()
    times = [seconds for seconds, _ in timed_steps(step, settings.warmup + settings.steps, device)]
    record: dict[str, Any] = {
        "name": config.name,
        "impl": config.impl,
        "mode": config.mode,
        "lora_dropout": config.dropout if config.is_lora else None,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_bytes": tensor_bytes(params),
        "optimizer": optimizer_name,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "first_step_s": times[0],
        "step_ms": [1e3 * t for t in times[settings.warmup :]],
        "median_step_ms": median_ms(times[settings.warmup :]),
        "peak_memory_bytes": meter.peak(),
        "adapted_layers": len(layers),
    }

    # Memory held after the forward pass (saved activations, logits, loss) on top of what was held before it.
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        held: list[int] = []
        step(lambda: (synchronize(device), held.append(torch.cuda.memory_allocated(device))))
        record["allocated_before_forward_bytes"] = before
        record["held_after_forward_bytes"] = held[0] - before
    else:
        record["allocated_before_forward_bytes"] = record["held_after_forward_bytes"] = None

    # Bytes saved for backward, by module (eager only: the hooks would break a compiled graph's tracing).
    dims = Dims(
        ranks=frozenset(d["r"] for d in layers.values()) or frozenset({settings.r}),
        tokens=settings.batch_size * settings.seq_len,
    )
    record["saved"] = None
    record["lora_saved_account"] = None
    if config.mode == "eager":
        tracker = ModuleTracker(net, ranges=False)
        try:
            with record_saved_tensors(net, tracker) as saved_records:
                step()
        finally:
            tracker.remove()
        record["saved"] = summarize_saved(saved_records)
        if layers:
            elem = torch.empty((), dtype=DTYPES[settings.dtype]).element_size()
            record["lora_saved_account"] = lora_saved_account(saved_records, layers, dims.tokens, elem)
        del saved_records
        gc.collect()

    # The profile.
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tracker = ModuleTracker(net, ranges=True) if config.mode == "eager" else None
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(profile_steps):
                step()
            synchronize(device)
    finally:
        if tracker is not None:
            tracker.remove()
    parse_start = time.perf_counter()
    units, unclaimed = classify_events(prof.events(), device.type, dims, config.mode == "compile")
    record["profile"] = summarize_units(units, unclaimed, profile_steps)
    record["profile"]["time_kind"] = "CUDA kernel time" if device.type == "cuda" else "CPU operator self time"
    record["profile_parse_s"] = time.perf_counter() - parse_start

    if snapshot_dir is not None and device.type == "cuda":
        record["memory_snapshot"] = write_memory_snapshot(
            step, device, snapshot_dir / f"memory_snapshot_{config.name}.pickle"
        )

    record["wall_s"] = time.perf_counter() - started
    return record  # the model and optimizer go with this frame; main() collects and empties the cache


def write_memory_snapshot(step: Callable[[], torch.Tensor], device: torch.device, target: Path) -> str | None:
    """A CUDA memory snapshot of one step into ``target`` (for https://pytorch.org/memory_viz); its file name,
    or why it failed."""
    try:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        step()
        synchronize(device)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(target))
        return target.name
    except Exception as err:  # a by-product: never lose the config over it
        return f"failed: {type(err).__name__}: {err}"
    finally:
        with suppress(Exception):
            torch.cuda.memory._record_memory_history(enabled=None)

#!/usr/bin/env python
"""Where a LoRA training step's extra time and memory go, next to the frozen-base floor.

For one model and batch shape (``scripts/benchmark.py``'s shapes and model builders), this builds in turn

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
(forward: a ``record_function`` range that this script opens around every module through forward hooks,
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
Examples::

    python scripts/profile_step.py --shape tiny --device cpu --out outputs/profile-tiny
    PYTHONPATH=$PWD python scripts/profile_step.py --shape llama-1b --out outputs/profile-llama1b
    PYTHONPATH=$PWD python scripts/profile_step.py --shape llama-1b --configs floor-compile ours-compile \\
        --out outputs/profile-llama1b-compile
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

SCRIPTS = Path(__file__).resolve().parent
JSON_NAME = "profile.json"
MARKDOWN_NAME = "profile.md"
MIB = 2**20
GIB = 2**30
# Issue 7's targets, as ratios.
TARGETS = {"eager_step": 1.10, "eager_peak": 1.05, "dropout_cost": 0.05, "compiled_step": 1.10}


def load_benchmark() -> ModuleType:
    """scripts/benchmark.py as a module (it puts this checkout's lora_lightning first on sys.path)."""
    name = "lora_benchmark_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / "benchmark.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()

# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    name: str
    impl: str  # "frozen" or "ours"
    mode: str  # "eager" or "compile"
    dropout: float = 0.0

    @property
    def is_lora(self) -> bool:
        return self.impl == "ours"

    @property
    def floor(self) -> str:
        return "floor" if self.mode == "eager" else "floor-compile"

    def row(self):
        return bench.RowSpec(self.impl, self.mode, False, self.dropout)


def all_configs(dropout: float) -> dict[str, Config]:
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
# Categories
# ---------------------------------------------------------------------------------------------------------------

CATEGORIES: dict[str, str] = {
    "base_gemm_forward": "base GEMMs, forward",
    "base_gemm_input_grad": "base GEMMs, input gradient",
    "lora_x_at": "LoRA GEMM x A^T",
    "lora_h_bt": "LoRA GEMM h B^T (into the base output)",
    "lora_grad_b": "LoRA GEMM grad B = g^T h",
    "lora_grad_h": "LoRA GEMM grad h = g B",
    "lora_grad_a": "LoRA GEMM grad A = gh^T x",
    "lora_grad_x": "LoRA GEMM grad x through A (gh A)",
    "lora_grad_b_or_h": "LoRA GEMM grad B or grad h (same shape)",
    "elementwise_accumulate": "elementwise / accumulate",
    "dropout": "dropout",
    "attention": "attention (sdpa, rotary, head reshapes)",
    "norms_activations": "norms / activations (RMSNorm, SiLU, gate*up)",
    "inductor_fused": "Inductor fused kernels (compiled only)",
    "optimizer": "optimizer step",
    "other": "other (embedding, residuals, lm-head loss, framework)",
}
LORA_GEMMS = ("lora_x_at", "lora_h_bt", "lora_grad_b", "lora_grad_h", "lora_grad_a", "lora_grad_x", "lora_grad_b_or_h")
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::addmm_", "aten::_addmm_activation"})
GEMM_WRAPPERS = frozenset({"aten::linear", "aten::matmul"})  # composites: their GEMM is a child operator
RANGE_PREFIX = "mod::"
PHASE_PREFIX = "profile_step::"
EVALUATE = "autograd::engine::evaluate_function: "


@dataclass(frozen=True)
class Dims:
    """What the shape rules need: the LoRA ranks and the number of tokens in the batch."""

    ranks: frozenset[int]
    tokens: int


def gemm_role(shapes: Sequence[Sequence[int]], strides: Sequence[Any] | None, op: str, phase: str, dims: Dims) -> str:
    """The role of a matrix product inside a (LoRA or frozen) linear layer, from its operand shapes."""
    first_index = 1 if op in ("aten::addmm", "aten::addmm_", "aten::_addmm_activation") else 0  # (self, m1, m2)
    operands = list(shapes[first_index : first_index + 2])
    if len(operands) < 2 or not all(isinstance(s, (list, tuple)) and len(s) == 2 for s in operands):
        return "base_gemm_forward" if phase == "forward" else "base_gemm_input_grad"
    (m, k), (_, n) = operands
    r = dims.ranks
    if not ({m, k, n} & r):
        return "base_gemm_forward" if phase == "forward" else "base_gemm_input_grad"
    if phase == "forward":
        return "lora_h_bt" if k in r else "lora_x_at"
    if k in r:
        return "lora_grad_x"
    if m in r:
        return "lora_grad_a"
    # n is a rank: [out,T]x[T,r] (grad B, first operand g^T) or [T,out]x[out,r] (grad h, first operand g).
    if m != dims.tokens and k == dims.tokens:
        return "lora_grad_b"
    if m == dims.tokens and k != dims.tokens:
        return "lora_grad_h"
    stride = _operand_strides(strides, first_index)
    if stride is not None and len(stride) == 2:
        return "lora_grad_b" if stride[1] != 1 else "lora_grad_h"  # g^T is a transposed view
    return "lora_grad_b_or_h"


def _operand_strides(strides: Sequence[Any] | None, index: int) -> list[int] | None:
    if not strides or index >= len(strides):
        return None
    value = strides[index]
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def fallback_category(names: Sequence[str]) -> str | None:
    """A category from operator/kernel names alone (units without a module label, compiled graphs)."""
    text = " ".join(names).lower()
    if any(w in text for w in ("dropout", "bernoulli", "philox")):
        return "dropout"
    if any(w in text for w in ("scaled_dot_product", "flash", "fmha", "efficient_attention", "cudnn_attention")):
        return "attention"
    if re.search(r"\btriton_|triton_(poi|red|per|tem)_", text):
        if "rsqrt" in text or "silu" in text or "sigmoid" in text or "gelu" in text:
            return "norms_activations"
        if "rand" in text:
            return "dropout"
        return "inductor_fused"
    if "fused_adam" in text or "optimizer" in text:
        return "optimizer"
    return None


@dataclass
class Unit:
    """One piece of measured time: a kernel (CUDA) or an operator's self time (CPU)."""

    name: str  # kernel name (CUDA) or operator name (CPU)
    time_us: float
    phase: str
    label: str | None
    node: str | None
    op: str
    category: str
    count: int = 1  # 0 for a CPU operator called inside another operator (its time counts, the call not)


# ---------------------------------------------------------------------------------------------------------------
# Module labels: record_function ranges (profile) and a module stack (saved-tensor accounting)
# ---------------------------------------------------------------------------------------------------------------


def is_adapted(module: nn.Module) -> bool:
    """A LoRA layer, found structurally: a ``base_layer`` plus ``lora_*`` parameters of its own."""
    return hasattr(module, "base_layer") and any(n.startswith("lora_") for n, _ in module.named_parameters())


def adapted_layers(model: nn.Module) -> dict[str, dict[str, int]]:
    """Adapted layer name -> ``in``, ``out`` and ``r`` (from the base weight and the ``lora_A`` factor)."""
    layers = {}
    for name, module in model.named_modules():
        if not is_adapted(module):
            continue
        base = module.base_layer
        a = next((p for n, p in module.named_parameters() if n.startswith("lora_A")), None)
        if a is None or not isinstance(base, nn.Linear):
            continue
        layers[name] = {"in": base.in_features, "out": base.out_features, "r": int(min(a.shape))}
    return layers


def module_labels(model: nn.Module) -> dict[str, str]:
    """Qualified module name -> label, for the modules that get a range; parts of adapted layers get none."""
    labels: dict[str, str] = {}
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in skip):
            continue
        leaf = name.rsplit(".", 1)[-1] if name else type(module).__name__
        cls = type(module).__name__
        if is_adapted(module):
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
# Profile parsing
# ---------------------------------------------------------------------------------------------------------------


def _chain(event: Any) -> list[Any]:
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    return chain


def _is_device_event(event: Any) -> bool:
    return event.device_type != torch.autograd.DeviceType.CPU


def classify_events(events: Sequence[Any], device_type: str, dims: Dims, compiled: bool) -> tuple[list[Unit], float]:
    """Turn profiler events into units; returns them and the device time no CPU operator claimed (CUDA)."""
    cpu_events = [e for e in events if not _is_device_event(e)]
    # Forward operators by autograd sequence number -> module label (the last operator with a number is
    # the one that created the node; earlier ones only peeked at the counter).
    forward_labels: dict[int, str | None] = {}
    for event in sorted(cpu_events, key=lambda e: e.time_range.start):
        seq = getattr(event, "sequence_nr", -1)
        if seq is None or seq < 0:
            continue
        chain = _chain(event)
        if _phase(chain) != "forward":
            continue
        forward_labels[seq] = _range_label(chain)

    units: list[Unit] = []
    claimed = 0.0
    for event in cpu_events:
        if getattr(event, "is_async", False):
            continue
        if device_type == "cuda":
            kernels = [(k.name, float(k.duration)) for k in getattr(event, "kernels", [])]
            if not kernels:
                continue
        else:
            kernels = [(event.name, float(event.self_cpu_time_total))]
        chain = _chain(event)
        phase = _phase(chain)
        node, accumulate = _backward_node(chain)
        if phase == "backward" and node is not None:
            label = forward_labels.get(node[1]) if node[1] >= 0 else None
        else:
            label = _range_label(chain)
        count = 1
        if device_type != "cuda":  # count outermost operator calls, not the operators they call
            inner = False
            for parent in chain[1:]:
                if parent.name.startswith((RANGE_PREFIX, PHASE_PREFIX, EVALUATE)):
                    break
                inner = inner or _is_operator(parent.name)
            count = int(_is_operator(event.name) and not inner)
        for name, duration in kernels:
            name = re.sub(r"CompiledFxGraph \w+", "CompiledFxGraph", name)  # one name across runs
            claimed += duration
            category = _category(event, chain, name, phase, label, node, accumulate, dims, compiled, device_type)
            units.append(Unit(name, duration, phase, label, node[0] if node else None, event.name, category, count))
    unclaimed = 0.0
    if device_type == "cuda":
        device_total = sum(
            e.time_range.elapsed_us()
            for e in events
            if _is_device_event(e)
            and not getattr(e, "is_user_annotation", False)  # GPU-side spans of record_function ranges
            and not getattr(e, "is_async", False)
            and not e.name.startswith((RANGE_PREFIX, PHASE_PREFIX))
        )
        unclaimed = max(device_total - claimed, 0.0)
    return units, unclaimed


def _is_operator(name: str) -> bool:
    return "::" in name and not name.startswith((RANGE_PREFIX, PHASE_PREFIX, "autograd::", "torch::autograd::"))


def _phase(chain: Sequence[Any]) -> str:
    names = [e.name for e in chain]
    if any(n.startswith(EVALUATE) for n in names):
        return "backward"
    for n in names:
        if n.startswith(PHASE_PREFIX):
            return n.removeprefix(PHASE_PREFIX)
    return "other"


def _range_label(chain: Sequence[Any]) -> str | None:
    for event in chain:
        if event.name.startswith(RANGE_PREFIX):
            return event.name.removeprefix(RANGE_PREFIX)
    return None


def _backward_node(chain: Sequence[Any]) -> tuple[tuple[str, int] | None, bool]:
    """The autograd node running this unit (name, sequence number), and whether the unit is the engine summing
    gradients into a node's input buffer (directly under ``evaluate_function``, outside the node itself)."""
    for i, event in enumerate(chain):
        if event.name.startswith(EVALUATE):
            node = event.name.removeprefix(EVALUATE)
            below = chain[i - 1].name if i > 0 else None
            seq = getattr(event, "sequence_nr", -1)
            return (node, -1 if seq is None else seq), below is not None and below != node
    return None, False


def _category(
    event: Any,
    chain: Sequence[Any],
    unit_name: str,
    phase: str,
    label: str | None,
    node: tuple[str, int] | None,
    accumulate: bool,
    dims: Dims,
    compiled: bool,
    device_type: str,
) -> str:
    if phase == "optimizer":
        return "optimizer"
    op_names = [e.name for e in chain]
    stop = next((i for i, n in enumerate(op_names) if n.startswith((RANGE_PREFIX, EVALUATE))), len(op_names))
    ops = [n.lower() for n in op_names[:stop]]
    if any("dropout" in n or "bernoulli" in n for n in ops):
        return "dropout"
    if device_type == "cpu" and not _is_operator(event.name):
        return "other"  # Python and framework time between operators (CPU only)
    if accumulate or (node is not None and "AccumulateGrad" in node[0]):
        return "elementwise_accumulate"
    kind = (label or "").split(":", 1)[0]
    gemm = _find_gemm(chain[:stop])
    if gemm is not None and kind in ("lora", "linear", ""):
        shapes = getattr(gemm, "input_shapes", None) or []
        strides = getattr(gemm, "structured_input_strides", None)
        if not kind and not _has_rank(shapes, dims) and fallback_category([unit_name, *op_names]) == "attention":
            return "attention"
        return gemm_role(shapes, strides, gemm.name, phase, dims)
    if kind == "lora":
        return "dropout" if "addcmul" in event.name else "elementwise_accumulate"
    if kind in ("attention", "rotary"):
        return "attention"
    if kind in ("norm", "activation", "mlp"):
        return "norms_activations"
    guess = fallback_category([unit_name, *op_names])
    if guess is not None and (compiled or guess in ("attention", "dropout", "optimizer") or not kind):
        return guess
    return "other"


def _find_gemm(chain: Sequence[Any]) -> Any | None:
    """The GEMM operator this unit belongs to: itself or an enclosing one, or (CPU: the self time of ``linear``,
    ``matmul`` and their ``t``/``view`` children) the GEMM inside an enclosing composite."""
    for event in chain:
        if event.name in GEMM_OPS:
            return event
    for event in chain:
        if event.name in GEMM_WRAPPERS:
            todo = list(event.cpu_children)
            while todo:
                child = todo.pop(0)
                if child.name in GEMM_OPS:
                    return child
                todo.extend(child.cpu_children)
    return None


def _has_rank(shapes: Sequence[Any], dims: Dims) -> bool:
    return any(isinstance(s, (list, tuple)) and set(s) & dims.ranks for s in shapes)


def summarize_units(units: Sequence[Unit], unclaimed_us: float, steps: int) -> dict[str, Any]:
    """Per-step totals: by category, by phase, by kernel name, and LoRA costs by adapted layer."""
    categories = {c: {"time_ms": 0.0, "count": 0.0} for c in CATEGORIES}
    phases: dict[str, float] = defaultdict(float)
    kernels: dict[str, dict[str, Any]] = {}
    by_layer: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for u in units:
        ms = u.time_us / 1e3 / steps
        categories[u.category]["time_ms"] += ms
        categories[u.category]["count"] += u.count / steps
        phases[u.phase] += ms
        k = kernels.setdefault(u.name, {"time_ms": 0.0, "count": 0.0, "categories": defaultdict(float)})
        k["time_ms"] += ms
        k["count"] += u.count / steps
        k["categories"][u.category] += ms
        if u.label and u.label.startswith("lora:") and not u.category.startswith("base_gemm"):
            by_layer[u.label.removeprefix("lora:")][u.category] += ms
    for k in kernels.values():
        k["categories"] = dict(k["categories"])
        k["category"] = max(k["categories"], key=k["categories"].get)
    return {
        "total_ms": sum(c["time_ms"] for c in categories.values()),
        # device time the profiler linked to no CPU operator (should be about 0; not in any category)
        "unclaimed_device_ms": unclaimed_us / 1e3 / steps,
        "categories": categories,
        "phases": dict(phases),
        "kernels": kernels,
        "lora_by_layer": {name: dict(v) for name, v in sorted(by_layer.items())},
    }


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_config(config: Config, settings: Any, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Build, time, profile and account one configuration in this process."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    model = bench.build_model(settings, device)
    net, _ = bench.attach(config.row(), model, settings)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer, optimizer_name = bench.make_optimizer(params, settings.lr)
    layers = adapted_layers(net)
    step_net = torch.compile(net) if config.mode == "compile" else net
    generator = torch.Generator().manual_seed(settings.seed + 1)
    tokens = torch.randint(
        0, settings.model["vocab_size"], (settings.batch_size, settings.seq_len), generator=generator
    )
    tokens = tokens.to(device)

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

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    record: dict[str, Any] = {
        "name": config.name,
        "impl": config.impl,
        "mode": config.mode,
        "lora_dropout": config.dropout if config.is_lora else None,
        "trainable_params": sum(p.numel() for p in params),
        "trainable_bytes": bench.tensor_bytes(params),
        "optimizer": optimizer_name,
        "optimizer_state_bytes": bench.optimizer_state_bytes(optimizer),
        "first_step_s": times[0],
        "step_ms": [1e3 * t for t in times[args.warmup :]],
        "median_step_ms": 1e3 * statistics.median(times[args.warmup :]),
        "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "adapted_layers": len(layers),
    }

    # Memory held after the forward pass (saved activations, logits, loss) on top of what was held before it.
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        held: list[int] = []
        step(lambda: (_sync(device), held.append(torch.cuda.memory_allocated(device))))
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
            elem = torch.empty((), dtype=bench.DTYPES[settings.dtype]).element_size()
            record["lora_saved_account"] = lora_saved_account(saved_records, layers, dims.tokens, elem)
        del saved_records
        gc.collect()

    # The profile.
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tracker = ModuleTracker(net, ranges=True) if config.mode == "eager" else None
    try:
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(args.profile_steps):
                step()
            _sync(device)
    finally:
        if tracker is not None:
            tracker.remove()
    parse_start = time.perf_counter()
    units, unclaimed = classify_events(prof.events(), device.type, dims, config.mode == "compile")
    record["profile"] = summarize_units(units, unclaimed, args.profile_steps)
    record["profile"]["time_kind"] = "CUDA kernel time" if device.type == "cuda" else "CPU operator self time"
    record["profile_parse_s"] = time.perf_counter() - parse_start

    if args.memory_snapshot and device.type == "cuda":
        record["memory_snapshot"] = write_memory_snapshot(
            step, device, Path(args.out) / f"memory_snapshot_{config.name}.pickle"
        )

    record["wall_s"] = time.perf_counter() - started
    return record  # the model and optimizer go with this frame; main() collects and empties the cache


def write_memory_snapshot(step: Callable[[], torch.Tensor], device: torch.device, target: Path) -> str | None:
    try:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
        step()
        _sync(device)
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(target))
        return target.name
    except Exception as err:  # a by-product: never lose the config over it
        return f"failed: {type(err).__name__}: {err}"
    finally:
        with suppress(Exception):
            torch.cuda.memory._record_memory_history(enabled=None)


# ---------------------------------------------------------------------------------------------------------------
# Comparisons and the report
# ---------------------------------------------------------------------------------------------------------------


def category_delta(base: dict[str, Any], other: dict[str, Any]) -> dict[str, dict[str, float]]:
    b, o = base["profile"]["categories"], other["profile"]["categories"]
    return {
        c: {
            "base_ms": b[c]["time_ms"],
            "other_ms": o[c]["time_ms"],
            "delta_ms": o[c]["time_ms"] - b[c]["time_ms"],
            "base_count": b[c]["count"],
            "other_count": o[c]["count"],
        }
        for c in CATEGORIES
    }


def kernel_delta(base: dict[str, Any], other: dict[str, Any], top: int) -> list[dict[str, Any]]:
    """Kernels (CPU: operators) that are new in ``other`` or whose total time grew, largest growth first."""
    b, o = base["profile"]["kernels"], other["profile"]["kernels"]
    rows = []
    for name, k in o.items():
        old = b.get(name)
        delta = k["time_ms"] - (old["time_ms"] if old else 0.0)
        if delta <= 0:
            continue
        rows.append(
            {
                "kernel": name,
                "category": k["category"],  # where most of its time in `other` went; all of it under "categories"
                "categories": k["categories"],
                "base_ms": old["time_ms"] if old else 0.0,
                "base_count": old["count"] if old else 0,
                "other_ms": k["time_ms"],
                "other_count": k["count"],
                "delta_ms": delta,
                "new": old is None,
            }
        )
    rows.sort(key=lambda r: -r["delta_ms"])
    return rows[:top]


def saved_delta(base: dict[str, Any], other: dict[str, Any]) -> list[dict[str, Any]]:
    groups = sorted(set(base["saved"]["groups"]) | set(other["saved"]["groups"]))
    rows = []
    for g in groups:
        b = base["saved"]["groups"].get(g, {"unique_bytes": 0, "refs": 0})
        o = other["saved"]["groups"].get(g, {"unique_bytes": 0, "refs": 0})
        rows.append(
            {
                "module": g,
                "base_bytes": b["unique_bytes"],
                "other_bytes": o["unique_bytes"],
                "delta_bytes": o["unique_bytes"] - b["unique_bytes"],
                "base_refs": b["refs"],
                "other_refs": o["refs"],
            }
        )
    rows.sort(key=lambda r: (-abs(r["delta_bytes"]), -r["other_bytes"]))
    return rows


def comparisons(records: dict[str, dict[str, Any]], top: int) -> list[dict[str, Any]]:
    pairs = [("floor", "ours"), ("floor", "ours-drop"), ("ours", "ours-drop"), ("floor-compile", "ours-compile")]
    out = []
    for base_name, other_name in pairs:
        base, other = records.get(base_name), records.get(other_name)
        if base is None or other is None:
            continue
        comp: dict[str, Any] = {
            "base": base_name,
            "other": other_name,
            "step_ms": [base["median_step_ms"], other["median_step_ms"]],
            "step_ratio": other["median_step_ms"] / base["median_step_ms"],
            "device_ms": [base["profile"]["total_ms"], other["profile"]["total_ms"]],
            "categories": category_delta(base, other),
            "top_kernels": kernel_delta(base, other, top),
        }
        peaks = base["peak_memory_bytes"], other["peak_memory_bytes"]
        comp["peak_bytes"] = list(peaks)
        comp["peak_ratio"] = peaks[1] / peaks[0] if all(peaks) else None
        if base["saved"] and other["saved"]:
            comp["saved_bytes"] = [base["saved"]["activation_bytes"], other["saved"]["activation_bytes"]]
            comp["saved_by_module"] = saved_delta(base, other)
        out.append(comp)
    return out


def memory_account(records: dict[str, dict[str, Any]], device_type: str) -> dict[str, Any] | None:
    floor, ours = records.get("floor"), records.get("ours")
    if not floor or not ours or not ours.get("lora_saved_account"):
        return None
    rows = ours["lora_saved_account"]
    analytic_saved = sum(r["extra_bytes"] for r in rows)
    x_bytes = sum(r["count"] * (0 if (r["x_shared_with"] or r["x_kept_by"]) else r["x_bytes"]) for r in rows)
    h_bytes = sum(r["count"] * r["h_bytes"] for r in rows)
    adapters = ours["trainable_bytes"] + ours["optimizer_state_bytes"]
    saved_delta_bytes = ours["saved"]["activation_bytes"] - floor["saved"]["activation_bytes"]
    adapter_groups = {g: v for g, v in ours["saved"]["groups"].items() if (v["label"] or "").startswith("lora:")}
    measured_adapters = sum(v["unique_bytes"] for v in adapter_groups.values())
    others = []
    for group in sorted(set(floor["saved"]["groups"]) | set(ours["saved"]["groups"])):
        if group in adapter_groups:
            continue
        delta = ours["saved"]["groups"].get(group, {}).get("unique_bytes", 0) - floor["saved"]["groups"].get(
            group, {}
        ).get("unique_bytes", 0)
        if delta:
            others.append({"module": group, "delta_bytes": delta})
    others.sort(key=lambda r: -abs(r["delta_bytes"]))
    account = {
        "layers": rows,
        "analytic_saved_bytes": analytic_saved,
        "analytic_x_bytes": x_bytes,
        "analytic_h_bytes": h_bytes,
        "adapters_and_optimizer_bytes": adapters,
        "analytic_total_bytes": analytic_saved + adapters,
        "measured_saved_delta_bytes": saved_delta_bytes,
        # first saved by the adapted layers themselves (the analytic figure, measured)
        "measured_adapter_saved_bytes": measured_adapters,
        # every other module, ours minus floor (e.g. the first layer's norm: its input needs no gradient in ours)
        "measured_other_modules_delta_bytes": saved_delta_bytes - measured_adapters,
        "other_modules_delta": others,
        "measured_peak_delta_bytes": None,
        "measured_held_after_forward_delta_bytes": None,
    }
    if device_type == "cuda":
        account["measured_peak_delta_bytes"] = ours["peak_memory_bytes"] - floor["peak_memory_bytes"]
        account["measured_held_after_forward_delta_bytes"] = (
            ours["held_after_forward_bytes"] - floor["held_after_forward_bytes"]
        )
    return account


def _ms(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 100 else f"{value:.1f}"


def _signed(value: float) -> str:
    return ("+" if value >= 0 else "") + _ms(value)


def _mib(value: int | float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= GIB:
        return f"{value / GIB:.2f} GiB"
    if abs(value) >= MIB:
        return f"{value / MIB:.1f} MiB"
    return f"{value / 1024:.1f} KiB"


def _signed_mib(value: int | float) -> str:
    return ("+" if value >= 0 else "-") + _mib(abs(value))


def _count(value: float) -> str:
    return f"{value:.0f}" if abs(value - round(value)) < 0.05 else f"{value:.1f}"


def where_it_goes(report: dict[str, Any]) -> list[str]:
    """Paragraphs generated from the numbers: the time gap, the dropout cost, compiled, the memory gap."""
    records = report["configs"]
    comps = {(c["base"], c["other"]): c for c in report["comparisons"]}
    unit = "kernel" if report["environment"]["device_type"] == "cuda" else "CPU operator"
    busy = "device kernel time" if unit == "kernel" else "CPU operator time"
    paragraphs = []

    def top_categories(comp: dict[str, Any], n: int = 4) -> str:
        parts = []
        for c, v in sorted(comp["categories"].items(), key=lambda kv: -kv[1]["delta_ms"])[:n]:
            if v["delta_ms"] <= 0:
                break
            extra = v["other_count"] - v["base_count"]
            more = f" ({_count(abs(extra))} {'more' if extra > 0 else 'fewer'} {unit}s)" if round(extra, 1) else ""
            parts.append(f"{CATEGORIES[c]} {_signed(v['delta_ms'])} ms{more}")
        return "; ".join(parts) if parts else "none"

    comp = comps.get(("floor", "ours"))
    if comp:
        gap = comp["step_ms"][1] - comp["step_ms"][0]
        dev_gap = comp["device_ms"][1] - comp["device_ms"][0]
        lora_gemm = sum(comp["categories"][c]["delta_ms"] for c in LORA_GEMMS)
        target_ms = TARGETS["eager_step"] * comp["step_ms"][0]
        text = (
            f"**Eager time.** Ours takes {_ms(comp['step_ms'][1])} ms a step against the floor's "
            f"{_ms(comp['step_ms'][0])} ms ({comp['step_ratio']:.2f}x, {_signed(gap)} ms; wall time, median of "
            f"{report['settings']['steps']} unprofiled steps). The profiled {busy} changes by {_signed(dev_gap)} ms "
            f"({_ms(comp['device_ms'][0])} -> {_ms(comp['device_ms'][1])} ms). The LoRA GEMMs add "
            f"{_signed(lora_gemm)} ms; by category the largest additions are: {top_categories(comp)}."
        )
        base_gemm = (
            comp["categories"]["base_gemm_forward"]["delta_ms"] + comp["categories"]["base_gemm_input_grad"]["delta_ms"]
        )
        text += f" The base GEMMs change by {_signed(base_gemm)} ms (the same products in both, so about 0)."
        if unit == "kernel":
            busy_share = [d / w for d, w in zip(comp["device_ms"], comp["step_ms"], strict=True)]
            text += f" Kernels fill {busy_share[0]:.0%} of the floor's wall time and {busy_share[1]:.0%} of ours'."
            idle = gap - dev_gap
            if idle > 0.05 * max(gap, 1e-9):
                text += (
                    f" The other {_ms(idle)} ms of the wall-time gap is not kernel time: the GPU waits for the CPU "
                    f"(Python and launch overhead of the adapter calls)."
                )
            else:
                text += " Kernel time covers the wall-time gap: the step is device-bound."
        text += f" Issue 7's target ({TARGETS['eager_step']:.2f}x) is {_ms(target_ms)} ms: " + (
            "met." if comp["step_ms"][1] <= target_ms else f"{_ms(comp['step_ms'][1] - target_ms)} ms to go."
        )
        ours = records["ours"]["profile"]["lora_by_layer"]
        if ours:
            totals = sorted(((sum(v.values()), name) for name, v in ours.items()), reverse=True)
            text += " By adapted layer, ours' adapter work is " + ", ".join(f"{n} {_ms(t)} ms" for t, n in totals) + "."
        paragraphs.append(text)

    comp = comps.get(("ours", "ours-drop"))
    if comp:
        cost = comp["step_ratio"] - 1
        drop = comp["categories"]["dropout"]
        rate = records["ours-drop"]["lora_dropout"]
        text = (
            f"**Dropout {rate:g}.** It costs {_signed(comp['step_ms'][1] - comp['step_ms'][0])} ms "
            f"({cost:+.1%} over dropout 0; target {TARGETS['dropout_cost']:.0%}). The {busy} changes by "
            f"{_signed(comp['device_ms'][1] - comp['device_ms'][0])} ms: dropout {unit}s {_ms(drop['other_ms'])} ms in "
            f"{_count(drop['other_count'])} {unit}s (mask drawn in forward, replayed in backward, masked input "
            f"gradient), and by category: {top_categories(comp)}."
        )
        peaks = comp["peak_bytes"]
        if all(p is not None for p in peaks):
            text += f" Peak memory changes by {_signed_mib(peaks[1] - peaks[0])}."
        paragraphs.append(text)

    comp = comps.get(("floor-compile", "ours-compile"))
    if comp:
        gap = comp["step_ms"][1] - comp["step_ms"][0]
        dev_gap = comp["device_ms"][1] - comp["device_ms"][0]
        text = (
            f"**Compiled.** Ours takes {_ms(comp['step_ms'][1])} ms against {_ms(comp['step_ms'][0])} ms "
            f"({comp['step_ratio']:.2f}x; target {TARGETS['compiled_step']:.2f}x); the {busy} changes by "
            f"{_signed(dev_gap)} ms: {top_categories(comp)}."
        )
        if unit == "kernel" and gap - dev_gap > 0.05 * max(gap, 1e-9):
            text += f" {_ms(gap - dev_gap)} ms of the gap is not kernel time."
        paragraphs.append(text)

    account = report.get("memory_account")
    if account:
        rows = sorted(account["layers"], key=lambda r: -r["extra_bytes"])
        parts = []
        for r in rows:
            why = ""
            if r["x_shared_with"]:
                why = f", x shared with {r['x_shared_with']}"
            elif r["x_kept_by"]:
                why = f", x already kept by {r['x_kept_by']}"
            parts.append(
                f"{r['layer']} {_mib(r['extra_bytes'])} ({r['count']} x {_mib(r['extra_bytes_per_layer'])}{why})"
            )
        text = (
            f"**Memory.** What LoRA must keep for backward that the floor does not, counted analytically: "
            f"{_mib(account['analytic_saved_bytes'])} (inputs x {_mib(account['analytic_x_bytes'])}, h = x A^T "
            f"{_mib(account['analytic_h_bytes'])}): " + "; ".join(parts) + ". "
            f"The saved-tensor hooks measure {_mib(account['measured_adapter_saved_bytes'])} first saved by the "
            f"adapted layers and {_signed_mib(account['measured_saved_delta_bytes'])} of activations saved for "
            f"backward over the floor in all"
        )
        if account["other_modules_delta"]:
            first = account["other_modules_delta"][0]
            text += (
                f" (other modules {_signed_mib(account['measured_other_modules_delta_bytes'])}, mostly "
                f"`{first['module']}` {_signed_mib(first['delta_bytes'])})"
            )
        text += f". Adapters and their AdamW state add {_mib(account['adapters_and_optimizer_bytes'])}."
        if account["measured_peak_delta_bytes"] is not None:
            peak = account["measured_peak_delta_bytes"]
            rest = peak - account["measured_saved_delta_bytes"] - account["adapters_and_optimizer_bytes"]
            floor_peak = records["floor"]["peak_memory_bytes"]
            target = TARGETS["eager_peak"] * floor_peak
            ratio = records["ours"]["peak_memory_bytes"] / floor_peak
            text += (
                f" The measured peak grows by {_signed_mib(peak)} ({ratio:.2f}x), memory held after forward by "
                f"{_signed_mib(account['measured_held_after_forward_delta_bytes'])}; {_signed_mib(rest)} of the peak "
                "gap is neither saved activations nor adapter and optimizer state (gradients and backward temporaries "
                f"alive at the peak). The {TARGETS['eager_peak']:.2f}x target allows {_mib(target - floor_peak)} over "
                "the floor."
            )
        paragraphs.append(text)
    return paragraphs


def render_markdown(report: dict[str, Any]) -> str:
    env, settings = report["environment"], report["settings"]
    records = report["configs"]
    model = settings["model"]
    unit = "kernels" if env["device_type"] == "cuda" else "ops"
    time_kind = "CUDA kernel time" if env["device_type"] == "cuda" else "CPU operator self time"
    commit = (env["git_commit"] or "no commit")[:12] + (" (uncommitted changes)" if env["git_dirty"] else "")
    lines = [
        f"# Where a LoRA step's time and memory go: `{settings['shape']}` shape",
        "",
        f"- **device**: {env['device']}",
        f"- **versions**: torch {env['torch']}"
        + (f" (CUDA {env['cuda']})" if env["cuda"] else "")
        + f", transformers {env['transformers']}, Python {env['python']}",
        f"- **commit**: {commit}; lora_lightning sources sha256 {env['lora_lightning_sha256']}; {env['timestamp']}",
        f"- **model**: Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, "
        f"{model['num_attention_heads']}/{model['num_key_value_heads']} heads, "
        f"intermediate {model['intermediate_size']}, vocab {model['vocab_size']}, {settings['dtype']}, sdpa; "
        f"batch {settings['batch_size']} x {settings['seq_len']} tokens",
        f"- **LoRA**: r={settings['r']} alpha={settings['alpha']:g} on {', '.join(bench.TARGET_MODULES)}; "
        "AdamW (fused where available)",
        f"- **method**: wall time = median of {settings['steps']} steps after {settings['warmup']} warm-up; "
        f"categories = {time_kind} of {settings['profile_steps']} profiled step(s), per step; "
        "saved bytes = `saved_tensors_hooks`, each storage once",
        "",
        "## Step time and memory",
        "",
        f"| config | step ms | x floor | {time_kind} ms (fwd / bwd / opt) | {unit} | peak | x floor "
        "| held after forward | saved for backward |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in records.items():
        floor = records.get(Config(name, r["impl"], r["mode"]).floor)
        ratio = f"{r['median_step_ms'] / floor['median_step_ms']:.2f}x" if floor else "-"
        peak_ratio = (
            f"{r['peak_memory_bytes'] / floor['peak_memory_bytes']:.2f}x"
            if floor and r["peak_memory_bytes"] and floor["peak_memory_bytes"]
            else "-"
        )
        n = sum(c["count"] for c in r["profile"]["categories"].values())
        saved = _mib(r["saved"]["activation_bytes"]) if r["saved"] else "-"
        phases = r["profile"]["phases"]
        split = " / ".join(_ms(phases.get(p, 0.0)) for p in ("forward", "backward", "optimizer"))
        lines.append(
            f"| {name} | {_ms(r['median_step_ms'])} | {ratio} | {_ms(r['profile']['total_ms'])} ({split}) | "
            f"{_count(n)} | {_mib(r['peak_memory_bytes'])} | {peak_ratio} | {_mib(r['held_after_forward_bytes'])} | "
            f"{saved} |"
        )

    lines += ["", "## Where it goes", "", *[p + "\n" for p in report["where_it_goes"]]]

    for comp in report["comparisons"]:
        if (comp["base"], comp["other"]) == ("floor", "ours-drop"):
            continue  # the other two eager tables cover it
        base, other = comp["base"], comp["other"]
        lines += [
            "",
            f"## {time_kind} per category: {other} minus {base} (ms per step)",
            "",
            f"| category | {base} | {other} | difference | {unit} {base} | {unit} {other} |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for c, v in comp["categories"].items():
            if not (v["base_ms"] or v["other_ms"] or v["base_count"] or v["other_count"]):
                continue
            lines.append(
                f"| {CATEGORIES[c]} | {_ms(v['base_ms'])} | {_ms(v['other_ms'])} | {_signed(v['delta_ms'])} | "
                f"{_count(v['base_count'])} | {_count(v['other_count'])} |"
            )
        total = comp["device_ms"]
        lines.append(
            f"| **total** | **{_ms(total[0])}** | **{_ms(total[1])}** | **{_signed(total[1] - total[0])}** |  |  |"
        )
        lines += [
            "",
            f"Top {len(comp['top_kernels'])} {unit} new in {other} or grown over {base}, by added time:",
            "",
            f"| {unit[:-1]} | category | {base} ms (n) | {other} ms (n) | added ms | new |",
            "|---|---|---:|---:|---:|---|",
        ]
        for k in comp["top_kernels"]:
            name = k["kernel"] if len(k["kernel"]) <= 90 else k["kernel"][:87] + "..."
            name = name.replace("|", "/")
            share = k["categories"][k["category"]] / k["other_ms"] if k["other_ms"] else 1.0
            category = CATEGORIES[k["category"]] + (f" ({share:.0%}; more in JSON)" if share < 0.9 else "")
            base_n = f" ({_count(k['base_count'])})" if k["base_count"] else ""
            other_n = f" ({_count(k['other_count'])})" if k["other_count"] else ""
            lines.append(
                f"| `{name}` | {category} | {_ms(k['base_ms'])}{base_n} | "
                f"{_ms(k['other_ms'])}{other_n} | {_signed(k['delta_ms'])} | {'yes' if k['new'] else ''} |"
            )

    lora_rows = [(n, records[n]["profile"]["lora_by_layer"]) for n in ("ours", "ours-drop") if n in records]
    lora_rows = [(n, v) for n, v in lora_rows if v]
    if lora_rows:
        cats = [c for c in CATEGORIES if any(c in layer for _, v in lora_rows for layer in v.values())]
        lines += [
            "",
            f"## Adapter work by adapted layer type ({time_kind}, ms per step, all layers of the type)",
            "",
            "| config | layer | " + " | ".join(CATEGORIES[c] for c in cats) + " | total |",
            "|---|---|" + "---:|" * (len(cats) + 1),
        ]
        for config_name, by_layer in lora_rows:
            for layer, v in by_layer.items():
                cells = [_ms(v.get(c, 0.0)) for c in cats]
                lines.append(f"| {config_name} | {layer} | " + " | ".join(cells) + f" | {_ms(sum(v.values()))} |")

    comp = next((c for c in report["comparisons"] if (c["base"], c["other"]) == ("floor", "ours")), None)
    if comp and comp.get("saved_by_module"):
        lines += [
            "",
            "## Saved for backward, by module type (each storage counted once, for the first module saving it)",
            "",
            f"Total: floor {_mib(comp['saved_bytes'][0])}, ours {_mib(comp['saved_bytes'][1])} "
            f"({_signed_mib(comp['saved_bytes'][1] - comp['saved_bytes'][0])}).",
            "",
            "| module | floor | ours | difference | saves floor | saves ours |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in comp["saved_by_module"][:30]:
            lines.append(
                f"| `{row['module']}` | {_mib(row['base_bytes'])} | {_mib(row['other_bytes'])} | "
                f"{_signed_mib(row['delta_bytes'])} | {row['base_refs']} | {row['other_refs']} |"
            )
    account = report.get("memory_account")
    if account:
        lines += [
            "",
            "## Analytic account: what each adapted layer keeps for backward",
            "",
            f"x = the layer's input `[T, in]`, h = x A^T `[T, r]`, T = {settings['batch_size'] * settings['seq_len']} "
            f"tokens, {settings['dtype']}. An input shared with an earlier adapted layer, or saved anyway by another "
            "module (from the saved-tensor record), costs nothing extra.",
            "",
            "| layer | layers | in | x per layer | h per layer | x shared with | x kept anyway by | extra per layer "
            "| extra, all layers |",
            "|---|---:|---:|---:|---:|---|---|---:|---:|",
        ]
        for r in account["layers"]:
            lines.append(
                f"| {r['layer']} | {r['count']} | {r['in']} | {_mib(r['x_bytes'])} | {_mib(r['h_bytes'])} | "
                f"{r['x_shared_with'] or '-'} | {r['x_kept_by'] or '-'} | {_mib(r['extra_bytes_per_layer'])} | "
                f"{_mib(r['extra_bytes'])} |"
            )
        lines += [
            "",
            "| quantity | bytes |",
            "|---|---:|",
            f"| analytic: saved x and h | {_mib(account['analytic_saved_bytes'])} |",
            f"| adapters + AdamW state | {_mib(account['adapters_and_optimizer_bytes'])} |",
            f"| analytic total | {_mib(account['analytic_total_bytes'])} |",
            f"| measured: first saved by the adapted layers | {_mib(account['measured_adapter_saved_bytes'])} |",
            f"| measured: other modules, ours - floor | {_signed_mib(account['measured_other_modules_delta_bytes'])} |",
            f"| measured: saved for backward, ours - floor | {_signed_mib(account['measured_saved_delta_bytes'])} |",
        ]
        if account["measured_peak_delta_bytes"] is not None:
            held = account["measured_held_after_forward_delta_bytes"]
            lines += [
                f"| measured: held after forward, ours - floor | {_signed_mib(held)} |",
                f"| measured: peak allocated, ours - floor | {_signed_mib(account['measured_peak_delta_bytes'])} |",
            ]
    notes = report.get("notes")
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(bench.SHAPES), default="tiny")
    parser.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help=f"any of {', '.join(all_configs(0.05))} (default: {' '.join(DEFAULT_CONFIGS)})",
    )
    parser.add_argument("--compiled", action="store_true", help="also run floor-compile and ours-compile")
    parser.add_argument("--dropout", type=float, default=bench.LORA_DROPOUT, help="LoRA dropout of ours-drop")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(bench.DTYPES), help="model dtype (default: the shape's, bf16)")
    parser.add_argument("--batch-size", type=int, help="override the shape's batch size")
    parser.add_argument("--seq-len", type=int, help="override the shape's sequence length")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=1e-4)
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
    return args


def settings_for(args: argparse.Namespace) -> Any:
    bench_args = bench.parse_args(
        [
            f"--shape={args.shape}",
            f"--rank={args.rank}",
            f"--alpha={args.alpha}",
            f"--lr={args.lr}",
            f"--seed={args.seed}",
        ]
        + [
            f"--{k.replace('_', '-')}={v}"
            for k in ("device", "dtype", "batch_size", "seq_len")
            if (v := getattr(args, k))
        ]
    )
    return replace(bench.settings_from_args(bench_args), steps=args.steps, warmup=args.warmup, isolation="none")


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
    device = bench._resolve(torch.device(settings.device))
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
    records: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        records[name] = measure_config(known[name], settings, device, args)
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
    env = bench.environment(device)
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
    unclaimed = {n: r["profile"]["unclaimed_device_ms"] for n, r in records.items()}
    if any(v > 0.01 for v in unclaimed.values()):
        notes.append(
            "device time the profiler linked to no CPU operator (left out of the categories): "
            + ", ".join(f"{n} {_ms(v)} ms" for n, v in unclaimed.items())
        )
    report["memory_account"] = memory_account(records, device.type)
    report["where_it_goes"] = where_it_goes(report)
    report["total_s"] = time.perf_counter() - started
    (args.out / JSON_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    markdown = render_markdown(report)
    (args.out / MARKDOWN_NAME).write_text(markdown)
    print(markdown)
    print(f"wrote {args.out / JSON_NAME} and {args.out / MARKDOWN_NAME} in {report['total_s']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

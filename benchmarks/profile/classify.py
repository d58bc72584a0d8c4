"""Profiler events to categories: every unit of measured time (a CUDA kernel, or a CPU operator's self time) gets
a phase, a module label, an autograd node and a category; LoRA GEMMs get their role from their operand shapes."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

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

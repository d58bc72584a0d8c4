"""Sizing adapters before they exist: their shapes from each target's, checked against the free memory of the
devices they would live on, and the ranks above a layer's smaller side (which only warn, as in PEFT)."""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from lora_lightning import quant
from lora_lightning.config import LoRAConfig
from lora_lightning.layers import LoRALayer


def size_problems(
    sized: list[tuple[str, type[LoRALayer], Any, str]], config: LoRAConfig
) -> tuple[list[str], list[str]]:
    """Every target's adapter (``(name, layer type, base, name its spec is resolved for)``) sized from its shapes,
    without allocating: the problems (adapters that cannot be built, or do not fit into the free memory of their
    device; an SVD/QR init asking for more directions than the weight has) and the ranks above a layer's smaller side
    (``"'name' r=20 (16 -> 32)"``), which only warn."""
    problems, wide_ranks = [], []
    sizes: dict[torch.device, list[tuple[int, str]]] = {}
    shapes_of: dict[tuple, list[tuple[int, ...]]] = {}  # layers of one shape (most of a transformer) share theirs
    for name, kind, base, spec_name in sized:
        spec = config.spec_for(spec_name)
        weight = kind.weight_of(base)
        key = (kind, type(base), tuple(weight.shape), kind.features(base), spec)
        try:
            if key not in shapes_of:
                shapes_of[key] = list(kind.adapter_shapes(base, spec).values())
        except (RuntimeError, OverflowError, ValueError, TypeError) as err:
            problems.append(f"layer {name!r}: an adapter with r={spec.r} cannot be built ({str(err).splitlines()[0]})")
            continue
        shapes = shapes_of[key]
        # A is [r, in, ...] and B is [out, r, ...] for every layer type: the update's rank is at most min(in, out)
        inputs, outputs = math.prod(shapes[0][1:]), shapes[1][0]
        if spec.r > min(inputs, outputs):
            wide_ranks.append(f"{name!r} r={spec.r} ({inputs} -> {outputs})")
            if spec.init.startswith(("pissa", "olora")):
                problems.append(
                    f"layer {name!r}: init={spec.init!r} takes the top r={spec.r} singular directions of a "
                    f"{inputs} -> {outputs} weight, which has {min(inputs, outputs)}; lower r there (rank_pattern)"
                )
        # adapters go where the base weight is, in its dtype (a 4-bit base's compute dtype)
        dtype = quant.compute_dtype(base) if quant.is_quantized(base) else weight.dtype
        size = sum(map(math.prod, shapes)) * dtype.itemsize
        sizes.setdefault(weight.device, []).append((size, f"{name!r} r={spec.r}"))
    return problems + _memory_problems(sizes), wide_ranks


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (``None``: unknown or unlimited, as on ``meta``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(available.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _memory_problems(sizes: dict[torch.device, list[tuple[int, str]]]) -> list[str]:
    """The adapters of each device (``(bytes, "'layer' r=...")``) must fit into what is free there."""
    problems = []
    for device, layers in sizes.items():
        need, free = sum(n for n, _ in layers), free_bytes(device)
        if free is not None and need > free:
            largest = ", ".join(f"{what} ({_bytes(n)})" for n, what in sorted(layers, reverse=True)[:5])
            problems.append(
                f"the adapters need {_bytes(need)} on {device}, which has {_bytes(free)} free; the largest: "
                f"{largest}; lower r (or rank_pattern) for these layers"
            )
    return problems


def _bytes(n: float) -> str:
    """``n`` bytes in decimal units, e.g. ``192.0 TB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"

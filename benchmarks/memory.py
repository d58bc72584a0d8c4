"""Memory metering: the CUDA allocator's peak, this process's (peak) RSS from ``/proc``, and the bytes of
tensors and optimizer states."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def tensor_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """The raw bytes of ``tensors``' elements."""
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer | None) -> int:
    """The raw bytes of the tensors in the optimizer's state (e.g. AdamW's moments and step counts)."""
    if optimizer is None:
        return 0
    return tensor_bytes([v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)])


def cuda_peak_bytes(device: torch.device) -> int | None:
    """``torch.cuda.max_memory_allocated`` (weights included) on a CUDA device; None elsewhere."""
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def rss_bytes() -> int | None:
    """This process's resident set size now (``VmRSS``), or None where ``/proc`` cannot tell."""
    return _proc_status_bytes("VmRSS")


def peak_rss_bytes() -> int | None:
    """This process's peak resident set size (``VmHWM``) since it started or `reset_peak_rss`."""
    return _proc_status_bytes("VmHWM")


def reset_peak_rss() -> bool:
    """Set ``VmHWM`` back to the current RSS (Linux >= 4.0, ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class MemoryMeter:
    """Peak memory of one measurement: CUDA allocator peak, or on CPU the growth of this process's peak RSS
    (only when the measurement has the process to itself)."""

    def __init__(self, device: torch.device, own_process: bool) -> None:
        self.device = device
        self.baseline: int | None = 0
        if device.type == "cuda":
            self.kind = "cuda_max_memory_allocated"
        elif own_process:
            self.kind = "cpu_peak_rss_growth"
            self.baseline = rss_bytes()
        else:  # RSS left behind by earlier rows (and their lazily loaded libraries) would make this meaningless
            self.kind = "not_measured_rows_share_a_process"
            self.baseline = None

    def start(self) -> None:
        """Call once the model is built: resets the peak to what is held now (weights included)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.baseline is not None and not reset_peak_rss():
            self.baseline = None

    def peak(self) -> int | None:
        """The peak since `start` in bytes, or None where it is not measured."""
        if self.device.type == "cuda":
            return cuda_peak_bytes(self.device)
        high = peak_rss_bytes()
        return None if high is None or self.baseline is None else max(high - self.baseline, 0)


def resolve_device(name: str) -> torch.device:
    """The torch device called ``name``, ``cuda`` as ``cuda:<current>``: the CUDA memory statistics need an index."""
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None

"""Step timing with the device synchronised around every step, as every measurement here takes it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    synchronize(device)
    return time.perf_counter()


def timed_steps(step: Callable[[], T], count: int, device: torch.device) -> Iterator[tuple[float, T]]:
    """Run ``step`` ``count`` times, the device synchronised before and after each; yields the seconds each took
    and what it returned (what the caller does between steps is not timed)."""
    for _ in range(count):
        start = clock(device)
        result = step()
        yield clock(device) - start, result


def median_ms(seconds: Sequence[float]) -> float:
    """The median of step times in seconds, in milliseconds."""
    return 1e3 * statistics.median(seconds)

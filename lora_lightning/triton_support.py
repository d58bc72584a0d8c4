"""Where the Triton kernels of the fused nodes (`dropout_triton`, `gate_triton`) run: CUDA tensors of a float type,
with Triton importable (it ships with PyTorch's CUDA builds). Elsewhere the nodes use PyTorch's own kernels."""

from __future__ import annotations

import functools

import torch


def triton_applies(t: torch.Tensor) -> bool:
    return t.is_cuda and t.numel() > 0 and t.dtype in (torch.float32, torch.float16, torch.bfloat16) and _has_triton()


@functools.cache
def _has_triton() -> bool:
    from torch.utils._triton import has_triton

    return has_triton()

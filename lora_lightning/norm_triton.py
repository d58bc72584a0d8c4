"""A Triton RMSNorm in one launch, for running a frozen norm again in backward (`fused.InputProducers`):
``y = cast(x rsqrt(mean(x^2) + eps)) (offset + w)``, ``x`` in fp32 inside and cast back to its dtype before the
weight (Llama's casting, and Liger-Kernel's default). Where a norm module gives these bits on a probe, the fused
nodes run this instead of the module: one launch, against Liger's RMSNorm forward at 110 us of host time a call on
an H200's host (a node reruns two norms a decoder layer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rms_norm(x, w, y, k, eps, offset, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < k
    values = tl.load(x + row * k + cols, inside, 0)
    weight = tl.load(w + cols, inside, 0)
    wide = values.to(tl.float32)
    rstd = libdevice.rsqrt(tl.sum(wide * wide, axis=0) / k + eps)  # eps and offset: fp32 scalars
    normed = (wide * rstd).to(values.dtype)
    tl.store(y + row * k + cols, normed * (offset + weight), inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of CUDA tensor ``x`` with the 1-D ``weight``, one program a row."""
    k = x.shape[-1]
    rows, weight = x.reshape(-1, k).contiguous(), weight.contiguous()
    out = torch.empty_like(rows)
    block = triton.next_power_of_2(k)
    # the warps of Liger-Kernel's RMSNorm at this width, so that the row sums add up in the same order
    warps = 32 if block >= 32768 else 16 if block >= 8192 else 8 if block >= 2048 else 4
    with torch.cuda.device(x.device):  # Triton launches on the current device
        _rms_norm[(rows.shape[0],)](rows, weight, out, k, eps, offset, BLOCK=block, num_warps=warps)
    return out.view(x.shape)

"""Triton kernels for a SiLU gate ``P = silu(G) * U`` (`functional.lora_gated_mlp` on CUDA): one pass each way,
in fp32 inside, where PyTorch's eager ops take two passes forward (``silu``, then ``*``) and three back.

Backward: ``gU = gP * silu(G)`` and ``gG = gP * U * silu'(G)``, with ``silu'(a) = s (1 + a (1 - s))``,
``s = sigmoid(a)``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _silu_mul(gate, up, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(gate + offsets, mask, 0.0).to(tl.float32)
    b = tl.load(up + offsets, mask, 0.0).to(tl.float32)
    tl.store(out + offsets, (a * tl.sigmoid(a) * b).to(out.dtype.element_ty), mask)


@triton.jit
def _silu_mul_backward(gate, up, grad, grad_gate, grad_up, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(gate + offsets, mask, 0.0).to(tl.float32)
    b = tl.load(up + offsets, mask, 0.0).to(tl.float32)
    d = tl.load(grad + offsets, mask, 0.0).to(tl.float32)
    s = tl.sigmoid(a)
    tl.store(grad_up + offsets, (d * a * s).to(grad_up.dtype.element_ty), mask)
    tl.store(grad_gate + offsets, (d * b * s * (1.0 + a * (1.0 - s))).to(grad_gate.dtype.element_ty), mask)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(G) * U``."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _silu_mul[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=8)
    return out


def silu_mul_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gG, gU)`` given ``gP``."""
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    _silu_mul_backward[(triton.cdiv(gate.numel(), BLOCK),)](
        gate, up, grad, grad_gate, grad_up, gate.numel(), BLOCK=BLOCK, num_warps=8
    )
    return grad_gate, grad_up

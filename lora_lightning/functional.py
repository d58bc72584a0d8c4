"""The LoRA linear map as one autograd node, for eager training with a frozen base.

``y = x W^T + b + s * (d(x) A^T) B^T`` where ``d`` is dropout. Autograd over separate modules would
keep ``d(x)`` as well as ``x`` alive, write the update into a new tensor, and sum two input gradients.
This node saves only ``x`` and the small ``h = d(x) A^T`` (``[tokens, r]``), regenerates the dropout
mask in backward from a saved seed, accumulates the update into the base output in place, and adds
the adapter's input gradient into the base's with one ``addmm_``. Backward:
``gB = s * g^T h``, ``gh = s * g B``, ``gA = gh^T d(x)``, ``gx = g W + d'(gh A)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float,
    seed: int | None = None,
) -> torch.Tensor:
    """Apply the fused LoRA linear map; ``seed`` fixes the dropout mask (drawn from torch's CPU RNG if None)."""
    if dropout and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return _LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout, seed)


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    keep = torch.empty_like(x).bernoulli_(1.0 - p, generator=generator)
    return keep.mul_(x).div_(1.0 - p)


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout: float,
        seed: int | None,
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight, bias)
        h = (_dropped(flat, dropout, seed) if dropout else flat) @ lora_a.t()
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling, ctx.dropout, ctx.seed = scaling, dropout, seed
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_b = torch.mm(g.t(), h).mul_(ctx.scaling) if needs_b else None
        gh = torch.mm(g, lora_b).mul_(ctx.scaling)
        grad_a = grad_x = None
        if needs_a:
            grad_a = torch.mm(gh.t(), _dropped(flat, ctx.dropout, ctx.seed) if ctx.dropout else flat)
        if needs_x:
            grad_x = torch.mm(g, weight)
            if ctx.dropout:
                grad_x.add_(_dropped(torch.mm(gh, lora_a), ctx.dropout, ctx.seed))
            else:
                grad_x.addmm_(gh, lora_a)
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None, None

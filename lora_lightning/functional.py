"""The LoRA linear map as one autograd node, for eager training with a frozen base.

``y = x W^T + b + s * (d(x) A^T) B^T`` where ``d`` is dropout. Autograd over separate modules would
keep ``d(x)`` as well as ``x`` alive, write the update into a new tensor, and sum two input gradients.
This node saves only ``x`` and the small ``h = d(x) A^T`` (``[tokens, r]``), accumulates the update into
the base output in place, and adds the adapter's input gradient into the base's. Backward:
``gB = s * g^T h``, ``gh = s * g B``, ``gA = gh^T d(x)``, ``gx = g W + d'(gh A)``.
The dropout mask is not stored: backward replays the same fused dropout kernel on the same ``x`` from
the generator state saved in forward, then puts the generator back where it was.
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
) -> torch.Tensor:
    """Apply the fused LoRA linear map (CPU or CUDA tensors); dropout draws from the device's default generator."""
    return _LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout)


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator


def _replay_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``native_dropout(x, p)`` as it ran when the generator had ``state``; the generator is left untouched."""
    generator = _generator(x.device)
    current = generator.get_state()
    generator.set_state(state)
    try:
        return torch.native_dropout(x, p, True)
    finally:
        generator.set_state(current)


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
    ) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = F.linear(flat, weight, bias)
        if dropout:
            ctx.rng_state = _generator(x.device).get_state()
            h = torch.native_dropout(flat, dropout, True)[0] @ lora_a.t()
        else:
            h = flat @ lora_a.t()
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h)
        ctx.scaling, ctx.dropout = scaling, dropout
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, h = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        g = grad_out.reshape(-1, grad_out.shape[-1])
        flat = x.reshape(-1, x.shape[-1])
        grad_b = torch.mm(g.t(), h).mul_(ctx.scaling) if needs_b else None
        gh = torch.mm(g, lora_b).mul_(ctx.scaling)
        dropped, keep = _replay_dropout(flat, ctx.dropout, ctx.rng_state) if ctx.dropout else (flat, None)
        grad_a = torch.mm(gh.t(), dropped) if needs_a else None
        grad_x = None
        if needs_x:
            grad_x = torch.mm(g, weight)
            if keep is None:
                grad_x.addmm_(gh, lora_a)
            else:
                grad_x.addcmul_(torch.mm(gh, lora_a), keep, value=1.0 / (1.0 - ctx.dropout))
            grad_x = grad_x.view(x.shape)
        return grad_x, None, None, grad_a, grad_b, None, None

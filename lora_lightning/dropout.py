"""A LoRA input's dropout inside the fused nodes of `functional`: ``d(x) = x * m / (1 - p)`` with a keep mask ``m``.
Forward computes ``h = d(x) A^T`` and gives the mask (`dropped_linear`), which the node saves; backward applies it
(`DroppedInput`) for ``gA = gh^T d(x)`` and ``gx += d'(gh A)``. No path keeps ``d(x)``.

- **CUDA with Triton** (`dropout_triton`): the mask is a function of a seed and the element's position, drawn
  inside the forward kernel as it multiplies, and written packed, one bit per element (a sixteenth of a bf16
  input); the backward kernels read the bits, which costs less than drawing the mask again. The seed comes from
  the CPU generator (so `torch.manual_seed` fixes it), one per node and input.
- **Elsewhere**: PyTorch's fused dropout kernel from the device's generator, whose mask (a byte per element) is
  kept.

Both draw each element with probability ``1 - p`` independently, as PEFT's ``nn.Dropout`` does; the masks are
other draws than PEFT's. Backward draws nothing: the generators are where forward left them.
"""

from __future__ import annotations

import torch

from lora_lightning.triton_support import triton_applies

_SEEDS = (1 << 32, 1 << 62)  # kernel seeds are 64-bit integers (Triton types arguments below 2^31 as int32)


def dropped_linear(x: torch.Tensor, lora_a: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(d(x) A^T, m)`` for rows ``x``, with the mask ``m`` as `DroppedInput` takes it; ``(x A^T, None)`` when ``p``
    is 0."""
    if not p:
        return x @ lora_a.t(), None
    if triton_applies(x):
        from lora_lightning import dropout_triton

        return dropout_triton.dropped_linear(x, lora_a, kernel_seed(), p)
    dropped, mask = torch.native_dropout(x, p, True)
    return dropped @ lora_a.t(), mask


def kernel_seed() -> int:
    """A new seed for the Triton kernels' masks, from the CPU generator."""
    return int(torch.randint(*_SEEDS, (), generator=torch.default_generator))


class DroppedInput:
    """Rows ``x`` under the dropout whose mask `dropped_linear` gave (``None`` when ``p`` is 0), for the gradients."""

    def __init__(self, x: torch.Tensor, mask: torch.Tensor | None, p: float) -> None:
        self.x, self.mask, self.p = x, mask, p
        self.packed = mask is not None and mask.dtype == torch.uint8  # the Triton kernels' bits, else PyTorch's mask

    def grad_factor(self, gh: torch.Tensor) -> torch.Tensor:
        """``gh^T d(x)``."""
        if self.mask is None:
            return torch.mm(gh.t(), self.x)
        if self.packed:
            from lora_lightning import dropout_triton

            return dropout_triton.grad_factor(gh, self.x, self.mask, self.p)
        return torch.mm(gh.t(), torch.ops.aten.native_dropout_backward(self.x, self.mask, 1.0 / (1.0 - self.p)))

    def add_input_grad_(self, grad_x: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        """``grad_x += d'(gh A)`` in place."""
        if self.mask is None:
            return grad_x.addmm_(gh, lora_a)
        if self.packed:
            from lora_lightning import dropout_triton

            return dropout_triton.add_dropped_grad_(grad_x, gh, lora_a, self.mask, self.p)
        return grad_x.addcmul_(torch.mm(gh, lora_a), self.mask, value=1.0 / (1.0 - self.p))

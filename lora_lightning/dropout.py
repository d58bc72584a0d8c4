"""A LoRA input's dropout inside the fused nodes of `functional`: ``d(x) = x * m / (1 - p)`` with a keep mask ``m``
that is never stored. Forward computes ``h = d(x) A^T`` (`dropped_linear`); backward draws the same mask again
(`Replayed`) for ``gA = gh^T d(x)`` and ``gx += d'(gh A)``.

- **CUDA with Triton** (`dropout_triton`): the mask is a function of a seed and the element's position, drawn
  inside the kernels of those three products, so none of them writes the mask or ``d(x)`` and each reads ``x``
  once. The seed comes from the CPU generator (so `torch.manual_seed` fixes it), one per node and input.
- **Elsewhere**: PyTorch's fused dropout kernel from the device's generator. Forward keeps the generator's state,
  and backward replays the kernel on the same input from that state, then puts the generator back where it was.

Both draw each element with probability ``1 - p`` independently, as PEFT's ``nn.Dropout`` does; the masks are
other draws than PEFT's.
"""

from __future__ import annotations

from typing import Any

import torch

from lora_lightning.triton_support import triton_applies

_SEEDS = (1 << 32, 1 << 62)  # kernel seeds are 64-bit integers (Triton types arguments below 2^31 as int32)


def dropped_linear(ctx: Any, key: str, x: torch.Tensor, lora_a: torch.Tensor, p: float) -> torch.Tensor:
    """``d(x) A^T`` for rows ``x``, remembering under ``ctx.<key>`` how to draw the mask again (``x A^T`` when ``p``
    is 0)."""
    if not p:
        return x @ lora_a.t()
    if triton_applies(x):
        from lora_lightning import dropout_triton

        return dropout_triton.dropped_linear(x, lora_a, kernel_seed(ctx, key), p)
    setattr(ctx, key, _generator(x.device).get_state())
    return torch.native_dropout(x, p, True)[0] @ lora_a.t()


def kernel_seed(ctx: Any, key: str) -> int:
    """A new seed for the Triton kernels' masks, from the CPU generator, remembered under ``ctx.<key>``."""
    seed = int(torch.randint(*_SEEDS, (), generator=torch.default_generator))
    setattr(ctx, key, seed)
    return seed


class Replayed:
    """The dropout `dropped_linear` drew on rows ``x`` under ``ctx.<key>``, for the gradients."""

    def __init__(self, ctx: Any, key: str, x: torch.Tensor, p: float) -> None:
        self.x, self.p = x, p
        self.drawn = getattr(ctx, key) if p else None  # a kernel seed, or a generator state
        self._masked: tuple[torch.Tensor, torch.Tensor] | None = None  # (d(x), m), PyTorch's path

    def grad_factor(self, gh: torch.Tensor) -> torch.Tensor:
        """``gh^T d(x)``."""
        if not self.p:
            return torch.mm(gh.t(), self.x)
        if isinstance(self.drawn, int):
            from lora_lightning import dropout_triton

            return dropout_triton.grad_factor(gh, self.x, self.drawn, self.p)
        return torch.mm(gh.t(), self._replay()[0])

    def add_input_grad_(self, grad_x: torch.Tensor, gh: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
        """``grad_x += d'(gh A)`` in place."""
        if not self.p:
            return grad_x.addmm_(gh, lora_a)
        if isinstance(self.drawn, int):
            from lora_lightning import dropout_triton

            return dropout_triton.add_dropped_grad_(grad_x, gh, lora_a, self.drawn, self.p)
        return grad_x.addcmul_(torch.mm(gh, lora_a), self._replay()[1], value=1.0 / (1.0 - self.p))

    def _replay(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d(x), m)`` as forward drew them; the generator is left where it was."""
        if self._masked is None:
            generator = _generator(self.x.device)
            current = generator.get_state()
            generator.set_state(self.drawn)
            try:
                self._masked = torch.native_dropout(self.x, self.p, True)
            finally:
                generator.set_state(current)
        return self._masked


def _generator(device: torch.device) -> torch.Generator:
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return torch.default_generator

"""`LoRAConv`: LoRA on ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``, grouped ones included."""

from __future__ import annotations

import torch
from torch import nn

from lora_lightning.config import AdapterSpec
from lora_lightning.layers.lora import LoRALayer


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``: ``A`` is a convolution like the base's (kernel, stride,
    padding) with ``r`` output channels, ``B`` a 1x1 convolution to the base's output channels, so
    ``ΔW[o, i, k] = sum_j B[o, j] A[j, i, k]``.

    A grouped base (``groups = g > 1``) gets PEFT's layout: ``A`` reads every input channel (not grouped), ``B`` is
    grouped (``[out, r / g, 1, ...]``, so ``r`` must be a multiple of ``g``): output group ``k`` sums the ``k``-th
    ``r / g`` channels of ``A``. That update reads across the groups, which no grouped weight can hold, so such an
    adapter cannot be merged (nor take DoRA, whose norm is that of the merged weight); it trains and runs unmerged.
    """

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        unsupported = {key: getattr(base, key) for key in ("padding_mode",) if getattr(base, key) != "zeros"}
        if any(d != 1 for d in base.dilation):
            unsupported["dilation"] = base.dilation
        problems = super().problems(base, spec)
        if unsupported:
            problems.append(
                f"LoRA on {type(base).__name__} supports dilation=1 and padding_mode='zeros' only, "
                f"got {unsupported}; exclude this layer"
            )
        if base.groups > 1 and spec.r % base.groups:
            problems.append(
                f"a {type(base).__name__} with groups={base.groups} takes ranks that are multiples of {base.groups} "
                f"(as in PEFT), not r={spec.r}; set its rank with rank_pattern"
            )
        if base.groups > 1 and spec.use_dora:
            problems.append(
                f"DoRA on a {type(base).__name__} with groups={base.groups}: the update reads across the groups, so "
                "the merged weight DoRA normalizes does not exist; use_dora=False (or exclude this layer)"
            )
        return problems

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    @classmethod
    def _new_factors(cls, base: nn.Module, spec: AdapterSpec, factory: dict) -> tuple[nn.Module, nn.Module]:
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        return (
            conv(base.in_channels, spec.r, base.kernel_size, base.stride, base.padding, bias=False, **factory),
            conv(spec.r, base.out_channels, ones, ones, groups=base.groups, bias=spec.lora_bias, **factory),
        )

    def fold_problem(self, name: str) -> str | None:
        if self.base_layer.groups > 1:
            return (
                f"a {type(self.base_layer).__name__} with groups={self.base_layer.groups}: its adapter reads across "
                "the groups, which the grouped weight cannot hold (PEFT cannot merge it either); keep it unmerged"
            )
        return super().fold_problem(name)

    def _delta(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b.flatten(1) @ a.flatten(1)).reshape(self.base_layer.weight.shape)

    @classmethod
    def _magnitude_shape(cls, base: nn.Module) -> tuple[int, ...]:
        return (1, base.out_channels, *(1 for _ in base.kernel_size))

    def _channel_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.reshape(self._magnitude_shape(self.base_layer))

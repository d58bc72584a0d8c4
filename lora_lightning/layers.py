"""LoRA layers: a frozen base layer plus a trainable low-rank side branch."""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_lightning.functional import lora_linear


class LoRALinear(nn.Module):
    """``y = base(x) + scaling * B(A(dropout(x)))`` around an existing ``nn.Linear``.

    The base layer is kept as the submodule ``base_layer`` (its weight is shared, not copied).
    ``A`` (``lora_A.weight``, ``[r, in]``) is Kaiming-uniform and ``B`` (``lora_B.weight``,
    ``[out, r]``) is zero, so the output equals the base output exactly until ``B`` is trained.
    Adapters take the base weight's dtype and device. ``merge()`` folds ``scaling * B A`` into the
    base weight (computed in fp32, then cast) and ``unmerge()`` takes it out again.
    """

    def __init__(
        self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        weight = base_layer.weight
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.base_layer = base_layer
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self.reset_lora_parameters()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    @property
    def hyperparameters(self) -> tuple[int, float, float, bool]:
        """``(r, alpha, dropout, use_rslora)``: what must agree for two layers to hold the same kind of adapter."""
        return self.r, self.alpha, self.dropout, self.use_rslora

    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self._fused_path_applies(x):
            base = self.base_layer
            dropout = self.dropout if self.training else 0.0
            return lora_linear(x, base.weight, base.bias, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout)
        update = self.lora_B(self.lora_A(self.lora_dropout(x)))
        # The base output is not saved for backward, so the update can be accumulated in place.
        return self.base_layer(x).add_(update, alpha=self.scaling)

    def _fused_path_applies(self, x: torch.Tensor) -> bool:
        """The one-node eager path (see `functional`) needs a plain frozen linear base in x's dtype. Under
        torch.compile the module path is used instead: Inductor fuses it better than an opaque node."""
        base = self.base_layer
        return (
            type(base) is nn.Linear
            and not base.weight.requires_grad
            and x.dtype == base.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and x.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling()
        )

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32, shaped like the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise RuntimeError("merge(): this LoRALinear is already merged; call unmerge() first")
        weight = self.base_layer.weight
        weight.copy_((weight.float() + self.delta_weight()).to(weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge(): this LoRALinear is not merged")
        weight = self.base_layer.weight
        weight.copy_((weight.float() - self.delta_weight()).to(weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, dropout={self.dropout}, merged={self.merged}"

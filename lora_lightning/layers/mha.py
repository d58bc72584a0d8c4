"""`LoRAMultiheadAttention`: LoRA on ``nn.MultiheadAttention``'s projections."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from lora_lightning.config import AdapterSpec
from lora_lightning.layers.linear import LoRALinear
from lora_lightning.layers.lora import LoRALayer


class LoRAMultiheadAttention(LoRALayer):
    """LoRA on ``nn.MultiheadAttention`` (query, key and value of one width, as in PEFT): ``A`` ``[r, E]`` and ``B``
    ``[3E, r]`` (rows in q, k, v order) adapt the packed input projection, and ``base_layer.out_proj`` becomes a
    `LoRAOutProjection` with its own ``A``/``B`` of the same rank. The module's own forward then runs with
    ``W_in + s B A`` and ``W_out + s B_o A_o`` (weight space: no dropout, and no ``lora_bias``).

    PEFT 0.21.2 adds the output projection's update twice (``W_out + 2 s B_o A_o``, in forward and merge; an open
    upstream fix, huggingface/peft#3774); this layer adds it once, so an adapter whose ``B_o`` is non-zero gives
    other outputs there.
    """

    _input_dropout = False

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.embed_dim, 3 * base.embed_dim

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        problems = super().problems(base, spec)
        if not base._qkv_same_embed_dim:
            problems.append("an nn.MultiheadAttention with kdim/vdim other than embed_dim (as in PEFT)")
        if not isinstance(base.out_proj, (nn.Linear, LoRAOutProjection)):
            problems.append(f"an nn.MultiheadAttention whose out_proj is a {type(base.out_proj).__name__}")
        for field in ("use_dora", "lora_bias"):
            if getattr(spec, field):
                problems.append(f"{field}=True does not apply to nn.MultiheadAttention (as in PEFT)")
        return problems

    @classmethod
    def adapter_shapes(cls, base: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        shapes = super().adapter_shapes(base, spec)
        out_proj = base.out_proj.base_layer if isinstance(base.out_proj, LoRAOutProjection) else base.out_proj
        inner = LoRAOutProjection.adapter_shapes(out_proj, spec)
        return shapes | {f"base_layer.out_proj.{key}": shape for key, shape in inner.items()}

    @classmethod
    def _new_factors(cls, base: nn.Module, spec: AdapterSpec, factory: dict) -> tuple[nn.Module, nn.Module]:
        embed_dim, out_features = cls.features(base)
        return nn.Linear(embed_dim, spec.r, bias=False, **factory), nn.Linear(
            spec.r, out_features, bias=False, **factory
        )

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        super().add_adapter(name, spec)
        out_proj = self.base_layer.out_proj
        if isinstance(out_proj, LoRAOutProjection):
            out_proj.add_adapter(name, spec)
        else:
            self.base_layer.out_proj = LoRAOutProjection(out_proj, spec, name)

    @classmethod
    def weight_of(cls, base: nn.Module) -> torch.Tensor:
        return base.in_proj_weight

    def _base_param(self) -> torch.Tensor:
        return self.base_layer.in_proj_weight

    def _delta(self, name: str) -> torch.Tensor:
        return self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()

    def forward(self, query: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = self._weight_space_adapter()
        if name is None:
            return self.base_layer(query, *args, **kwargs)
        weight = self.base_layer.in_proj_weight
        a, b = self.factors(name)
        updated = weight + (self.specs[name].scaling * (b @ a)).to(weight.dtype)
        return functional_call(self.base_layer, {"in_proj_weight": updated}, (query, *args), kwargs)

    def sample_problem(self, names: set[str]) -> str | None:
        return "nn.MultiheadAttention adds its adapters to the weights, one set for the whole batch (as in PEFT)"


class LoRAOutProjection(LoRALinear):
    """The output projection of a `LoRAMultiheadAttention`. ``nn.MultiheadAttention`` reads ``out_proj.weight`` and
    ``.bias`` instead of calling it, so ``weight`` is the adapted weight ``W + s B A`` of the running adapter."""

    @property
    def weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.specs or self.sample_adapters is not None:
            return weight
        a, b = self.factors(name)
        return weight + (self.specs[name].scaling * (b @ a)).to(weight.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def fused_operands(self, x: torch.Tensor, name: str | None = None) -> None:
        return None

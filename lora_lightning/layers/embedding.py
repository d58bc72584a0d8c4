"""`LoRAEmbedding`: LoRA on ``nn.Embedding``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.config import AdapterSpec
from lora_lightning.layers.lora import LoRALayer


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: ``A`` (``lora_embedding_A``, ``[r, num_embeddings]``) is looked up like the
    base table and ``B`` (``lora_embedding_B``, ``[embedding_dim, r]``) maps it out. As in PEFT, ``A`` starts
    at zero and ``B`` normal, and dropout does not apply (the input is indices)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")
    factor_container = nn.ParameterDict
    _channel_dim = 1
    _input_dropout = False

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        problems = super().problems(base, spec)
        if spec.lora_bias:
            problems.append("lora_bias=True does not apply to an nn.Embedding (as in PEFT)")
        return problems

    @classmethod
    def _new_factors(cls, base: nn.Module, spec: AdapterSpec, factory: dict) -> tuple[nn.Parameter, nn.Parameter]:
        in_features, out_features = cls.features(base)
        return (
            nn.Parameter(torch.empty(spec.r, in_features, **factory)),
            nn.Parameter(torch.empty(out_features, spec.r, **factory)),
        )

    def _init_adapter(self, name: str) -> None:
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        looked_up = F.embedding(
            x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
            base.scale_grad_by_freq, base.sparse,
        )  # fmt: skip
        return looked_up @ self.lora_embedding_B[name].t()

    def _delta(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).t()

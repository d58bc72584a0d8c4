"""The modules that hold adapters: LoRA layers per base type (`LoRALinear` for ``nn.Linear``, 4-bit bases and
GPT-2's ``Conv1D``; `LoRAEmbedding`; `LoRAConv` for ``nn.Conv1d/2d/3d``; `LoRAMultiheadAttention`; `LoRAParameter`
for ``target_parameters``), and the wrappers of ``modules_to_save`` (`ModulesToSave`) and
``trainable_token_indices`` (`TrainableTokens`). All are `AdapterModule`s: each stands for the module it wraps and
holds its adapters by name."""

from __future__ import annotations

from torch import nn

from lora_lightning.layers.base import BASE_ADAPTER, AdapterModule, innermost, sample_rows
from lora_lightning.layers.conv import LoRAConv
from lora_lightning.layers.embedding import LoRAEmbedding
from lora_lightning.layers.linear import LoRALinear, hf_conv1d_type
from lora_lightning.layers.lora import LoRALayer
from lora_lightning.layers.mha import LoRAMultiheadAttention, LoRAOutProjection
from lora_lightning.layers.parameter import LoRAParameter, ParameterTarget
from lora_lightning.layers.saved import PER_SAMPLE_TYPES, ModulesToSave, copies_of
from lora_lightning.layers.tokens import TrainableTokens

SUPPORTED_LAYERS = (
    "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, transformers' Conv1D (GPT-2)"
)

__all__ = [
    "BASE_ADAPTER",
    "PER_SAMPLE_TYPES",
    "SUPPORTED_LAYERS",
    "AdapterModule",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAOutProjection",
    "LoRAParameter",
    "ModulesToSave",
    "ParameterTarget",
    "TrainableTokens",
    "copies_of",
    "hf_conv1d_type",
    "innermost",
    "lora_layer_type",
    "sample_rows",
]


def lora_layer_type(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that adapts ``module``, or ``None`` if its type is not supported."""
    conv1d = hf_conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConv
    if isinstance(module, nn.MultiheadAttention):
        return LoRAMultiheadAttention
    return None

"""lora-lightning: LoRA fine-tuning as a PyTorch Lightning callback, with adapters in PEFT's format."""

from lora_lightning.adapters import active_adapter, delete_adapter, disable_adapters, set_active_adapter
from lora_lightning.callback import LoRAFinetuneCallback
from lora_lightning.checkpoint_io import LoRACheckpointMixin, SafeCheckpointIO, inject_from_checkpoint
from lora_lightning.config import AdapterSpec, LoRAConfig
from lora_lightning.export import model_card, save_merged, write_model_card
from lora_lightning.fused import FusionReport, fold_gated_mlps, install_fused_paths, remove_fused_paths
from lora_lightning.gguf_adapter import save_gguf_adapter
from lora_lightning.inject import InjectionReport, TargetError, find_targets, inject_lora, merge_lora, unload_lora
from lora_lightning.io import AdapterFormatError, load_adapter, save_adapter
from lora_lightning.kernels import KernelReport, apply_kernels
from lora_lightning.layers import (
    LoRAConv,
    LoRAEmbedding,
    LoRALayer,
    LoRALinear,
    LoRAMultiheadAttention,
    LoRAParameter,
    ModulesToSave,
    TrainableTokens,
)
from lora_lightning.mixed_batch import per_sample_adapters
from lora_lightning.params import (
    ParamSummary,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    mark_only_adapters_trainable,
    param_summary,
)
from lora_lightning.quantize import quantize_linears

__all__ = [
    "AdapterFormatError",
    "AdapterSpec",
    "FusionReport",
    "InjectionReport",
    "KernelReport",
    "LoRACheckpointMixin",
    "LoRAConfig",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRAFinetuneCallback",
    "LoRALayer",
    "LoRALinear",
    "LoRAMultiheadAttention",
    "LoRAParameter",
    "ModulesToSave",
    "ParamSummary",
    "SafeCheckpointIO",
    "TargetError",
    "TrainableTokens",
    "active_adapter",
    "adapter_names",
    "adapter_parameters",
    "adapter_state_dict",
    "apply_kernels",
    "delete_adapter",
    "disable_adapters",
    "find_targets",
    "fold_gated_mlps",
    "inject_from_checkpoint",
    "inject_lora",
    "install_fused_paths",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge_lora",
    "model_card",
    "param_summary",
    "per_sample_adapters",
    "quantize_linears",
    "remove_fused_paths",
    "save_adapter",
    "save_gguf_adapter",
    "save_merged",
    "set_active_adapter",
    "unload_lora",
    "write_model_card",
]

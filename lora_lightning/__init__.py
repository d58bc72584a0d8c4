"""lora-lightning: LoRA fine-tuning as a PyTorch Lightning callback, with adapters in PEFT's format."""

from lora_lightning.callback import LoRAFinetuneCallback
from lora_lightning.checkpoint_io import SafeCheckpointIO
from lora_lightning.config import LoRAConfig
from lora_lightning.inject import InjectionReport, TargetError, find_targets, inject_lora, merge_lora, unload_lora
from lora_lightning.io import AdapterFormatError, load_adapter, save_adapter
from lora_lightning.layers import LoRALinear
from lora_lightning.params import (
    ParamSummary,
    adapter_parameters,
    adapter_state_dict,
    mark_only_adapters_trainable,
    param_summary,
)

__all__ = [
    "AdapterFormatError",
    "InjectionReport",
    "LoRAConfig",
    "LoRAFinetuneCallback",
    "LoRALinear",
    "ParamSummary",
    "SafeCheckpointIO",
    "TargetError",
    "adapter_parameters",
    "adapter_state_dict",
    "find_targets",
    "inject_lora",
    "load_adapter",
    "mark_only_adapters_trainable",
    "merge_lora",
    "param_summary",
    "save_adapter",
    "unload_lora",
]

"""Task modules (LightningModules) and loaders for the networks they wrap."""

from lora_lightning.app.models.backbones import (
    Backbone,
    from_pretrained,
    packaged_minilm,
    packaged_smollm2,
    tiny_causal_lm,
    tiny_encoder,
)
from lora_lightning.app.models.causal_lm import CausalLM
from lora_lightning.app.models.classifier import SequenceClassifier

__all__ = [
    "Backbone",
    "CausalLM",
    "SequenceClassifier",
    "from_pretrained",
    "packaged_minilm",
    "packaged_smollm2",
    "tiny_causal_lm",
    "tiny_encoder",
]

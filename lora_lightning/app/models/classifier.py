"""Sequence classification over a Hugging Face encoder: mean pooling and a new linear head."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lora_lightning.app.models.backbones import Backbone


class MeanPoolClassifier(nn.Module):
    """``classifier(dropout(mean of the encoder's token states over the attention mask))``."""

    def __init__(self, encoder: nn.Module, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:
            encoder.pooler = None  # BERT's [CLS] pooler is unused with mean pooling (and would idle under DDP)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(encoder.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return self.classifier(self.dropout(pooled))


class SequenceClassifier(pl.LightningModule):
    """Fine-tunes an encoder for classification; logs ``val/acc`` and macro ``val/f1`` (torchmetrics).

    The head is new, so it must be trained in full: ``new_modules`` lists it for ``modules_to_save``.
    ``lr`` is used only when no optimizer factory is given to the LoRA callback.
    """

    new_modules: tuple[str, ...] = ("classifier",)
    default_metric: tuple[str, str] = ("val/acc", "max")

    def __init__(self, backbone: Backbone, num_labels: int = 2, classifier_dropout: float = 0.1, lr: float = 1e-3):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"num_labels={num_labels}: a classifier needs at least 2 labels")
        self.save_hyperparameters(ignore=["backbone"])
        # .train(): loaders hand over eval mode, and Lightning keeps submodules' modes (no dropout otherwise)
        self.model = MeanPoolClassifier(backbone.model, num_labels, classifier_dropout).train()
        self.tokenizer = backbone.tokenizer
        self.base_model_name_or_path = backbone.name_or_path
        self.num_labels = num_labels
        self.lr = lr
        self.train_acc = MulticlassAccuracy(num_labels, average="micro")
        self.val_metrics = MetricCollection(
            {"acc": MulticlassAccuracy(num_labels, average="micro"), "f1": MulticlassF1Score(num_labels)},
            prefix="val/",
        )

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        found = getattr(datamodule, "num_labels", None)
        if found is not None and found != self.num_labels:
            raise ValueError(
                f"the data has {found} labels ({datamodule.label_names}) but model.num_labels={self.num_labels}; "
                f"set model.num_labels={found}"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.train_acc(logits.argmax(dim=-1), batch["labels"])
        size = len(batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=False, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = nn.functional.cross_entropy(logits, batch["labels"])
        self.val_metrics.update(logits.argmax(dim=-1), batch["labels"])
        self.log("val/loss", loss, batch_size=len(batch["labels"]), sync_dist=True)
        self.log_dict(self.val_metrics, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

"""Sequence classification with transformers' own classification model of an encoder, so that an adapter
trained here is PEFT's ``SEQ_CLS`` adapter of ``AutoModelForSequenceClassification.from_pretrained(base)``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

from lora_lightning.app.models.backbones import Backbone

CLASSIFICATION_MODELS = frozenset(MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values())


class SequenceClassifier(pl.LightningModule):
    """Fine-tunes a ``*ForSequenceClassification`` network (a backbone loaded with ``num_labels``); logs
    ``val/acc`` and macro ``val/f1`` (torchmetrics). The network's config says how many labels there are.

    The head (``classifier``) is new, so it must be trained in full: ``new_modules`` lists it for
    ``modules_to_save``, as PEFT's ``SEQ_CLS`` task does. ``lr`` is used only when no optimizer factory is given
    to the LoRA callback.
    """

    new_modules: tuple[str, ...] = ("classifier",)
    default_metric: tuple[str, str] = ("val/acc", "max")
    task_type: str = "SEQ_CLS"  # PEFT's task type: PeftModel.from_pretrained builds its classification model

    def __init__(self, backbone: Backbone, lr: float = 1e-3):
        super().__init__()
        name = type(backbone.model).__name__
        if name not in CLASSIFICATION_MODELS:
            raise ValueError(
                f"SequenceClassifier needs a classification model (AutoModelForSequenceClassification), got {name}; "
                "load the backbone with num_labels, e.g. model.backbone.num_labels=2"
            )
        if not isinstance(getattr(backbone.model, "classifier", None), nn.Module):
            raise ValueError(
                f"SequenceClassifier trains the new head as `classifier`, and {name} has none (its head has another "
                "name, e.g. `score`); use an encoder whose head is `classifier` (BERT, RoBERTa, DeBERTa, ELECTRA)"
            )
        self.save_hyperparameters(ignore=["backbone"])
        # .train(): loaders hand over eval mode, and Lightning keeps submodules' modes (no dropout otherwise)
        self.model = backbone.model.train()
        self.tokenizer = backbone.tokenizer
        self.base_model_name_or_path = backbone.name_or_path
        self.base_load_kwargs = backbone.load_kwargs
        self.num_labels = num_labels = self.model.config.num_labels
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
                f"the data has {found} labels ({datamodule.label_names}) but the model has {self.num_labels}; "
                f"set model.backbone.num_labels={found}"
            )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

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

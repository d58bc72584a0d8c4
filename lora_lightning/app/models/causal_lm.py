"""Causal language modelling over a Hugging Face decoder; perplexity through torchmetrics."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torchmetrics.text import Perplexity

from lora_lightning.app.data.lm import IGNORE_INDEX
from lora_lightning.app.models.backbones import Backbone


class CausalLM(pl.LightningModule):
    """Next-token fine-tune; logs ``val/loss`` and ``val/ppl`` (perplexity over all unmasked tokens).

    Batches hold ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` where no loss is taken).
    ``lr`` is used only when no optimizer factory is given to the LoRA callback.
    """

    new_modules: tuple[str, ...] = ()
    default_metric: tuple[str, str] = ("val/ppl", "min")
    task_type: str = "CAUSAL_LM"  # PEFT's task type: PeftModel.from_pretrained builds its causal-LM model

    def __init__(self, backbone: Backbone, lr: float = 1e-4) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["backbone"])
        self.model = backbone.model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes
        self.tokenizer = backbone.tokenizer
        self.base_model_name_or_path = backbone.name_or_path
        self.base_load_kwargs = backbone.load_kwargs
        self.lr = lr
        self.val_ppl = Perplexity(ignore_index=IGNORE_INDEX)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["input_ids"]))
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])[:, :-1].float()
        targets = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX)
        self.val_ppl.update(logits, targets)
        self.log("val/loss", loss, batch_size=len(targets), sync_dist=True)
        self.log("val/ppl", self.val_ppl, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)

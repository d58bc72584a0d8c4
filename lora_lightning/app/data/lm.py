"""Causal language-modelling data: texts tokenized, packed (joined with end-of-sequence tokens and cut into
blocks of equal length, so no padding is trained)."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from lora_lightning.app.data.base import ListDataset, TextDataModule, tokenize
from lora_lightning.app.data.files import column

IGNORE_INDEX = -100  # labels the loss skips (padding), as in torch's cross_entropy and transformers


class CausalLMDataModule(TextDataModule):
    """Batches of ``input_ids``, ``attention_mask`` and ``labels`` (``-100`` on padding) in blocks of
    ``block_size`` tokens. ``train_size`` and ``val_size`` count texts (documents), not blocks; the held-out
    texts never share a block with training texts."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: str | None = "vader_movies",
        train_file: str | None = None,
        val_file: str | None = None,
        text_field: str = "text",
        block_size: int = 128,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        train_size: int | None = None,
        val_size: int | None = 500,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(
            tokenizer, dataset, train_file, val_file, text_field, batch_size, eval_batch_size,
            train_size, val_size, seed, num_workers, cache_dir, group_by_length,
        )  # fmt: skip
        if block_size < 2:
            raise ValueError(f"data.block_size={block_size}: must be at least 2")
        self.block_size = block_size

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train, val, source = self.split_records()
        self.train_set = ListDataset(self._blocks(train, source))
        self.val_set = ListDataset(self._blocks(val, self.val_file or source))

    def _blocks(self, records: datasets.Dataset, source: str) -> list[dict[str, Any]]:
        """Packing: every text and an EOS token, one after another, cut into ``block_size`` blocks (no padding
        to train on); only a short tail is dropped."""
        column(records, self.text_field, source)
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no end-of-sequence token to separate texts")
        stream: list[int] = []
        for ids in tokenize(records, self.tokenizer, self.text_field, add_special_tokens=False):
            stream.extend([*ids, eos])
        size = self.block_size
        blocks = [stream[i : i + size] for i in range(0, len(stream), size)]
        if len(blocks) > 1 and len(blocks[-1]) < size:
            blocks.pop()  # a short tail would only add a padded batch
        return [{"input_ids": block} for block in blocks]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad([{"input_ids": i["input_ids"]} for i in items], return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": labels}

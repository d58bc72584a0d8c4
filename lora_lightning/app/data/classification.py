"""Text classification data: the built-in movie review sentiment set or your labelled files."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from transformers import PreTrainedTokenizerBase

from lora_lightning.app.data import vader
from lora_lightning.app.data.base import ListDataset, TextDataModule, tokenize
from lora_lightning.app.data.files import column


class ClassificationDataModule(TextDataModule):
    """Batches of ``input_ids``, ``attention_mask`` (padded per batch) and ``labels``.

    Labels in files may be integers ``0..K-1`` or strings (mapped to ids in sorted order); ``label_names``
    and ``num_labels`` are known after ``setup``. ``max_length`` truncates long texts.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: str | None = "vader_movies",
        train_file: str | None = None,
        val_file: str | None = None,
        text_field: str = "text",
        label_field: str = "label",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        train_size: int | None = None,
        val_size: int | None = 1000,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        group_by_length: bool = True,
    ) -> None:
        super().__init__(
            tokenizer, dataset, train_file, val_file, text_field, batch_size, eval_batch_size,
            train_size, val_size, seed, num_workers, cache_dir, group_by_length,
        )  # fmt: skip
        if max_length < 2:
            raise ValueError(f"data.max_length={max_length}: must be at least 2")
        self.label_field = label_field
        self.max_length = max_length
        self.label_names: list[str] | None = None

    @property
    def num_labels(self) -> int | None:
        return None if self.label_names is None else len(self.label_names)

    def setup(self, stage: str) -> None:
        if self.train_set is not None:
            return
        train, val, source = self.split_records()
        if self.dataset == "vader_movies":
            self.label_names = list(vader.LABEL_NAMES)
            to_id = {0: 0, 1: 1}
        else:
            self.label_names, to_id = label_mapping(column(train, self.label_field, source))
        self.train_set = ListDataset(self._encode(train, to_id, source))
        self.val_set = ListDataset(self._encode(val, to_id, self.val_file or source))

    def _encode(self, records: datasets.Dataset, to_id: dict[Any, int], source: str) -> list[dict[str, Any]]:
        column(records, self.text_field, source)
        labels = column(records, self.label_field, source)
        unknown = sorted({str(label) for label in labels if _key(label) not in to_id})
        if unknown:
            raise ValueError(f"{source}: labels {unknown} are not among the training labels {self.label_names}")
        ids = tokenize(records, self.tokenizer, self.text_field, truncation=True, max_length=self.max_length)
        return [{"input_ids": i, "labels": to_id[_key(label)]} for i, label in zip(ids, labels, strict=True)]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer.pad([{"input_ids": i["input_ids"]} for i in items], return_tensors="pt")
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": torch.tensor([i["labels"] for i in items]),
        }


def label_mapping(labels: list[Any]) -> tuple[list[str], dict[Any, int]]:
    """Integer labels ``0..K-1`` keep their ids; anything else maps to ids in sorted order."""
    keys = sorted({_key(label) for label in labels}, key=lambda k: (isinstance(k, str), k))
    if all(isinstance(k, int) for k in keys):
        if keys[0] < 0:
            raise ValueError(f"integer labels must be 0..K-1, got {keys[0]}")
        return [str(i) for i in range(keys[-1] + 1)], {i: i for i in range(keys[-1] + 1)}
    return [str(k) for k in keys], {k: i for i, k in enumerate(keys)}


def _key(label: Any) -> Any:
    """One key per label whether it came as 1, "1" (CSV) or 1.0; other strings stay strings."""
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, float) and label.is_integer():
        return int(label)
    if isinstance(label, str) and label.strip().lstrip("-").isdigit():
        return int(label)
    return label.strip() if isinstance(label, str) else label

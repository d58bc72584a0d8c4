"""What the task data modules share: where examples come from (a built-in set or your files) and the split."""

from __future__ import annotations

import random
from typing import Any

import datasets
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerBase

from lora_lightning.app.data.files import load_builtin, prepare_builtin, read_records
from lora_lightning.app.resume import ResumableLoader


def tokenize(records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, field: str, **options: Any) -> list[Any]:
    """The ``input_ids`` of every record's ``field``, tokenized in batches by `datasets.Dataset.map` (cached
    beside a file-backed data set's Arrow files)."""

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        return {"input_ids": tokenizer([str(t) for t in batch[field]], **options)["input_ids"]}

    return records.map(encode, batched=True, remove_columns=records.column_names)["input_ids"]


class ListDataset(Dataset):
    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        return self.items[index]


def length_grouped_batches(
    items: list[dict[str, Any]], batch_size: int, rng: random.Random | None, window: int = 64
) -> list[list[dict[str, Any]]]:
    """Cut ``items`` into batches of similar ``input_ids`` length. With ``rng``: shuffle, sort each window of
    ``window`` batches' worth of items by length, cut (so batches stay random draws); without: sort all."""
    order = list(range(len(items)))
    span = len(order)
    if rng is not None:
        rng.shuffle(order)
        span = batch_size * window
    batches = []
    for start in range(0, len(order), span):
        chunk = sorted(order[start : start + span], key=lambda i: len(items[i]["input_ids"]))
        batches += [[items[i] for i in chunk[j : j + batch_size]] for j in range(0, len(chunk), batch_size)]
    return batches


class TextDataModule(pl.LightningDataModule):
    """Examples from a built-in data set (``dataset``) or from files (``train_file`` and optionally
    ``val_file``). Without ``val_file``, ``val_size`` examples are held out of a seeded shuffle; with one,
    ``val_size`` caps it. ``train_size`` caps the training examples (``None``: all). ``group_by_length``
    batches examples of similar length together (see `loader`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        dataset: str | None = None,
        train_file: str | None = None,
        val_file: str | None = None,
        text_field: str = "text",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        train_size: int | None = None,
        val_size: int | None = 1000,
        seed: int = 0,
        num_workers: int = 0,
        cache_dir: str | None = None,
        group_by_length: bool = True,
    ) -> None:
        super().__init__()
        if (dataset is None) == (train_file is None):
            raise ValueError(
                f"data: give exactly one of dataset (built in: vader_movies) and train_file; got dataset={dataset!r}, "
                f"train_file={train_file!r} (for your own files set data.dataset=null)"
            )
        if val_file is not None and train_file is None:
            raise ValueError("data.val_file needs data.train_file")
        for name, value in (("batch_size", batch_size), ("train_size", train_size), ("val_size", val_size)):
            if value is not None and value < 1:
                raise ValueError(f"data.{name}={value}: must be at least 1")
        self.tokenizer = tokenizer
        self.dataset, self.train_file, self.val_file = dataset, train_file, val_file
        self.text_field = text_field
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_size, self.val_size = train_size, val_size
        self.seed, self.num_workers, self.cache_dir = seed, num_workers, cache_dir
        self.group_by_length = group_by_length
        self.train_set: ListDataset | None = None
        self.val_set: ListDataset | None = None

    def prepare_data(self) -> None:
        if self.dataset is not None:
            prepare_builtin(self.dataset, self.cache_dir)

    def split_records(self) -> tuple[datasets.Dataset, datasets.Dataset, str]:
        """(train, held-out, a name for messages), from one seeded shuffle of the training examples."""
        if self.dataset is not None:
            records, val, source = load_builtin(self.dataset, self.cache_dir), None, self.dataset
        else:
            records, source = read_records(self.train_file, self.cache_dir), str(self.train_file)
            val = read_records(self.val_file, self.cache_dir) if self.val_file else None
        order = list(range(len(records)))
        random.Random(self.seed).shuffle(order)
        if val is None:
            held = self.val_size or 0
            if held >= len(order):
                raise ValueError(f"{source}: val_size={held} leaves no training example ({len(order)} in all)")
            val, order = records.select(order[:held]), order[held:]
        elif self.val_size is not None:
            val = val.select(range(min(self.val_size, len(val))))
        return records.select(order[: self.train_size]), val, source

    def loader(self, data: ListDataset | None, train: bool) -> DataLoader:
        """Batches of examples of similar length when ``group_by_length`` (less padding: on the movie reviews
        about half the compute of random batches), formed once and served in a shuffled order for training."""
        if data is None:
            raise RuntimeError("the data module is not set up; call setup('fit') first")
        size = self.batch_size if train else self.eval_batch_size
        options: dict[str, Any] = {
            "shuffle": train,
            "generator": torch.Generator().manual_seed(self.seed) if train else None,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "collate_fn": self.collate,
        }
        loader_type = ResumableLoader if train else DataLoader  # training resumes mid-epoch where it stopped
        if self.group_by_length:
            batches = length_grouped_batches(data.items, size, random.Random(self.seed) if train else None)
            return loader_type(ListDataset(batches), batch_size=None, **options)
        return loader_type(data, batch_size=size, **options)

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

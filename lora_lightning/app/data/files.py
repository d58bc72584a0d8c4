"""Reading your own text data through Hugging Face ``datasets`` (Arrow-backed, cached): CSV, TSV, JSON Lines, JSON
(a list of objects) or plain text (one example a line)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import datasets

from lora_lightning.app.data.vader import cache_root, movie_reviews_file, read_movie_reviews

# file suffix -> (datasets' builder, its options)
BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".jsonl": ("json", {}),
    ".json": ("json", {}),
    ".txt": ("text", {}),
}
SUFFIXES = tuple(BUILDERS)
BUILTIN = ("vader_movies",)


def read_records(path: str | os.PathLike[str], cache_dir: str | None = None) -> datasets.Dataset:
    """Every example of a data file, as a `datasets.Dataset` built (once, then from its Arrow cache under
    ``<cache>/datasets``) by the builder for its type. A ``.txt`` file gives ``{"text": line}`` per non-empty line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in BUILDERS:
        raise ValueError(f"data file {str(path)!r}: unsupported type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    builder, options = BUILDERS[suffix]
    try:
        records = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(cache_root(cache_dir) / "datasets"), **options
        )
    except datasets.exceptions.DatasetGenerationError as err:
        raise ValueError(f"{path}: cannot be read as {builder} ({err.__cause__ or err})") from err
    if builder == "text":
        records = records.filter(lambda line: bool(line["text"].strip()))
    if len(records) == 0:
        raise ValueError(f"{path}: no examples found")
    return records


def column(records: datasets.Dataset, field: str, source: str) -> list[Any]:
    """The values of one field, failing with the fields that do exist when it is missing or empty."""
    values = records[field] if field in records.column_names else [None] * len(records)
    missing = next((i for i, v in enumerate(values) if v in (None, "")), None)
    if missing is not None:
        present = sorted(k for k, v in records[missing].items() if v not in (None, ""))
        raise ValueError(
            f"{source}: example {missing + 1} has no {field!r} field (fields present: {present}); "
            "choose the field with data.text_field / data.label_field"
        )
    return values


def load_builtin(name: str, cache_dir: str | None = None) -> datasets.Dataset:
    """A built-in data set by name (fetched and cached on first use)."""
    prepare_builtin(name, cache_dir)
    return datasets.Dataset.from_list(read_movie_reviews(movie_reviews_file(cache_dir)))


def prepare_builtin(name: str, cache_dir: str | None = None) -> None:
    """Download a built-in data set if it is not cached yet (rank 0 only, from ``prepare_data``)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; built in: {', '.join(BUILTIN)}; or give data.train_file")
    movie_reviews_file(cache_dir)

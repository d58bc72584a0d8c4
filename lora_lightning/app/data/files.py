"""Reading your own text data: CSV, TSV, JSON Lines, JSON (a list of objects) or plain text (one example a line)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from lora_lightning.app.data.vader import movie_reviews_file, read_movie_reviews

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".txt")
BUILTIN = ("vader_movies",)


def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every example of a data file as a dict. A ``.txt`` file gives ``{"text": line}`` per non-empty line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"data file {str(path)!r}: unsupported type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    with open(path, encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            records: list[Any] = list(csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix == ".jsonl":
            records = [_json_line(line, path, n) for n, line in enumerate(handle, start=1) if line.strip()]
        elif suffix == ".json":
            records = json.load(handle)
            if not isinstance(records, list):
                raise ValueError(f"{path}: a .json data file must hold a list of objects")
        else:
            records = [{"text": line.rstrip("\r\n")} for line in handle if line.strip()]
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: example {bad + 1} is not an object with named fields: {records[bad]!r}")
    if not records:
        raise ValueError(f"{path}: no examples found")
    return records


def column(records: list[dict[str, Any]], field: str, source: str) -> list[Any]:
    """The values of one field, failing with the fields that do exist when it is missing or empty."""
    missing = [i for i, r in enumerate(records) if r.get(field) in (None, "")]
    if missing:
        present = sorted(records[missing[0]])
        raise ValueError(
            f"{source}: example {missing[0] + 1} has no {field!r} field (fields present: {present}); "
            "choose the field with data.text_field / data.label_field"
        )
    return [r[field] for r in records]


def load_builtin(name: str, cache_dir: str | None = None) -> list[dict[str, Any]]:
    """A built-in data set by name (fetched and cached on first use)."""
    prepare_builtin(name, cache_dir)
    return read_movie_reviews(movie_reviews_file(cache_dir))


def prepare_builtin(name: str, cache_dir: str | None = None) -> None:
    """Download a built-in data set if it is not cached yet (rank 0 only, from ``prepare_data``)."""
    if name not in BUILTIN:
        raise ValueError(f"unknown built-in data set {name!r}; built in: {', '.join(BUILTIN)}; or give data.train_file")
    movie_reviews_file(cache_dir)


def _json_line(line: str, path: Path, number: int) -> Any:
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from err

"""Data: the movie review fetch (cache, checksum, clear errors), reading your own files, the data modules."""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
from pathlib import Path

import datasets
import pytest
import torch

from lora_lightning.app.data import (
    CausalLMDataModule,
    ClassificationDataModule,
    DataFetchError,
    movie_reviews_file,
    read_movie_reviews,
    read_records,
    vader,
)
from lora_lightning.app.data.base import length_grouped_batches
from lora_lightning.app.data.classification import label_mapping
from lora_lightning.app.models.tokenizers import byte_tokenizer
from tests.helpers.app import sentiment_rows, write_csv, write_jsonl

GROUND_TRUTH = (
    "1\t2.26666666667\tThe Rock is destined to be great.\r\n"
    "2\t-0.6\tEffective but too tepid biopic\r\n"
    "3\t0\tA film.\r\n"
)


def fake_sdist(folder: Path, text: str = GROUND_TRUTH) -> Path:
    """A source distribution laid out like vaderSentiment 3.3.2's: the data in a tarball inside the tarball."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        _add(archive, vader.MEMBER, text.encode())
    path = folder / vader.SDIST_NAME
    with tarfile.open(path, "w:gz") as archive:
        _add(archive, vader.INNER_ARCHIVE, inner.getvalue())
    return path


def _add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def fake_pip(monkeypatch: pytest.MonkeyPatch, source: Path | None, code: int = 0) -> None:
    """Make `pip download` a script that copies ``source`` into ``--dest`` (or fails with ``code``)."""
    fail = f"sys.stderr.write('ERROR: no route to index'); sys.exit({code})"
    act = f"shutil.copy({str(source)!r}, dest)" if source else fail
    script = "import shutil, sys; dest = sys.argv[sys.argv.index('--dest') + 1]; " + act
    monkeypatch.setattr(vader, "PIP", (sys.executable, "-c", script))


def test_fetch_verifies_extracts_and_caches(tmp_path, monkeypatch) -> None:
    sdist = fake_sdist(tmp_path)
    monkeypatch.setattr(vader, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    fake_pip(monkeypatch, sdist)
    path = movie_reviews_file(tmp_path / "cache")
    assert path == tmp_path / "cache" / "vader" / vader.FILE_NAME
    assert read_movie_reviews(path) == [
        {"text": "The Rock is destined to be great.", "label": 1, "score": 2.26666666667},
        {"text": "Effective but too tepid biopic", "label": 0, "score": -0.6},
    ]  # the neutral (score 0) snippet is left out; CRLF line ends are handled
    fake_pip(monkeypatch, None, code=1)  # cached: pip is not run again
    assert movie_reviews_file(tmp_path / "cache") == path


def test_a_failed_fetch_says_what_to_do(tmp_path, monkeypatch) -> None:
    fake_pip(monkeypatch, None, code=1)
    with pytest.raises(DataFetchError) as failure:
        movie_reviews_file(tmp_path)
    message = str(failure.value)
    assert "vaderSentiment==3.3.2" in message and "no route to index" in message
    assert vader.FILE_NAME in message and "data.train_file" in message
    assert not (tmp_path / "vader" / vader.FILE_NAME).exists()


def test_a_tampered_download_is_refused(tmp_path, monkeypatch) -> None:
    fake_pip(monkeypatch, fake_sdist(tmp_path))
    with pytest.raises(DataFetchError, match="SHA-256"):
        movie_reviews_file(tmp_path / "cache")


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORA_LIGHTNING_CACHE", str(tmp_path))
    assert vader.cache_root() == tmp_path
    assert vader.cache_root(tmp_path / "x") == tmp_path / "x"


def test_the_real_movie_review_data() -> None:
    """Fetched once through pip from the package registry (then cached), as the default run does."""
    records = read_movie_reviews(movie_reviews_file())
    assert len(records) == 10_568
    positives = sum(r["label"] for r in records)
    assert 5_000 < positives < 5_600
    assert all(r["text"] for r in records)


def test_read_records_in_every_format(tmp_path) -> None:
    """Through Hugging Face datasets' csv/json/text builders, into an Arrow cache under the given cache folder."""
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad, long film", "label": "neg"}]
    cache = str(tmp_path / "cache")
    records = read_records(write_csv(tmp_path / "d.csv", rows), cache)
    assert isinstance(records, datasets.Dataset) and records.to_list() == rows
    assert list((tmp_path / "cache" / "datasets").rglob("*.arrow"))
    assert read_records(write_jsonl(tmp_path / "d.jsonl", rows), cache).to_list() == rows
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert read_records(tmp_path / "d.json", cache).to_list() == rows
    (tmp_path / "d.tsv").write_text("text\tlabel\ngood film\tpos\nbad, long film\tneg\n")
    assert read_records(tmp_path / "d.tsv", cache).to_list() == rows
    (tmp_path / "d.txt").write_text("first line\n\nsecond line\n")
    assert read_records(tmp_path / "d.txt", cache).to_list() == [{"text": "first line"}, {"text": "second line"}]


def test_read_records_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        read_records(tmp_path / "missing.csv")
    (tmp_path / "d.parquet").write_text("x")
    with pytest.raises(ValueError, match=r"unsupported type '\.parquet'"):
        read_records(tmp_path / "d.parquet")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": broken}\n')
    with pytest.raises(ValueError, match=r"d.jsonl: cannot be read as json"):
        read_records(tmp_path / "d.jsonl", str(tmp_path / "cache"))


def test_label_mapping() -> None:
    assert label_mapping([1, "0", 1.0, 2]) == (["0", "1", "2"], {0: 0, 1: 1, 2: 2})
    assert label_mapping(["pos", "neg", "pos"]) == (["neg", "pos"], {"neg": 0, "pos": 1})


def test_classification_data_from_files(tmp_path) -> None:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(40))
    val = write_jsonl(tmp_path / "val.jsonl", sentiment_rows(10, seed=1))
    data = ClassificationDataModule(byte_tokenizer(), dataset=None, train_file=str(train), val_file=str(val),
                                    batch_size=8, eval_batch_size=4, max_length=16)  # fmt: skip
    data.setup("fit")
    assert data.label_names == ["neg", "pos"] and data.num_labels == 2
    assert len(data.train_set) == 40 and len(data.val_set) == 10
    batches = list(data.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 40
    batch = batches[0]
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[1] <= 16
    assert batch["labels"].dtype == torch.long and set(batch["labels"].tolist()) <= {0, 1}
    assert sum(len(b["labels"]) for b in data.val_dataloader()) == 10


def test_classification_data_holds_out_val_size_of_one_file(tmp_path) -> None:
    train = write_csv(tmp_path / "train.csv", sentiment_rows(30))
    data = ClassificationDataModule(byte_tokenizer(), dataset=None, train_file=str(train), val_size=6, train_size=20)
    data.setup("fit")
    assert (len(data.train_set), len(data.val_set)) == (20, 6)


def test_classification_data_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="exactly one of dataset"):
        ClassificationDataModule(byte_tokenizer(), dataset="vader_movies", train_file="x.csv")
    rows = sentiment_rows(10)
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", [{"text": "meh", "label": "neutral"}])
    data = ClassificationDataModule(byte_tokenizer(), dataset=None, train_file=str(train), val_file=str(val))
    with pytest.raises(ValueError, match=r"labels \['neutral'\] are not among the training labels"):
        data.setup("fit")
    data = ClassificationDataModule(
        byte_tokenizer(), dataset=None, train_file=str(train), text_field="review", val_size=2
    )
    with pytest.raises(ValueError, match="has no 'review' field"):
        data.setup("fit")


def test_length_grouped_batches_cover_every_item_once() -> None:
    items = [{"input_ids": [0] * n, "n": i} for i, n in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6, 10])]
    sorted_batches = length_grouped_batches(items, 3, None)
    assert [[len(i["input_ids"]) for i in b] for b in sorted_batches] == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    import random

    shuffled = length_grouped_batches(items, 3, random.Random(0), window=2)
    assert sorted(i["n"] for b in shuffled for i in b) == list(range(10))


def test_causal_lm_data_in_blocks(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"line number {i} of a small corpus\n" for i in range(60)))
    tokenizer = byte_tokenizer()
    data = CausalLMDataModule(tokenizer, dataset=None, train_file=str(corpus), block_size=32, batch_size=4, val_size=10)
    data.setup("fit")
    assert all(len(b["input_ids"]) == 32 for b in data.train_set.items)
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (4, 32)
    assert torch.equal(batch["labels"], batch["input_ids"])  # full blocks: nothing masked
    stream = [t for b in data.val_set.items for t in b["input_ids"]]
    assert tokenizer.eos_token_id in stream  # texts are separated by EOS
    short = CausalLMDataModule(tokenizer, dataset=None, train_file=str(corpus), block_size=4096, val_size=10)
    short.setup("fit")
    padded = short.collate([short.train_set.items[0], {"input_ids": [5, 6]}])
    assert (padded["labels"][1, 2:] == -100).all()  # padding is never a target

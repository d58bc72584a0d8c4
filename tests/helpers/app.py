"""Shared by the training-app tests: composing the Hydra config in-process, small local data files, and a
reader for W&B's offline run files."""

from __future__ import annotations

import csv
import json
import random
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from lora_lightning.app.train import CONF_DIR

POSITIVE = ["a joy to watch", "wonderful acting", "great fun", "moving and smart", "a delight", "superb story"]
NEGATIVE = ["a dull mess", "boring and long", "awful script", "a tedious bore", "painfully bad", "weak and flat"]


def compose_train(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """The training config as Hydra composes it for ``python scripts/train.py <overrides>``, with the hydra
    node set (so ``${hydra:...}`` and run naming work) and the run folder at ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(output_dir)
            cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    return cfg


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Short texts whose label is obvious from their words: even a tiny model can learn some of it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(POSITIVE if label else NEGATIVE, 2)
        rows.append({"text": f"{words[0]}, {words[1]}", "label": "pos" if label else "neg"})
    return rows


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def wandb_records(path: Path) -> Iterator[Any]:
    """The records of an offline run's ``run-<id>.wandb`` file (LevelDB-style log: 32 KiB blocks of chunks
    with a 7-byte header crc32c/length/type, after a 7-byte W&B file header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    block, position, pending = 32 * 1024, 7, b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # block trailer padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0:
            continue
        pending += chunk
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """Name, group, id and config of the one offline W&B run under ``run_dir/wandb``, the names of its
    artifacts and, by name, each one's ``aliases`` and ``metadata``."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {run_dir}, found {files}"
    info: dict[str, Any] = {"config": {}, "artifacts": [], "artifact": {}}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(name=record.run.display_name, group=record.run.run_group, id=record.run.run_id)
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "artifact":
            artifact = record.artifact
            info["artifacts"].append(artifact.name)
            metadata = json.loads(artifact.metadata) if artifact.metadata else {}
            info["artifact"][artifact.name] = {"aliases": list(artifact.aliases), "metadata": metadata}
            continue
        else:
            continue
        for item in updates:
            info["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return info

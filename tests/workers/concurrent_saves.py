"""Subprocess side of tests/lib/test_reliability_concurrency.py: writers that save adapters to one folder at the
same time, a reader that loads it meanwhile, and a writer that stops between the two renames of a swap without
``RENAME_EXCHANGE`` (to be killed there).

    python -m tests.workers.concurrent_saves write PATH WRITER ROUNDS [--no-exchange]
    python -m tests.workers.concurrent_saves read PATH STOP [--no-exchange]      # until the file STOP exists
    python -m tests.workers.concurrent_saves stop-between-renames PATH SEED     # prints "PAUSED <backup>"

Every save is recognisable whole: save ``s`` (``WRITER * 1000 + ROUND + 1``) has ``lora_alpha = s`` in its config
and ``s`` in every ``lora_B`` entry, so a reader that finds the alpha of one save with the tensors of another has
read half of each.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from tests.workers.common import pause, without_lightning

if __name__ == "__main__":
    without_lightning()

import torch
from torch import nn

import lora_lightning.files as lora_files
from lora_lightning.config import LoRAConfig
from lora_lightning.inject import inject_lora
from lora_lightning.io import load_adapter, save_adapter
from lora_lightning.params import lora_layers


def base() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


def adapter(seed: int) -> nn.Sequential:
    """Save ``seed``: alpha = seed and every lora_B entry = seed."""
    model = base()
    inject_lora(model, LoRAConfig(r=2, alpha=seed, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.fill_(seed)
    return model


def seed_of(model: nn.Module) -> int:
    """The save a loaded model came from; -1 when its config and tensors come from different saves."""
    seeds = {layer.alpha for _, layer in lora_layers(model)}
    seeds |= {float(v) for _, layer in lora_layers(model) for v in layer.lora_B["default"].weight.unique()}
    return int(seeds.pop()) if len(seeds) == 1 else -1


def no_exchange() -> None:
    """What a file system without RENAME_EXCHANGE does: every swap takes two renames."""
    lora_files._exchange = lambda a, b: False


def write(path: Path, writer: int, rounds: int) -> None:
    failed = 0
    for round_ in range(rounds):
        seed = writer * 1000 + round_ + 1
        try:
            save_adapter(adapter(seed), path, overwrite=True)
            print(f"SAVED {seed}", flush=True)
        except Exception as err:  # counted: the test requires none
            failed += 1
            print(f"FAILED {seed} {type(err).__name__}: {err}", flush=True)
    print(f"DONE {failed}", flush=True)


def read(path: Path, stop: Path) -> None:
    """Load the adapter again and again until ``stop`` exists; report what was seen as JSON. ``gone`` counts the
    times the folder was not there when looked at directly (without the library's lock)."""
    seen: list[int] = []
    errors: list[str] = []
    gone = 0
    print("READY", flush=True)
    while not stop.exists():
        gone += not path.is_dir()
        model = base()
        try:
            load_adapter(model, path)
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}")
            continue
        seen.append(seed_of(model))
    print("SEEN " + json.dumps({"seen": seen, "errors": errors[:5], "error_count": len(errors), "gone": gone}))


def stop_between_renames(path: Path, seed: int) -> None:
    """Save ``seed`` without RENAME_EXCHANGE and stop after the old folder went to its backup name."""
    no_exchange()
    real_rename = os.rename

    def rename(a, b) -> None:
        real_rename(a, b)
        if Path(a) == path:
            pause(f"PAUSED {b}")

    lora_files.os.rename = rename
    save_adapter(adapter(seed), path, overwrite=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    writer = commands.add_parser("write")
    writer.add_argument("path", type=Path)
    writer.add_argument("writer", type=int)
    writer.add_argument("rounds", type=int)
    reader = commands.add_parser("read")
    reader.add_argument("path", type=Path)
    reader.add_argument("stop", type=Path)
    for command in (writer, reader):
        command.add_argument("--no-exchange", action="store_true")
    stopper = commands.add_parser("stop-between-renames")
    stopper.add_argument("path", type=Path)
    stopper.add_argument("seed", type=int)
    args = parser.parse_args()
    if getattr(args, "no_exchange", False):
        no_exchange()
    if args.command == "write":
        write(args.path, args.writer, args.rounds)
    elif args.command == "read":
        read(args.path, args.stop)
    else:
        stop_between_renames(args.path, args.seed)


if __name__ == "__main__":
    main()

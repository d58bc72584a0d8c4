"""Subprocess side of the adapter-save crash test in tests/lib/test_reliability_crash.py: saves an adapter and can
stop itself mid-save ("PAUSED <path>" on stdout, then sleeps) so that the test kills it with SIGKILL there.

    python -m tests.workers.adapter_worker save PATH SEED [--pause mid-write|before-swap]
    python -m tests.workers.adapter_worker loop PATH        # overwrite PATH with seed 1, 2, 1, 2, ... until killed
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from tests.workers.common import pause, without_lightning

if __name__ == "__main__":
    without_lightning()

import torch
from torch import nn

import lora_lightning.files as lora_files
import lora_lightning.io as lora_io
from lora_lightning.config import LoRAConfig
from lora_lightning.inject import inject_lora
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import WEIGHTS_NAME


def adapted_mlp(seed: int) -> nn.Sequential:
    """The same model for the same seed in any process: LoRA on "0" and "2", head "4" trained in full."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    inject_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["4"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=generator))
        model[4].weight.add_(torch.randn(model[4].weight.shape, generator=generator))
    return model.eval()


def save(path: Path, seed: int, where: str | None) -> None:
    if where == "mid-write":  # the tensors file is half on disk when the process dies
        real_write_bytes = Path.write_bytes

        def half_written(file: Path, data: bytes) -> int:
            if file.name != WEIGHTS_NAME:
                return real_write_bytes(file, data)
            real_write_bytes(file, data[: len(data) // 2])
            pause(f"PAUSED {file}")

        Path.write_bytes = half_written
    elif where == "before-swap":  # the new folder is complete and synced but not yet in place
        real_rename = lora_files.os.rename
        lora_files._exchange = lambda staging, target: pause(f"PAUSED {staging}")
        lora_files.os.rename = lambda a, b: pause(f"PAUSED {a}") if Path(b) == path else real_rename(a, b)
    lora_io.save_adapter(adapted_mlp(seed), path, overwrite=True)
    print("SAVED", flush=True)


def loop(path: Path) -> None:
    for i in itertools.count():
        lora_io.save_adapter(adapted_mlp(1 + i % 2), path, overwrite=True)
        print(f"SAVED {i}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    one = commands.add_parser("save")
    one.add_argument("path", type=Path)
    one.add_argument("seed", type=int)
    one.add_argument("--pause", choices=["mid-write", "before-swap"])
    many = commands.add_parser("loop")
    many.add_argument("path", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.path, args.seed, args.pause)
    else:
        loop(args.path)


if __name__ == "__main__":
    main()

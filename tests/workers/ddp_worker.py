"""Run by tests/lib/test_ddp.py in a fresh process: a LoRA fine-tune under DDP with 2 CPU (gloo) processes.

Lightning's DDP launcher re-runs this script for rank 1; each rank writes what it saw to <out>/rank<k>.json.
Usage: python -m tests.workers.ddp_worker <out dir> <epochs> [<ckpt to resume>]
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, adapter_state_dict
from tests.helpers.models import MLPModule, classification_data, make_trainer


def main() -> None:
    out, epochs = Path(sys.argv[1]), int(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    module = MLPModule()
    base = {k: v.clone() for k, v in module.state_dict().items()}
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_last=True)
    trainer = make_trainer(
        out, accelerator="cpu", devices=2, strategy="ddp", max_epochs=epochs, enable_checkpointing=True,
        callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"])), checkpoints],
    )  # fmt: skip
    trainer.fit(module, classification_data(), ckpt_path=ckpt)
    # the base's tensors under their names before injection (LoRA moves them under ".base_layer"); net.4 trains
    state = {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items()}
    frozen = [k for k in base if not k.startswith("net.4.")]
    frozen_moved = [k for k in frozen if not torch.equal(state[k], base[k])]
    grads = {n: p.grad is not None for n, p in module.named_parameters()}
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "adapter_sum": {k: v.double().sum().item() for k, v in adapter_state_dict(module).items()},
        "frozen_checked": frozen,
        "frozen_moved": frozen_moved,
        "params_with_grad": sorted(n for n, has in grads.items() if has),
        "losses": module.losses,
        "last": checkpoints.last_model_path,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

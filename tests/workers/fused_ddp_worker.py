"""Run by tests/lib/test_fused_training.py in a fresh process: the tiny Llama fine-tuned under DDP with 2 CPU (gloo)
processes through LoRAFinetuneCallback, with the fused paths ("fused") or without them ("plain").

Each rank writes what it saw to <out>/rank<k>.json. Usage: python -m tests.workers.fused_ddp_worker <out dir> <mode>
"""

import json
import sys
from pathlib import Path

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, adapter_state_dict, callback
from tests.helpers.models import LlamaModule, make_trainer, token_data


class Watching(LlamaModule):
    fused = False

    def training_step(self, batch, batch_idx):
        self.fused = self.fused or "forward" in self.model.model.layers[0].mlp.__dict__
        return super().training_step(batch, batch_idx)


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "plain":
        callback.install_fused_paths = lambda model: None
    module = Watching()
    trainer = make_trainer(
        out, accelerator="cpu", devices=2, strategy="ddp", max_epochs=2,
        callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8))],
    )  # fmt: skip
    trainer.fit(module, token_data())
    record = {
        "fused": module.fused,
        "adapter_sum": {k: v.double().sum().item() for k, v in adapter_state_dict(module).items()},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

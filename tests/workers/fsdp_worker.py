"""Run by tests/lib/test_fsdp.py in a fresh process: a LoRA fine-tune of a tiny Llama on 2 devices.

Modes: ``fsdp`` (Lightning's FSDPStrategy, FSDP1 with ``use_orig_params``, one unit per decoder layer),
``fsdp_ac`` (the same with activation checkpointing of every decoder layer), ``fsdp2`` (ModelParallelStrategy:
adapters injected before ``fully_shard`` of every decoder layer) and ``ddp_gc`` (DDP with non-reentrant gradient
checkpointing). Lightning's launcher re-runs this script for rank 1. Each rank writes <out>/rank<k>.json and the
logits of a fixed probe batch at the start and the end of training, <out>/logits_{start,end}_rank<k>.pt.

Usage: python -m tests.workers.fsdp_worker <out dir> <mode> <cpu|gpu> <epochs> [<ckpt to resume>]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, SafeCheckpointIO, inject_lora
from lora_lightning.modules import canonical_name
from lora_lightning.params import lora_layers
from tests.helpers.models import LlamaModule, make_trainer, token_data

CONFIG = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
PROBED = "model.model.layers.0.self_attn.q_proj"  # counts its forward calls: twice per step when checkpointed
MODES = ("fsdp", "fsdp_ac", "fsdp2", "ddp_gc")


def probe_tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


class CountingCheckpointIO(SafeCheckpointIO):
    """Records the checkpoint files this process writes."""

    saved: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.saved.append(Path(path).name)
        super().save_checkpoint(checkpoint, path, storage_options)


class WorkerModule(LlamaModule):
    def __init__(self, out: Path, mode: str) -> None:
        super().__init__()
        self.out = out
        self.model.train()  # Lightning keeps modes; transformers checkpoints only in training mode
        if mode == "ddp_gc":
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.with_grad: set[str] = set()
        self.optimizer_steps = 0
        self.probed_calls = 0
        self.train_calls = 0

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=tokens).logits

    def on_train_start(self) -> None:
        self.save_probe("start")
        probed = next(m for n, m in self.named_modules() if canonical_name(n) == PROBED)
        probed.register_forward_hook(lambda *_: setattr(self, "probed_calls", self.probed_calls + 1))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer_steps += 1
        self.with_grad |= {canonical_name(n) for n, p in self.named_parameters() if p.grad is not None}

    def on_train_end(self) -> None:
        self.train_calls = self.probed_calls
        self.save_probe("end")

    @torch.no_grad()
    def save_probe(self, when: str) -> None:
        """Logits of the probe batch through the wrapped model (a collective under FSDP)."""
        logits = self.trainer.model(probe_tokens().to(self.trainer.strategy.root_device))
        torch.save(logits.float().cpu(), self.out / f"logits_{when}_rank{self.global_rank}.pt")


class Fsdp2Module(WorkerModule):
    """FSDP2 through ModelParallelStrategy: adapters first, then one ``fully_shard`` unit per decoder layer."""

    def configure_model(self) -> None:
        if next(lora_layers(self), None) is None:
            inject_lora(self.model, CONFIG)  # fully_shard must see the adapter parameters
        mesh = self.device_mesh["data_parallel"]
        from torch.distributed.fsdp import fully_shard

        for layer in self.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def strategy_for(mode: str) -> Strategy | str:
    if mode == "fsdp":
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer})
    if mode == "fsdp_ac":
        return FSDPStrategy(auto_wrap_policy={LlamaDecoderLayer}, activation_checkpointing_policy={LlamaDecoderLayer})
    if mode == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=False)
    return "ddp"  # find_unused_parameters stays False: only adapters are registered with DDP


def main() -> None:
    out, mode, accelerator, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    ckpt = sys.argv[5] if len(sys.argv) > 5 else None
    if mode not in MODES:
        raise SystemExit(f"mode {mode!r} is not one of {MODES}")
    out.mkdir(parents=True, exist_ok=True)
    module = (Fsdp2Module if mode == "fsdp2" else WorkerModule)(out, mode)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", save_last=True)
    trainer = make_trainer(
        out, accelerator=accelerator, devices=2, strategy=strategy_for(mode), max_epochs=epochs,
        enable_checkpointing=True, plugins=[CountingCheckpointIO()],
        callbacks=[LoRAFinetuneCallback(CONFIG), checkpoints],
    )  # fmt: skip
    trainer.fit(module, token_data(), ckpt_path=ckpt)
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(trainer.strategy).__name__,
        "params_with_grad": sorted(module.with_grad),
        "optimizer_steps": module.optimizer_steps,
        "probed_calls": module.train_calls,
        "global_step": trainer.global_step,
        "saved": CountingCheckpointIO.saved,
        "last": Path(checkpoints.last_model_path).name,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()

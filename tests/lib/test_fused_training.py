"""The fused paths through a real Trainer: LoRAFinetuneCallback installs them by default, the loss tracks the
per-layer path step by step, the adapter file is the same and loads in PEFT with the same logits."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, adapter_state_dict, callback, save_adapter
from lora_lightning.layers import LoRALinear
from tests.helpers.models import LlamaModule, make_llama, make_trainer, token_data
from tests.helpers.processes import worker_command, worker_env


class Recording(LlamaModule):
    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.fused_seen: list[bool] = []

    def training_step(self, batch, batch_idx):
        mlp = self.model.model.layers[0].mlp
        self.fused_seen.append("forward" in mlp.__dict__)
        loss = super().training_step(batch, batch_idx)
        self.losses.append(loss.item())
        return loss


def fit(tmp_path: Path, fused: bool, monkeypatch: pytest.MonkeyPatch) -> Recording:
    if not fused:
        monkeypatch.setattr(callback, "install_fused_paths", lambda model: None)
    module = Recording()
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8))])
    trainer.fit(module, token_data())
    monkeypatch.undo()
    return module


def test_the_callback_s_fused_run_tracks_the_plain_run_step_by_step(tmp_path, monkeypatch):
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    logger.addHandler(handler)
    try:
        fused = fit(tmp_path / "fused", True, monkeypatch)
    finally:
        logger.removeHandler(handler)
    plain = fit(tmp_path / "plain", False, monkeypatch)
    assert all(fused.fused_seen) and not any(plain.fused_seen)
    assert "forward" not in fused.model.model.layers[0].mlp.__dict__  # teardown took the fused paths out
    assert len(fused.losses) == 8 and fused.losses[-1] < fused.losses[0]
    assert fused.losses == pytest.approx(plain.losses, rel=1e-4)
    assert (
        sum(line.startswith("LoRA fused paths: gated MLP node on model.model.layers.*.mlp x2") for line in lines) == 1
    )
    fused_state, plain_state = adapter_state_dict(fused), adapter_state_dict(plain)
    assert list(fused_state) == list(plain_state)
    for key, value in fused_state.items():
        torch.testing.assert_close(value, plain_state[key], rtol=1e-3, atol=1e-5)


def test_the_saved_adapter_loads_in_peft_with_the_same_logits(tmp_path, monkeypatch):
    peft = pytest.importorskip("peft")
    module = fit(tmp_path, True, monkeypatch)
    save_adapter(module.model, tmp_path / "adapter")
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    module.model.eval()
    ours = module.model(input_ids=tokens).logits
    reloaded = peft.PeftModel.from_pretrained(make_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(reloaded(input_ids=tokens).logits, ours, rtol=1e-4, atol=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_ddp_with_the_fused_paths_matches_the_plain_path(tmp_path):
    """Two gloo processes train the tiny Llama through the callback, once with the fused paths and once without:
    replicas stay in step and the adapters agree."""
    results = {}
    for mode in ("fused", "plain"):
        out = tmp_path / mode
        env = worker_env(drop=("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))
        done = subprocess.run(
            worker_command("fused_ddp_worker", out, mode), capture_output=True, text=True, timeout=300, env=env
        )
        assert done.returncode == 0, done.stderr[-4000:]
        results[mode] = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for ranks in results.values():
        assert ranks[0]["adapter_sum"] == ranks[1]["adapter_sum"]
    assert results["fused"][0]["fused"] and not results["plain"][0]["fused"]
    fused, plain = results["fused"][0]["adapter_sum"], results["plain"][0]["adapter_sum"]
    assert fused.keys() == plain.keys()
    for key in fused:
        assert fused[key] == pytest.approx(plain[key], rel=1e-3, abs=1e-4)


def test_lora_linear_layers_keep_no_reference_after_teardown(tmp_path, monkeypatch):
    module = fit(tmp_path, True, monkeypatch)
    assert all(layer.input_group is None for layer in module.modules() if isinstance(layer, LoRALinear))

"""The callback under FSDP1, FSDP2 and DDP with gradient checkpointing: 2 processes started in a fresh process.

FSDP2 (``ModelParallelStrategy``) also runs on CPU with gloo; FSDP1 needs CUDA (torch refuses a CPU device).
Each case trains a tiny Llama for 2 epochs, checks that only adapters got gradients and that rank 0 alone wrote
adapter-only checkpoints of full (gathered) tensors, resumes for a third epoch from ``last.ckpt``, and loads that
checkpoint into a fresh unsharded model on one device: its logits equal the sharded model's at save time.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from lora_lightning import adapter_state_dict, inject_lora
from tests.helpers.models import LlamaModule
from tests.helpers.processes import worker_command, worker_env
from tests.workers.fsdp_worker import CONFIG, probe_tokens

pytestmark = pytest.mark.multiprocess
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
CHECKPOINTED = {"fsdp_ac", "ddp_gc"}  # the probed layer runs twice per step (forward, then recompute)


def run(out: Path, mode: str, accelerator: str, epochs: int, ckpt: Path | None = None) -> list[dict]:
    env = worker_env(drop=("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "NODE_RANK"))
    command = worker_command("fsdp_worker", out, mode, accelerator, epochs, *([ckpt] if ckpt else []))
    timeout = 300 if accelerator == "cpu" else 150  # a GPU run takes well under a minute; a hang must not eat the rest
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-6000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def logits(out: Path, when: str, rank: int = 0) -> torch.Tensor:
    return torch.load(out / f"logits_{when}_rank{rank}.pt", weights_only=True)


def check_fsdp_run(tmp_path: Path, mode: str, accelerator: str) -> None:
    fresh = LlamaModule()
    inject_lora(fresh, CONFIG)
    adapter_keys = set(adapter_state_dict(fresh))

    first = tmp_path / "first"
    ranks = run(first, mode, accelerator, epochs=2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert all(set(r["params_with_grad"]) <= adapter_keys for r in ranks)  # nothing frozen got a gradient
    assert set().union(*(r["params_with_grad"] for r in ranks)) == adapter_keys  # every adapter did (some rank)
    per_step = 2 if mode in CHECKPOINTED else 1
    assert all(r["probed_calls"] == per_step * r["optimizer_steps"] == per_step * 4 for r in ranks)
    torch.testing.assert_close(logits(first, "end", 0), logits(first, "end", 1))  # the ranks see one model

    assert ranks[0]["saved"] == ["epoch=0-step=2.ckpt", "last.ckpt", "epoch=1-step=4.ckpt", "last.ckpt"]
    assert ranks[1]["saved"] == []  # written once, by rank 0
    assert sorted(p.name for p in (first / "ckpt").iterdir()) == ["epoch=1-step=4.ckpt", "last.ckpt"]
    saved = torch.load(first / "ckpt" / "last.ckpt", weights_only=True)
    state = saved["state_dict"]
    assert set(state) == adapter_keys and "lora_config" in saved
    assert all(state[k].shape == v.shape for k, v in adapter_state_dict(fresh).items())  # gathered, not shards

    base = fresh.model(input_ids=probe_tokens()).logits.detach()
    assert fresh.load_state_dict(state, strict=False).unexpected_keys == []
    round_trip = fresh.model(input_ids=probe_tokens()).logits.detach()
    assert not torch.allclose(round_trip, base, atol=1e-3)  # the adapters trained: the comparison means something
    torch.testing.assert_close(round_trip, logits(first, "end"), atol=1e-4, rtol=1e-4)

    resumed = run(tmp_path / "resumed", mode, accelerator, epochs=3, ckpt=first / "ckpt" / "last.ckpt")
    assert [r["global_step"] for r in resumed] == [6, 6]
    torch.testing.assert_close(logits(tmp_path / "resumed", "start"), logits(first, "end"), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits(tmp_path / "resumed", "end"), logits(first, "end"), atol=1e-4)  # trained on


@pytest.mark.slow
def test_fsdp2_on_cpu(tmp_path):
    check_fsdp_run(tmp_path, "fsdp2", "cpu")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize("mode", ["fsdp2", "ddp_gc", "fsdp", "fsdp_ac"])
def test_on_two_gpus(tmp_path, mode):
    check_fsdp_run(tmp_path, mode, "gpu")


def test_a_module_sharded_before_injection_is_refused(tmp_path):
    """FSDP2 sharding in ``configure_model`` before the callback injects would leave every rank training
    its own unsynchronised adapters: the callback refuses, with a one-rank gloo group standing in for FSDP2."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor, init_device_mesh

    from lora_lightning.inject import _refuse_sharded

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        module = LlamaModule()
        layer = module.model.model.layers[0].self_attn.q_proj
        mesh = init_device_mesh("cpu", (1,))
        layer.weight = torch.nn.Parameter(distribute_tensor(layer.weight.detach(), mesh), requires_grad=False)
        with pytest.raises(RuntimeError, match=r"already sharded.*before fully_shard"):
            _refuse_sharded(module)
        _refuse_sharded(LlamaModule())  # an unsharded module passes
    finally:
        dist.destroy_process_group()

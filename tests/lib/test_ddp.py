"""The callback under Lightning DDP: 2 gloo processes on CPU, started in a fresh process (not in pytest's)."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import worker_command, worker_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def run(out: Path, epochs: int, ckpt: str | None = None) -> list[dict]:
    env = worker_env(drop=("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"))
    command = worker_command("ddp_worker", out, epochs, *([ckpt] if ckpt else []))
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_trains_adapters_only_checkpoints_once_and_resumes(tmp_path):
    ranks = run(tmp_path / "first", epochs=2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["adapter_sum"] == ranks[1]["adapter_sum"]  # DDP kept the replicas in step
    assert all(r["frozen_checked"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"] for r in ranks)
    assert all(r["frozen_moved"] == [] for r in ranks)  # (the base lives under .base_layer once adapted)
    assert set(ranks[0]["params_with_grad"]) == {
        "net.0.lora_A.default.weight", "net.0.lora_B.default.weight",
        "net.2.lora_A.default.weight", "net.2.lora_B.default.weight",
        "net.4.modules_to_save.default.weight", "net.4.modules_to_save.default.bias",  # the head's trained copy
    }  # fmt: skip
    checkpoints = sorted(p.name for p in (tmp_path / "first" / "ckpt").iterdir())
    assert checkpoints == ["epoch=1-step=4.ckpt", "last.ckpt"]  # written once (rank 0), no stray temp files
    state = torch.load(tmp_path / "first" / "ckpt" / "last.ckpt", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(ranks[0]["adapter_sum"])

    resumed = run(tmp_path / "resumed", epochs=3, ckpt=str(tmp_path / "first" / "ckpt" / "last.ckpt"))
    assert resumed[0]["adapter_sum"] == resumed[1]["adapter_sum"]
    assert resumed[0]["adapter_sum"] != ranks[0]["adapter_sum"]  # it trained on from the checkpoint
    assert len(resumed[0]["losses"]) == 2  # one more epoch of 2 steps per rank (64 samples, 16 x 2 per step)

"""Two nodes simulated on one host through the app: two ``torchrun`` launches (node ranks 0 and 1, one CPU
process each, gloo), ``trainer.num_nodes=2``. Each node writes into its own run folder (as on node-local disks):
only global rank 0 writes the adapter, the checkpoint, metrics.json and the one W&B run; a resume from node
0's checkpoint trains on to the new max_steps on both nodes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.app import sentiment_rows, write_csv
from tests.helpers.processes import ROOT, worker_env

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_nodes(tmp_path: Path, name: str, *overrides: str) -> list[Path]:
    """Launch node 0 and node 1 (each ``torchrun --nnodes 2 --nproc-per-node 1``) and wait for both."""
    port, folders, nodes = free_port(), [], []
    for node in (0, 1):
        folder = tmp_path / name / f"node{node}"
        folders.append(folder)
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}",
            "--master-addr=127.0.0.1", f"--master-port={port}", str(ROOT / "scripts" / "train.py"),
            *overrides, f"hydra.run.dir={folder}",
        ]  # fmt: skip
        log = open(tmp_path / f"{name}-node{node}.log", "w")  # noqa: SIM115 (closed with the process)
        nodes.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=worker_env(
            WANDB_MODE="offline", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")), log))  # fmt: skip
    for process, log in nodes:
        code = process.wait(timeout=600)
        log.close()
        assert code == 0, Path(log.name).read_text()[-4000:]
    return folders


def test_two_nodes_train_write_once_and_resume(tmp_path: Path) -> None:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(88))
    common = [
        "model=tiny_classifier", "data=text_classification", f"data.train_file={data}", "data.val_size=8",
        "data.batch_size=8", "logger=wandb", "trainer.accelerator=cpu", "trainer.num_nodes=2", "trainer.devices=1",
        "+trainer.strategy=ddp", "callbacks.model_checkpoint.every_n_train_steps=2", "print_config=false",
    ]  # fmt: skip
    node0, node1 = two_nodes(tmp_path, "first", *common, "trainer.max_steps=3")
    checkpoint = node0 / "checkpoints" / "last.ckpt"
    metrics = json.loads((node0 / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["steps"] == 3
    assert torch.load(checkpoint, weights_only=True)["global_step"] == 3
    assert (node0 / "adapter" / "adapter_model.safetensors").is_file()
    assert len(list(node0.glob("wandb/offline-run-*"))) == 1  # one W&B run for the two nodes
    written = sorted(str(p.relative_to(node1)) for p in node1.rglob("*") if p.is_file())
    assert not [p for p in written if p.endswith((".ckpt", ".safetensors", ".wandb")) or p == "metrics.json"], written

    node0, node1 = two_nodes(tmp_path, "resumed", *common, "trainer.max_steps=6", f"ckpt_path={checkpoint}")
    resumed = json.loads((node0 / "metrics.json").read_text())
    assert resumed["steps"] == 3 and resumed["global_step"] == 6
    assert resumed["before"] == metrics["after"]
    assert torch.load(node0 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(node1.rglob("*.ckpt")) and not (node1 / "adapter").exists()

"""Crashes, for real: worker processes (tests/workers/adapter_worker.py, tests/workers/crash_worker.py) are
killed with SIGKILL in the middle of saving an adapter, in the middle of writing a checkpoint, and in the middle of
a training epoch.

Promise under test: a crash loses at most the steps since the last checkpoint; what was saved before stays
intact and loadable; a resumed run ends with the same adapter, bit for bit, as one that never crashed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_lightning import load_adapter, save_adapter
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import folder_bytes
from tests.helpers.processes import Worker
from tests.workers.adapter_worker import adapted_mlp
from tests.workers.crash_worker import EVERY, train

pytestmark = pytest.mark.multiprocess

X = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def fresh_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)
    ).eval()


# ----------------------------------------------------------------------------------------------- adapters


def test_adapter_save_killed_midway_leaves_the_previous_adapter_intact(tmp_path):
    """Killed with half the tensors file written, killed with the new folder complete but not swapped in, and
    killed at an arbitrary moment of a loop of overwrites: the folder is always one whole adapter."""
    paused = {where: tmp_path / where / "adapter" for where in ("mid-write", "before-swap")}
    for path in paused.values():
        save_adapter(adapted_mlp(seed=1), path)
    previous = folder_bytes(paused["mid-write"])
    references = {seed: folder_bytes(save_adapter(adapted_mlp(seed), tmp_path / f"ref{seed}")) for seed in (1, 2)}
    assert references[1] == previous and references[1] != references[2]

    workers = {w: Worker(tmp_path, "adapter_worker", "save", path, 2, "--pause", w) for w, path in paused.items()}
    looping = Worker(tmp_path, "adapter_worker", "loop", tmp_path / "loop" / "adapter")

    for where, worker in workers.items():
        staging = Path(worker.kill_at("PAUSED").split(" ", 1)[1])
        path = paused[where]
        assert staging.exists() and staging.parent != path and path not in staging.parents, staging
        assert folder_bytes(path) == previous, f"{where}: the previous adapter changed"
        model = fresh_base()
        load_adapter(model, path)
        torch.testing.assert_close(outputs(model), outputs(adapted_mlp(seed=1)), rtol=0, atol=0)
        save_adapter(adapted_mlp(seed=2), path, overwrite=True)  # the next save works and clears the leftover
        assert folder_bytes(path) == references[2] and not staging.exists()
        assert sorted(p.name for p in path.parent.iterdir()) == ["adapter"]

    looping.wait_for("SAVED 5")
    time.sleep(0.003)  # somewhere inside a later save
    looping.proc.send_signal(signal.SIGKILL)
    looping.proc.wait(timeout=30)
    assert folder_bytes(tmp_path / "loop" / "adapter") in (references[1], references[2])


# -------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_write_killed_midway_leaves_the_previous_checkpoint_loadable(tmp_path):
    """ModelCheckpoint(every 2 steps, save_last=True) writes step=2.ckpt, last.ckpt, step=4.ckpt, last.ckpt, ...
    Kill the 3rd write (step=4.ckpt) and the 4th (last.ckpt over the step-2 one) with half the bytes on disk."""
    roots = {n: tmp_path / f"write{n}" for n in (3, 4)}
    workers = {n: Worker(tmp_path, "crash_worker", root, "--pause-save", n) for n, root in roots.items()}
    for n, worker in workers.items():
        half_written = Path(worker.kill_at("PAUSED").split(" ", 1)[1])
        target = "step=4.ckpt" if n == 3 else "last.ckpt"
        assert half_written.name.startswith(f".{target}.tmp-"), half_written  # a temporary file, not the target

        folder = roots[n] / "ckpt"
        complete = ["last.ckpt", "step=2.ckpt"] + (["step=4.ckpt"] if n == 4 else [])
        assert sorted(p.name for p in folder.glob("*.ckpt")) == complete
        for name in complete:  # every checkpoint file there is whole and loads without unpickling code
            checkpoint = torch.load(folder / name, weights_only=True)
            assert checkpoint["global_step"] == (2 if name == "last.ckpt" else int(name[5:-5]))

    trainer = train(roots[4], resume=True)  # Lightning + the callback resume from the surviving last.ckpt
    assert trainer.global_step == 24
    assert torch.load(roots[4] / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 24
    assert not list((roots[4] / "ckpt").glob(".*")), "the killed write's temporary file was not cleared"


# ------------------------------------------------------------------------------------------ crash and resume


@contextlib.contextmanager
def deterministic_cpu(monkeypatch):
    """What the worker sets in its own process, for the in-process runs; undone afterwards."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")  # seed_everything writes it; monkeypatch restores it
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def final_adapter(root: Path) -> dict[str, torch.Tensor]:
    return load_file(root / "final" / WEIGHTS_NAME)


def test_training_killed_twice_mid_epoch_resumes_to_the_same_adapter_bit_for_bit(tmp_path, monkeypatch):
    """3 epochs x 8 batches, LoRA dropout 0.1, shuffled batches, a checkpoint every 2 steps. The run is killed with
    11 steps done, in the middle of the 12th (epoch 1), resumed from step 10, killed again with 13 done (same
    epoch), resumed from step 12 to the end. Its final adapter must equal an uninterrupted run's exactly. A
    resume that restarts the epoch (what a plain DataLoader does) must not: that shows the comparison can fail."""
    crashed, restarted = tmp_path / "crashed", tmp_path / "restarted"
    first = Worker(tmp_path, "crash_worker", crashed, "--block-at", 11)
    with deterministic_cpu(monkeypatch):
        train(tmp_path / "straight")  # in this process, while the worker starts
    assert first.kill_at("BLOCKED") == "BLOCKED 11"
    last = torch.load(crashed / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 10 and 11 - last["global_step"] <= EVERY  # lost: the step since the checkpoint

    shutil.copytree(crashed, restarted)
    second = Worker(tmp_path, "crash_worker", crashed, "--resume", "--block-at", 13)
    with deterministic_cpu(monkeypatch):
        train(restarted, resume=True, forget_position=True)
    second.kill_at("BLOCKED")
    assert second.seen[0] == "FIRST_STEP 10"

    third = Worker(tmp_path, "crash_worker", crashed, "--resume")
    lines = third.finish()
    assert lines[0] == "FIRST_STEP 12" and lines[-1] == "DONE 24"

    expected, actual = final_adapter(tmp_path / "straight"), final_adapter(crashed)
    assert expected.keys() == actual.keys() and len(expected) == 6  # A and B of 2 layers, head weight and bias
    unequal = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not unequal, f"the resumed run's adapter differs in {unequal}"
    assert (crashed / "final" / CONFIG_NAME).read_text() == (tmp_path / "straight" / "final" / CONFIG_NAME).read_text()

    control = final_adapter(restarted)
    assert not all(torch.equal(expected[key], control[key]) for key in expected), "a restarted epoch went unnoticed"

"""`ckpt_path` resumes: a run of 20 steps resumed to 40 trains 20 more and ends bit for bit where a straight
40-step run ends (mid-epoch checkpoints, a resumable loader, the RNG state in the checkpoint), and its "before"
metric is the checkpoint's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lora_lightning.app.train import train
from tests.helpers.app import compose_train, sentiment_rows, write_csv


@pytest.fixture
def common(tmp_path) -> list[str]:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(160))  # 152 training rows: 10 batches of 16 an epoch
    return [
        "model=tiny_classifier", "data=text_classification", f"data.train_file={data}", "data.val_size=8",
        "data.batch_size=16", "logger=csv", "~scheduler", "lora.dropout=0.1", "trainer.deterministic=true",
        "callbacks.model_checkpoint.every_n_train_steps=7", "print_config=false",
    ]  # fmt: skip


def adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_a_resumed_run_trains_on_to_the_new_max_steps_bit_for_bit(common, tmp_path) -> None:
    first, _ = train(compose_train([*common, "trainer.max_steps=15"], output_dir=tmp_path / "a"))
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)
    assert state["global_step"] == 15  # the last step too, not only every 7th: mid-epoch (epoch 1, batch 5)
    resumed, _ = train(
        compose_train([*common, "trainer.max_steps=40", f"ckpt_path={checkpoint}"], output_dir=tmp_path / "b")
    )
    straight, _ = train(compose_train([*common, "trainer.max_steps=40"], output_dir=tmp_path / "c"))

    assert (first["steps"], resumed["steps"], straight["steps"]) == (15, 25, 40)
    assert resumed["global_step"] == straight["global_step"] == 40
    assert resumed["before"] == first["after"]  # evaluated from the checkpoint, not the base model
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["steps"] == 25
    got, want = adapter(tmp_path / "b"), adapter(tmp_path / "c")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert resumed["after"] == straight["after"]

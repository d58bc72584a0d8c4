"""The speed and memory switches through the app (QLoRA, gradient checkpointing, compile, kernels, LoRA+),
throughput on the dashboard (Lightning's ThroughputMonitor), and eval.yaml on a saved adapter."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from lora_lightning import LoRAFinetuneCallback, quant
from lora_lightning.app import switches, throughput
from lora_lightning.app.models import tiny_causal_lm
from lora_lightning.app.train import CONF_DIR, build_trainer, train
from tests.helpers.app import compose_train, sentiment_rows, write_csv


def lm(tmp_path, *overrides: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on the mat number {i % 7}.\n" for i in range(80)))
    return ["experiment=tiny_lm", "data=text_corpus", f"data.train_file={corpus}", "data.val_size=10",
            "data.block_size=32", "data.batch_size=4", "logger=csv", "print_config=false", *overrides]  # fmt: skip


def test_qlora_and_gradient_checkpointing_from_config(tmp_path) -> None:
    cfg = compose_train(
        lm(tmp_path, "quant=torchao-nf4", "quant_dtype=float32", "gradient_checkpointing=true", "trainer.max_steps=3"),
        output_dir=tmp_path / "run",
    )
    metrics, objects = train(cfg)
    network = objects["module"].model
    quantized = [name for name, m in network.named_modules() if quant.is_quantized(m)]
    assert len(quantized) == 14 and not any("lm_head" in n for n in quantized)  # 7 per layer; the head kept
    assert any(getattr(m, "gradient_checkpointing", False) for m in network.modules()) and metrics["steps"] == 3
    assert all(torch.isfinite(torch.tensor(v)) for v in metrics["after"].values())


def test_gradient_checkpointing_needs_a_model_that_has_it() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing=true needs a Hugging Face model"):
        switches.enable_gradient_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.mark.parametrize("kernels", ["none", "liger"])
def test_the_kernels_key_reaches_the_lora_callback(tmp_path, kernels) -> None:
    cfg = compose_train(lm(tmp_path, f"kernels={kernels}"), output_dir=tmp_path)
    trainer = build_trainer(cfg, None, [])
    (callback,) = [c for c in trainer.callbacks if isinstance(c, LoRAFinetuneCallback)]
    assert callback.kernels == kernels


def test_an_unknown_kernel_set_is_named_at_start() -> None:
    with pytest.raises(ValueError, match=r"kernels='triton': must be one of none, liger"):
        switches.check(None, "triton")


@pytest.mark.slow
def test_compile_trains_the_same_network(tmp_path) -> None:
    cfg = compose_train(lm(tmp_path, "compile=true", "trainer.max_steps=2", "eval_before=false"), output_dir=tmp_path)
    metrics, objects = train(cfg)
    assert metrics["status"] == "ok" and metrics["steps"] == 2
    assert objects["module"].model._compiled_call_impl is not None  # nn.Module.compile: the same object


def test_throughput_and_peak_memory_reach_metrics_and_the_csv(tmp_path) -> None:
    overrides = lm(tmp_path, "trainer.max_steps=6", "trainer.log_every_n_steps=2", "callbacks.throughput.window_size=2")
    metrics, _ = train(compose_train(overrides, output_dir=tmp_path))
    assert metrics["tokens_per_sec"] > 0 and metrics["samples_per_sec"] > 0 and metrics["flops_per_sec"] > 0
    assert "mfu" not in metrics  # no peak FLOP/s for a CPU
    assert metrics["peak_memory_mib"] > 0
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert any(row.get("train/device/items_per_sec") for row in rows)
    assert any(row.get("run/tokens_per_sec") for row in rows)  # the run's summary row


def test_the_flops_estimate() -> None:
    """``2 T (2 N + N_trainable)`` with N the linear weights (the tied head counts, embeddings do not)."""
    model = tiny_causal_lm(hidden_size=32, num_layers=2, intermediate_size=64).model
    layer = 4 * 32 * 32 - 2 * 32 * 16 + 3 * 32 * 64  # q, o full; k, v at 2 of 4 heads; gate, up, down
    assert throughput.matrix_weights(model) == 2 * layer + 32 * model.config.vocab_size
    assert throughput.flops_per_batch(tokens=10, weights=100, trainable=5) == 2 * 10 * (200 + 5)


def test_eval_config_evaluates_a_saved_adapter_without_training(tmp_path) -> None:
    data = write_csv(tmp_path / "train.csv", sentiment_rows(48))
    common = ["model=tiny_classifier", "data=text_classification", f"data.train_file={data}", "data.val_size=8",
              "data.batch_size=8", "logger=csv", "print_config=false"]  # fmt: skip
    trained, _ = train(compose_train([*common, "trainer.max_steps=4"], output_dir=tmp_path / "a"))
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR), job_name="test"):
        cfg = compose("eval", [*common, f"adapter_path={tmp_path / 'a' / 'adapter'}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = cfg.hydra.runtime.output_dir = str(tmp_path / "b")
    HydraConfig.instance().set_config(cfg)
    evaluated, _ = train(cfg)
    assert "before" not in evaluated and "steps" not in evaluated and not (tmp_path / "b" / "adapter").exists()
    assert evaluated["after"] == trained["after"]

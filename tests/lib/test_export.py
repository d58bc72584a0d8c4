"""save_merged and the model card: a merged transformers folder that from_pretrained loads with our merged
model's logits (PEFT's merge_and_unload as the outside check), the caller's model left as it was, refusals that
write nothing, and README.md cards that keep a person's own."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lora_lightning import (
    LoRAConfig,
    inject_lora,
    model_card,
    quantize_linears,
    save_adapter,
    save_merged,
    set_active_adapter,
    write_model_card,
)
from lora_lightning.export import CARD_MARK
from lora_lightning.params import lora_layers
from tests.helpers.adapters import assert_unchanged, folder_bytes, leftovers, perturb_adapters_, snapshot
from tests.helpers.deploy import adapted_llama, logits, tied_llama
from tests.helpers.models import make_llama, make_mlp, tiny_llama_config

transformers = pytest.importorskip("transformers")


def load_merged(path: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path).eval()


# ------------------------------------------------------------------------------------------------ save_merged


def test_save_merged_writes_a_folder_from_pretrained_loads_with_the_adapted_logits(tmp_path):
    model = adapted_llama(use_rslora=True, rank_pattern={"q_proj": 2})
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(make_llama(0)), atol=1e-3)  # the adapter matters
    before = snapshot(model)

    save_merged(model, tmp_path / "merged")

    assert {"config.json", "model.safetensors"} <= set(folder_bytes(tmp_path / "merged"))
    loaded = load_merged(tmp_path / "merged")
    assert not any("lora" in key or "base_layer" in key for key in loaded.state_dict())
    torch.testing.assert_close(logits(loaded), adapted, atol=1e-5, rtol=0)
    assert_unchanged(model, before)  # the caller's model keeps its adapters, weights and trainability
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("variant", [{}, {"use_dora": True}], ids=["lora", "dora"])
def test_save_merged_gives_the_weights_of_peft_merge_and_unload(tmp_path, variant):
    peft = pytest.importorskip("peft")
    model = adapted_llama(**variant)
    save_adapter(model, tmp_path / "adapter")
    save_merged(model, tmp_path / "merged")

    theirs = peft.PeftModel.from_pretrained(make_llama(0), tmp_path / "adapter").merge_and_unload().state_dict()
    ours = load_merged(tmp_path / "merged").state_dict()
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-6, rtol=0, msg=key)


def test_save_merged_folds_gpt2_conv1d_layers_and_keeps_an_unadapted_tied_head_tied(tmp_path):
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8))  # all-linear: c_attn, c_proj, c_fc (Conv1D), not the head
    perturb_adapters_(model)

    save_merged(model, tmp_path / "merged")

    loaded = load_merged(tmp_path / "merged")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    assert loaded.config.tie_word_embeddings
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


@pytest.mark.parametrize("targets", [["lm_head", "q_proj"], ["embed_tokens", "q_proj"]], ids=["head", "embedding"])
def test_save_merged_unties_a_tied_weight_that_has_an_adapter(tmp_path, targets):
    model = tied_llama(targets)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the untying is documented, not warned about
        save_merged(model, tmp_path / "merged")

    loaded = load_merged(tmp_path / "merged")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)
    head, embedding = (getattr(m, "base_layer", m) for m in (model.lm_head, model.model.embed_tokens))
    assert head.weight is embedding.weight  # still tied in the caller's model


def test_save_merged_merges_the_named_adapter_and_keeps_the_active_one(tmp_path):
    model = adapted_llama()
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["v_proj"]), adapter_name="other")
    perturb_adapters_(model, seed=11)
    set_active_adapter(model, "other")
    other = logits(model)
    set_active_adapter(model, "default")
    default = logits(model)
    set_active_adapter(model, "other")

    save_merged(model, tmp_path / "default", adapter_name="default")
    save_merged(model, tmp_path / "other")  # the active one

    torch.testing.assert_close(logits(load_merged(tmp_path / "default")), default, atol=1e-5, rtol=0)
    torch.testing.assert_close(logits(load_merged(tmp_path / "other")), other, atol=1e-5, rtol=0)
    assert {layer.active_adapter for _, layer in lora_layers(model)} == {"other"}


def test_save_merged_writes_the_tokenizer_it_is_given(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "good": 1, "film": 2}
    word_level = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    word_level.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="[UNK]")

    save_merged(adapted_llama(), tmp_path / "merged", tokenizer=tokenizer)

    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert loaded("good bad film")["input_ids"] == [1, 0, 2]


def test_save_merged_overwrite_replaces_a_model_folder(tmp_path):
    save_merged(adapted_llama(seed=0), tmp_path / "merged")
    model = adapted_llama(seed=1)
    save_merged(model, tmp_path / "merged", overwrite=True)
    torch.testing.assert_close(logits(load_merged(tmp_path / "merged")), logits(model), atol=1e-5, rtol=0)


def no_adapter(tmp_path):
    return make_llama(0), tmp_path / "out", {}


def unknown_adapter(tmp_path):
    return adapted_llama(), tmp_path / "out", {"adapter_name": "nope"}


def nothing_active(tmp_path):
    model = adapted_llama()
    for _, layer in lora_layers(model):
        layer.active_adapter = None
    return model, tmp_path / "out", {}


def not_hugging_face(tmp_path):
    model = make_mlp()
    inject_lora(model, LoRAConfig(r=2, alpha=4))
    return model, tmp_path / "out", {}


def existing_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    return adapted_llama(), tmp_path / "out", {}


def someone_elses_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return adapted_llama(), tmp_path / "out", {"overwrite": True}


def under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    return adapted_llama(), tmp_path / "file" / "out", {}


def partly_quantized(tmp_path):
    pytest.importorskip("bitsandbytes")
    model = transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128))
    quantize_linears(model, "bnb-nf4", compute_dtype=torch.float32)
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"]))  # the other 4-bit layers stay
    return model, tmp_path / "out", {}


@pytest.mark.parametrize(
    ("case", "error", "words"),
    [
        (no_adapter, ValueError, "no LoRA layers"),
        (unknown_adapter, KeyError, "no adapter 'nope'"),
        (nothing_active, ValueError, "no adapter is active"),
        (not_hugging_face, TypeError, "not a Hugging Face PreTrainedModel"),
        (existing_folder, FileExistsError, "overwrite=True"),
        (someone_elses_folder, FileExistsError, "holds no config.json"),
        (under_a_file, NotADirectoryError, "is a file"),
        (partly_quantized, ValueError, "stays partly quantized"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_save_merged_refuses_before_writing_anything(tmp_path, case, error, words):
    model, path, options = case(tmp_path)
    before, files = snapshot(model), sorted(p.name for p in tmp_path.rglob("*"))

    with pytest.raises(error, match=words):
        save_merged(model, path, **options)

    assert sorted(p.name for p in tmp_path.rglob("*")) == files
    assert_unchanged(model, before)


# ------------------------------------------------------------------------------------------------ model cards


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_has_the_hub_front_matter_the_config_and_the_metrics():
    config = LoRAConfig(r=16, alpha=32, target_modules=["q_proj", "v_proj"])
    text = model_card(
        "HuggingFaceTB/SmolLM2-135M-Instruct", config, {"val/ppl": 58.4321, "step": 40}, license="apache-2.0",
        task_type="CAUSAL_LM", tags=["sentiment"],
    )  # fmt: skip

    assert front_matter(text) == {
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "library_name": "peft",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct", "lora", "lora-lightning", "sentiment"],
    }
    shown = json.loads(text.split("```json\n")[1].split("```")[0])
    assert shown | {"target_modules": sorted(shown["target_modules"])} == {
        "peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"],
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "lora_bias": False,
        "ensure_weight_tying": False,
    }  # fmt: skip
    assert "| val/ppl | 58.43 |" in text
    assert "| step | 40 |" in text
    assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in text
    classifier = model_card("sentence-transformers/all-MiniLM-L6-v2", {"r": 8, "task_type": "SEQ_CLS"})
    assert front_matter(classifier)["pipeline_tag"] == "text-classification"
    assert "AutoModelForSequenceClassification.from_pretrained" in classifier
    gguf = model_card("org/model-GGUF", {"r": 8}, base_model_kwargs={"gguf_file": "m.Q4_1.gguf", "num_labels": 2})
    assert 'AutoModel.from_pretrained("org/model-GGUF", gguf_file="m.Q4_1.gguf", num_labels=2)' in gguf
    with pytest.raises(TypeError, match=r"base_model_kwargs=\{'dtype': <class 'object'>\} must map names to JSON"):
        model_card("org/model", {"r": 8}, base_model_kwargs={"dtype": object})


def test_write_model_card_reads_the_adapter_folder_and_peft_still_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted_llama()
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="org/tiny-llama")

    card = write_model_card(tmp_path / "adapter", metrics={"val/loss": 1.25})

    text = card.read_text()
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert front_matter(text)["base_model"] == "org/tiny-llama"
    assert json.loads(text.split("```json\n")[1].split("```")[0]) == {k: v for k, v in saved.items() if v is not None}
    assert "| val/loss | 1.25 |" in text
    loaded = peft.PeftModel.from_pretrained(make_llama(0), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded), logits(model), atol=1e-5, rtol=0)


def test_write_model_card_replaces_its_own_card_and_keeps_a_persons_readme(tmp_path):
    save_adapter(adapted_llama(), tmp_path / "adapter")
    readme = tmp_path / "adapter" / "README.md"
    write_model_card(tmp_path / "adapter", metrics={"acc": 0.5})
    write_model_card(tmp_path / "adapter", metrics={"acc": 0.75})
    assert "| acc | 0.75 |" in readme.read_text()
    assert readme.read_text().count(CARD_MARK) == 1

    readme.write_text("# My adapter\n\nNotes I wrote.\n")
    with pytest.warns(UserWarning, match="kept"):
        assert write_model_card(tmp_path / "adapter", metrics={"acc": 0.9}) is None
    assert readme.read_text() == "# My adapter\n\nNotes I wrote.\n"

    write_model_card(tmp_path / "adapter", metrics={"acc": 0.9}, overwrite=True)
    assert "| acc | 0.9 |" in readme.read_text()
    assert leftovers(tmp_path / "adapter") == []


def test_write_model_card_refuses_without_a_config_or_a_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="pass lora="):
        write_model_card(tmp_path / "empty")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        write_model_card(tmp_path / "missing", lora=LoRAConfig())
    assert list((tmp_path / "empty").iterdir()) == []
    assert not (tmp_path / "missing").exists()

    write_model_card(tmp_path / "empty", lora=LoRAConfig(r=4), base_model="org/base")
    assert front_matter((tmp_path / "empty" / "README.md").read_text())["base_model"] == "org/base"

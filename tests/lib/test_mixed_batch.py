"""One adapter per sample (PEFT's mixed-batch inference, ``adapter_names=``) through `per_sample_adapters`: the
cases of PEFT's ``TestMixedAdapterBatches`` give PEFT's outputs and each sample's output alone, on a bare model and
on a Hugging Face model; PEFT's error cases are refused before anything changes."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    per_sample_adapters,
    set_active_adapter,
)
from lora_lightning.params import adapter_modules
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.models import make_llama
from tests.helpers.peft_models import X, make, peft_config

peft = pytest.importorskip("peft")

NAMES = ("adapter0", "adapter1")
CONV_X = torch.arange(270).view(6, 5, 3, 3)
# PEFT's MIXED_ADAPTER_TEST_CASES and parametrizations: model, the two adapters' LoraConfig arguments, the input
CASES = {
    "same_target": ("MLP", {"target_modules": ["lin0"]}, {"target_modules": ["lin0"], "r": 16}, X),
    "different_targets": ("MLP", {"target_modules": ["lin0"]}, {"target_modules": ["lin1"]}, X),
    "overlapping_targets": ("MLP", {"target_modules": ["lin0"]}, {"target_modules": ["lin0", "lin1"]}, X),
    "modules_to_save": (
        "MLP",
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
        X,
    ),
    "embedding_and_conv1d": (
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"]},
        {"target_modules": ["emb", "conv1d"], "r": 16},
        X,
    ),
    "embedding_and_conv1d_modules_to_save": (
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"], "modules_to_save": ["lin0"]},
        {"target_modules": ["emb", "conv1d"], "r": 16, "modules_to_save": ["lin0"]},
        X,
    ),
    "conv2d": ("Conv2d", {"target_modules": ["conv2d"]}, {"target_modules": ["conv2d"], "r": 16}, CONV_X),
    "trainable_tokens": (
        "EmbConv1D",
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}},
        {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [1, 5, 10]}},
        X,
    ),
}


def names_for(batch: int, names: tuple[str, ...] = ("__base__", *NAMES)) -> list[str]:
    return [names[i % len(names)] for i in range(batch)]


def peft_pair(case: str) -> nn.Module:
    """PEFT's model with both adapters of ``case``, random, their copies and token rows moved off the base's."""
    model_id, first, second, _ = CASES[case]
    theirs = peft.get_peft_model(make(model_id), peft_config(first), adapter_name=NAMES[0])
    theirs.add_adapter(NAMES[1], peft_config(second))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "modules_to_save" in name or "trainable_tokens_delta" in name:
                param.add_(torch.randn(param.shape, generator=generator))
    return theirs.eval()


def ours_from(theirs: nn.Module, model_id: str, root: Path) -> nn.Module:
    ours = make(model_id)
    for name in NAMES:
        theirs.save_pretrained(root, selected_adapters=[name])  # into root / name
        load_adapter(ours, root / name, adapter_name=name)
    return ours


def alone(model: nn.Module, x: torch.Tensor, names: list[str]) -> torch.Tensor:
    """Each sample's output with its adapter active for the whole batch (the base for ``"__base__"``)."""
    rows = []
    with torch.no_grad():
        for i, name in enumerate(names):
            if name == "__base__":
                with disable_adapters(model):
                    rows.append(model(x)[i])
            else:
                set_active_adapter(model, name)
                rows.append(model(x)[i])
    return torch.stack(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_each_sample_gets_its_adapter_as_in_peft_and_as_alone(case, tmp_path):
    model_id, *_, x = CASES[case]
    theirs = peft_pair(case)
    ours = ours_from(theirs, model_id, tmp_path)
    names = names_for(len(x))
    with torch.no_grad():
        expected = theirs(x, adapter_names=names)
        with per_sample_adapters(ours, names):
            got = ours(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, alone(ours, x, names), rtol=1e-5, atol=1e-5)
    assert all(module.sample_adapters is None for _, module in adapter_modules(ours)), "the block left them set"


def test_a_hugging_face_model_called_as_usual_inside_the_block():
    """The names reach the layers without any forward argument: the model is called as it always is."""
    model = make_llama(0)
    for name in NAMES:
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]), name)
    perturb_adapters_(model, scale=0.3)
    tokens = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(5))
    names = ["adapter1", "__base__", "adapter0", "adapter1"]
    with torch.no_grad(), per_sample_adapters(model, names):
        got = model(input_ids=tokens).logits
    rows = []
    for i, name in enumerate(names):
        with torch.no_grad():
            if name == "__base__":
                with disable_adapters(model):
                    rows.append(model(input_ids=tokens[i : i + 1]).logits[0])
            else:
                set_active_adapter(model, name)
                rows.append(model(input_ids=tokens[i : i + 1]).logits[0])
    torch.testing.assert_close(got, torch.stack(rows), rtol=1e-5, atol=1e-5)


def test_disabled_adapters_win():
    theirs = peft_pair("same_target")
    ours = make("MLP")
    for name in NAMES:
        inject_lora(ours, LoRAConfig(r=8, alpha=8, target_modules=["lin0"]), name)
    perturb_adapters_(ours, scale=0.3)
    with torch.no_grad(), per_sample_adapters(ours.eval(), names_for(9)), disable_adapters(ours):
        assert torch.equal(ours(X), make("MLP")(X))
    with torch.no_grad(), theirs.disable_adapter():
        assert torch.equal(theirs(X, adapter_names=names_for(9)), make("MLP")(X))


def dora_pair() -> nn.Module:
    model = make("MLP")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"]), "adapter0")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin1"], use_dora=True), "dora")
    return model.eval()


def unsupported(model_id: str, config: LoRAConfig) -> nn.Module:
    model = make(model_id)
    inject_lora(model, config, "adapter0")
    return model.eval()


ERRORS = {
    "training_mode": (lambda: dora_pair().train(), ["adapter0"] * 9, "the model is in training mode"),
    "unknown_name": (dora_pair, ["adapter0", "does-not-exist", *["__base__"] * 7], "no adapter(s) ['does-not-exist']"),
    "dora": (dora_pair, ["dora"] * 9, "'lin1' holds adapters ['dora'] of the batch: adapters ['dora'] use DoRA"),
    "mha": (
        lambda: unsupported("MHA", LoRAConfig(r=4, alpha=8, target_modules=["mha"])),
        ["adapter0"] * 9,
        "nn.MultiheadAttention adds its adapters to the weights",
    ),
    "target_parameters": (
        lambda: unsupported("MLP", LoRAConfig(r=4, alpha=8, target_modules=None, target_parameters=["lin0.weight"])),
        ["adapter0"] * 9,
        "target_parameters adds its adapters to the weights",
    ),
    "gru_modules_to_save": (
        lambda: unsupported("MLPWithGRU", LoRAConfig(r=4, alpha=8, target_modules=["lin0"], modules_to_save=["gru"])),
        ["adapter0"] * 9,
        "a modules_to_save GRU: per-sample adapters run the copies of nn.Linear",
    ),
    "not_names": (dora_pair, "adapter0", "give one adapter name per sample"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_peft_s_error_cases_are_refused_before_anything_changes(case):
    build, names, fragment = ERRORS[case]
    model = build()
    before = snapshot(model)
    with pytest.raises((ValueError, TypeError)) as error, per_sample_adapters(model, names):
        pass
    assert fragment in str(error.value), str(error.value)
    assert_unchanged(model, before)
    assert all(module.sample_adapters is None for _, module in adapter_modules(model))


def test_merged_adapters_are_refused():
    model = dora_pair()
    model.lin0.merge("adapter0")
    merged = r"adapters \['adapter0'\] are merged into the base; unmerge them first"
    with pytest.raises(ValueError, match=merged), per_sample_adapters(model, ["adapter0"] * 9):
        pass


def test_a_batch_of_another_length_fails_and_leaves_the_model_as_it_was():
    """PEFT leaves its hooks behind after such an error; the block always clears the names."""
    model = dora_pair()
    expected = model(X)
    with (
        pytest.raises(ValueError, match="3 adapter names for a batch of 9 samples"),
        per_sample_adapters(model, ["adapter0"] * 3),
    ):
        model(X)
    assert torch.equal(model(X), expected)


def test_a_dora_adapter_outside_the_batch_does_not_stop_it():
    model = dora_pair()
    names = names_for(9, ("__base__", "adapter0"))
    with torch.no_grad(), per_sample_adapters(model, names):
        got = model(X)
    torch.testing.assert_close(got, alone(copy.deepcopy(model), X, names), rtol=1e-5, atol=1e-5)


def test_merging_after_the_block_works():
    model = dora_pair()
    with per_sample_adapters(model, names_for(9, ("__base__", "adapter0"))):
        pass
    set_active_adapter(model, "adapter0")
    expected = model(X)
    torch.testing.assert_close(merge_lora(model)(X), expected, rtol=1e-5, atol=1e-5)

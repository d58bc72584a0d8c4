"""``trainable_token_indices``: chosen rows of an embedding trained in full, the table frozen; an output head tied to
the embedding (``tie_word_embeddings``) uses the same rows and saves nothing. PEFT 0.21 as the oracle both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_lightning import (
    LoRAConfig,
    TargetError,
    TrainableTokens,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lora_lightning.peft_format import WEIGHTS_NAME
from tests.helpers.adapters import assert_unchanged, snapshot
from tests.helpers.models import tiny_llama_config
from tests.helpers.peft_models import make

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
ROWS = [3, 5, 7, 120]
TOKENS[0, :4] = torch.tensor(ROWS)


def llama(tied: bool = True):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def moved_rows(model, seed: int = 6) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "trainable_tokens_delta" in name or "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator))


@pytest.mark.parametrize("tied", [True, False], ids=["tied_head", "own_head"])
@pytest.mark.parametrize("indices", [ROWS, {"embed_tokens": ROWS}], ids=["list", "dict"])
def test_token_rows_both_ways(indices, tied, tmp_path):
    kwargs = {"target_modules": ["q_proj"], "trainable_token_indices": indices}
    theirs = peft.get_peft_model(llama(tied), peft.LoraConfig(**kwargs))
    moved_rows(theirs)
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "peft")
    ours = llama(tied)
    report = load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert report.trainable_tokens == (["lm_head", "model.embed_tokens"] if tied else ["model.embed_tokens"])

    ours = llama(tied)
    inject_lora(ours, LoRAConfig(r=8, alpha=8, **kwargs))
    assert isinstance(ours.model.embed_tokens, TrainableTokens)
    assert isinstance(ours.lm_head, TrainableTokens) is tied  # a tied head reads the same rows
    moved_rows(ours)
    expected = logits(ours)
    path = save_adapter(ours, tmp_path / "ours")
    keys = {k for k in load_file(path / WEIGHTS_NAME) if "lora_" not in k}
    assert keys == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"}
    back = peft.PeftModel.from_pretrained(llama(tied), path).eval()
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)


def test_only_the_rows_train_and_the_table_stays():
    model = llama()
    table = model.model.embed_tokens.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], trainable_token_indices=ROWS))
    rows = model.model.embed_tokens.trainable_tokens_delta["default"]
    assert rows.requires_grad and not model.model.embed_tokens.base_layer.weight.requires_grad
    assert torch.equal(rows, table[ROWS])  # the rows start as the base's: the model is unchanged
    model(input_ids=TOKENS).logits.sum().backward()
    assert rows.grad is not None and torch.count_nonzero(rows.grad) > 0
    assert model.model.embed_tokens.base_layer.weight.grad is None
    moved_rows(model)
    expected = logits(model)
    with disable_adapters(model):
        assert torch.equal(logits(model), logits(llama()))
    merged = merge_lora(copy.deepcopy(model))
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight  # still tied, with the trained rows in it


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"target_modules": ["embed_tokens"], "trainable_token_indices": ROWS}, "would take LoRA and trainable_token"),
        (
            {"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "trainable_token_indices": ROWS},
            "would take modules_to_save and trainable_token_indices",
        ),
        ({"target_modules": ["q_proj"], "trainable_token_indices": [3, 500]}, "has 128 rows; ids [500] are not"),
        ({"target_modules": ["q_proj"], "trainable_token_indices": {"q_proj": [1]}}, "trains rows of an nn.Embedding"),
    ],
)
def test_rows_that_cannot_be_trained_are_refused_before_any_change(config, fragment):
    model = llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        inject_lora(model, LoRAConfig(r=4, alpha=8, **config))
    assert_unchanged(model, before)


def test_the_peft_table_row_with_tokens_on_a_custom_model_names_its_embedding():
    model = make("EmbConv1D")
    report = inject_lora(
        model, LoRAConfig(r=8, alpha=8, target_modules=["conv1d"], trainable_token_indices={"emb": [0, 10]})
    )
    assert report.trainable_tokens == ["emb"] and model.emb.token_indices == {"default": [0, 10]}

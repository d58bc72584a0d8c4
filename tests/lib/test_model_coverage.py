"""Model coverage (issue 5, item 6): Hugging Face Llama, GPT-2 (``Conv1D``), BERT and a small CNN, built from
configs, each with ``"all-linear"`` and with named targets, each fine-tuned a few steps through the callback.

For every model and target choice: the expected layers are adapted (the output head never by
``"all-linear"``), training moves the adapters (and ``modules_to_save``) and nothing else, the saved
adapter gives the same outputs in a fresh base, and PEFT 0.21 loading it gives them too.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    LoRAConfig,
    LoRAConv,
    LoRAFinetuneCallback,
    LoRALinear,
    adapter_state_dict,
    find_targets,
    load_adapter,
    save_adapter,
)
from lora_lightning.params import lora_layers, trained_in_full_modules
from lora_lightning.peft_format import CONFIG_NAME
from tests.helpers.models import make_llama, make_trainer, token_data

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
IMAGES = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))


# ------------------------------------------------------------------------------------------------ models


def gpt2(seed: int = 0) -> nn.Module:
    config = transformers.GPT2Config(
        vocab_size=128, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def bert_config(**overrides: Any):
    fields = dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return transformers.BertConfig(**{**fields, **overrides})


def bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(bert_config()).eval()


class SmallCNN(nn.Module):
    """Two convolutions, a hidden linear layer and a linear classifier head, for 3x8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(torch.relu(self.fc(x.flatten(1))))


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().eval()


# ------------------------------------------------------------------------------------------------- tasks


def causal_lm_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    (tokens,) = batch
    return model(input_ids=tokens, labels=tokens).loss


def classification_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    tokens, labels = batch
    return model(input_ids=tokens, labels=labels).loss


def image_loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return nn.functional.cross_entropy(model(images), labels)


def text_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def image_outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IMAGES)


def labelled_tokens() -> DataLoader:
    (tokens,) = token_data().dataset.tensors
    labels = torch.randint(0, 3, (len(tokens),), generator=torch.Generator().manual_seed(5))
    return DataLoader(TensorDataset(tokens, labels), batch_size=4, shuffle=False)


def labelled_images() -> DataLoader:
    generator = torch.Generator().manual_seed(5)
    images = torch.randn(16, 3, 8, 8, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(0, 4, (16,), generator=generator)), batch_size=4)


def blocks(template: str, *leaves: str) -> list[str]:
    """``template`` filled with block index 0 and 1 and each leaf, block by block."""
    return [template.format(i=i, leaf=leaf) for i in range(2) for leaf in leaves]


@dataclass(frozen=True)
class Case:
    build: Callable[[int], nn.Module]
    loss: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
    outputs: Callable[[nn.Module], torch.Tensor]
    data: Callable[[], DataLoader]
    config: LoRAConfig
    targets: list[str]
    layer_type: type = LoRALinear
    base_type: type | None = None  # the adapted layers' base type, when it is not nn.Linear
    extra: dict[str, Any] = field(default_factory=dict)


LLAMA_ALL = blocks("model.layers.{i}.{leaf}", *(f"self_attn.{p}_proj" for p in "qkvo"), "mlp.gate_proj",
                   "mlp.up_proj", "mlp.down_proj")  # fmt: skip
BERT_ALL = [
    *blocks("bert.encoder.layer.{i}.{leaf}", "attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense"),
    "bert.pooler.dense",
]  # fmt: skip

CASES = {
    "llama-all_linear": Case(make_llama, causal_lm_loss, text_outputs, token_data, LoRAConfig(r=4, alpha=8), LLAMA_ALL),
    "llama-named": Case(
        make_llama, causal_lm_loss, text_outputs, token_data,
        LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
        blocks("model.layers.{i}.self_attn.{leaf}", "q_proj", "v_proj"),
    ),
    "gpt2-all_linear": Case(
        gpt2, causal_lm_loss, text_outputs, token_data, LoRAConfig(r=4, alpha=8),
        blocks("transformer.h.{i}.{leaf}", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        base_type=transformers.pytorch_utils.Conv1D,
    ),
    "gpt2-named": Case(  # a dotted suffix tells the MLP's c_proj from the attention's
        gpt2, causal_lm_loss, text_outputs, token_data,
        LoRAConfig(r=4, alpha=8, target_modules=["c_attn", "mlp.c_proj"], use_rslora=True),
        blocks("transformer.h.{i}.{leaf}", "attn.c_attn", "mlp.c_proj"),
        base_type=transformers.pytorch_utils.Conv1D,
    ),
    "bert-all_linear": Case(
        bert, classification_loss, text_outputs, labelled_tokens, LoRAConfig(r=4, alpha=8), BERT_ALL
    ),
    "bert-named": Case(
        bert, classification_loss, text_outputs, labelled_tokens,
        LoRAConfig(r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]),
        blocks("bert.encoder.layer.{i}.attention.self.{leaf}", "query", "value"),
    ),
    "cnn-all_linear": Case(cnn, image_loss, image_outputs, labelled_images, LoRAConfig(r=4, alpha=8), ["fc"]),
    "cnn-named": Case(
        cnn, image_loss, image_outputs, labelled_images,
        LoRAConfig(r=2, alpha=4, target_modules=["conv1", "conv2"], modules_to_save=["head"]),
        ["conv1", "conv2"], layer_type=LoRAConv, base_type=nn.Conv2d,
    ),
}  # fmt: skip


class Finetune(pl.LightningModule):
    """Any model and loss, with the ``configure_optimizers`` most modules have (AdamW over everything)."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.losses: list[float] = []

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(self.model, batch)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", list(CASES))
def test_fine_tune_save_load_and_peft(name, tmp_path):
    case = CASES[name]
    model = case.build(0)
    base = {key: value.clone() for key, value in model.state_dict().items()}
    before = case.outputs(model)
    assert find_targets(model, case.config) == case.targets

    module = Finetune(model, case.loss).train()
    epochs = 3
    make_trainer(tmp_path, max_epochs=epochs, callbacks=[LoRAFinetuneCallback(case.config)]).fit(module, case.data())

    # the expected layers, of the expected types
    layers = dict(lora_layers(model))
    assert list(layers) == case.targets
    assert all(type(layer) is case.layer_type for layer in layers.values())
    assert all(type(layer.base_layer) is (case.base_type or nn.Linear) for layer in layers.values())
    saved = [n for n, _ in trained_in_full_modules(model)]
    assert saved == (case.config.modules_to_save or [])

    # training lowered the loss and moved the adapters (and modules_to_save), nothing else
    steps = len(module.losses) // epochs
    assert sum(module.losses[-steps:]) < sum(module.losses[:steps]), module.losses
    trained = adapter_state_dict(model)
    after = model.state_dict()
    for key, value in after.items():
        original = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        original = original.replace(".original_module.", ".")
        if key in trained:  # a modules_to_save tensor; adapter tensors were not in the base
            assert original not in base or not torch.equal(value, base[original]), f"{key} did not train"
        else:
            assert torch.equal(value, base[original]), f"{key} changed, but it is not an adapter tensor"
    assert all(torch.count_nonzero(layer.factors("default")[1]) > 0 for layer in layers.values())

    model.eval()
    expected = case.outputs(model)
    assert (expected - before).abs().max() > 1e-4

    # the saved adapter gives the same outputs in a fresh base, and in PEFT
    path = save_adapter(model, tmp_path / "adapter")
    written = json.loads((path / CONFIG_NAME).read_text())
    assert written["fan_in_fan_out"] == (case.base_type is transformers.pytorch_utils.Conv1D)
    assert written["modules_to_save"] == (saved or None)
    fresh = case.build(0)
    report = load_adapter(fresh, path)
    assert report.targets == sorted(case.targets) and report.modules_to_save == saved
    torch.testing.assert_close(case.outputs(fresh), expected, rtol=1e-6, atol=1e-6)
    theirs = peft.PeftModel.from_pretrained(case.build(0), path).eval()
    torch.testing.assert_close(case.outputs(theirs), expected, rtol=1e-5, atol=1e-5)
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(case.targets)


def bert_mlm(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(bert_config()).eval()


@pytest.mark.parametrize(
    ("build", "task_type", "head"),
    [
        (make_llama, "CAUSAL_LM", "lm_head"),
        (gpt2, "CAUSAL_LM", "lm_head"),
        (bert, "SEQ_CLS", "classifier"),
        (bert_mlm, None, "cls.predictions.decoder"),
        (lambda seed: transformers.GPT2Model(gpt2(seed).config), None, None),
        (lambda seed: transformers.BertModel(bert_config()), None, None),
        (lambda seed: transformers.LlamaModel(make_llama(seed).config), None, None),
    ],
    ids=["llama", "gpt2", "bert_seq_cls", "bert_mlm", "gpt2_headless", "bert_headless", "llama_headless"],
)
@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")  # PEFT's own GPT-2 injection says so
def test_all_linear_picks_what_peft_picks(build, task_type, head):
    """Every linear layer (GPT-2's Conv1D included) except the output head, as PEFT's "all-linear" does."""
    ours = find_targets(build(0), LoRAConfig(target_modules="all-linear"))
    config = peft.LoraConfig(r=4, target_modules="all-linear", task_type=task_type)
    theirs = peft.get_peft_model(build(0), config)
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert set(ours) == adapted
    if head is None:  # a headless backbone: every linear layer, its last block's and the pooler's included
        assert len(ours) == sum(type(m).__name__ in ("Linear", "Conv1D") for m in build(0).modules())
    else:
        assert head not in ours and head in dict(build(0).named_modules())


def test_all_linear_leaves_a_head_put_on_a_backbone_alone():
    """Outside Hugging Face models the last linear layer is taken for the head, e.g. a LightningModule's own
    classifier over a headless encoder, whose pooler is adapted."""

    class Classifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = transformers.BertModel(bert_config())
            self.head = nn.Linear(bert_config().hidden_size, 2)

    targets = find_targets(Classifier(), LoRAConfig(target_modules="all-linear"))
    assert "head" not in targets and "encoder.pooler.dense" in targets

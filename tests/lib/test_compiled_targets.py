"""A submodule under ``torch.compile`` (``self.net = torch.compile(net)``, as Lightning's docs show) is targeted by the
names the user wrote (``net.0``, never ``net._orig_mod.0``): in targets, exclusions, ``modules_to_save``, rank and
alpha patterns, error listings, saved files and checkpoints; and it trains through the compiled wrapper as it
does eagerly."""

from __future__ import annotations

import json

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from lora_lightning import (
    LoRAConfig,
    LoRAFinetuneCallback,
    TargetError,
    find_targets,
    inject_lora,
    save_adapter,
)
from lora_lightning.checkpoint_io import ADAPTERS_KEY
from lora_lightning.inject import _shown_name
from lora_lightning.params import lora_layers, trained_in_full_modules
from lora_lightning.peft_format import CONFIG_NAME
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, perturb_lora_b_, snapshot
from tests.helpers.models import LlamaModule, MLPModule, classification_data, make_trainer, token_data

CONFIGS = {
    "names": LoRAConfig(r=2, target_modules=["net.0", "net.2"]),
    "regex": LoRAConfig(r=2, target_modules=r"net\.[02]"),
    "exclusions": LoRAConfig(r=2, target_modules="all-linear", exclude_modules=["net.2"]),
    "modules_to_save": LoRAConfig(r=2, target_modules=["net.0"], modules_to_save=["net.4"]),
    "patterns": LoRAConfig(r=2, target_modules=["0", "2"], rank_pattern={r"net\.2": 3}, alpha_pattern={"^net.0": 5}),
}


def compiled(module: MLPModule | LlamaModule) -> MLPModule | LlamaModule:
    """``module`` with its model compiled in place, as Lightning's docs show (compilation waits for a forward)."""
    if isinstance(module, MLPModule):
        module.net = torch.compile(module.net)
    else:
        module.model = torch.compile(module.model)
    return module


def layer_specs(module: nn.Module) -> dict[str, object]:
    return {name.replace("._orig_mod", ""): layer.spec("default") for name, layer in lora_layers(module)}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS)
def test_targets_exclusions_modules_to_save_and_patterns_use_the_names_the_user_wrote(config):
    plain, wrapped = MLPModule(), compiled(MLPModule())
    assert find_targets(wrapped, config) == find_targets(plain, config)
    expected, report = inject_lora(plain, config), inject_lora(wrapped, config)
    assert (report.targets, report.modules_to_save) == (expected.targets, expected.modules_to_save)
    assert "_orig_mod" not in str(report.targets)
    assert layer_specs(wrapped) == layer_specs(plain)
    assert [n for n, _ in trained_in_full_modules(wrapped)] == [
        n.replace("net.", "net._orig_mod.") for n, _ in trained_in_full_modules(plain)
    ]


def test_all_linear_leaves_out_the_head_of_a_compiled_hugging_face_model():
    plain, wrapped = LlamaModule(), compiled(LlamaModule())
    targets = find_targets(wrapped, LoRAConfig(r=2))
    assert targets == find_targets(plain, LoRAConfig(r=2)) and "model.lm_head" not in targets
    assert "model.model.layers.0.self_attn.q_proj" in targets


def test_a_target_that_matches_nothing_lists_the_layers_with_their_parents_name():
    module = compiled(MLPModule())
    before = snapshot(module)
    with pytest.raises(TargetError) as error:
        inject_lora(module, LoRAConfig(target_modules=["net.9"]))
    assert str(error.value).endswith("adaptable layers: net.0, net.2, net.4")
    assert_unchanged(module, before)


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("model.layers.0.self_attn.q_proj", "q_proj"),
        ("net.0", "net.0"),
        ("blocks.1.0", "blocks.1.0"),
        ("0", "0"),
        ("head", "head"),
    ],
)
def test_a_listed_layer_is_its_leaf_name_or_more_where_the_leaf_is_a_position(name, shown):
    assert _shown_name(name) == shown


def test_a_layer_directly_inside_a_wrapper_that_forwards_no_writes_is_replaced_where_the_forward_finds_it():
    """torch's checkpoint wrapper (unlike torch.compile's) does not pass attribute writes on to the module inside."""
    plain, wrapped = MLPModule(), MLPModule()
    wrapped.net = checkpoint_wrapper(wrapped.net, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
    for module in (plain, wrapped):
        torch.manual_seed(1)  # the same A
        inject_lora(module, LoRAConfig(r=2, target_modules=["net.0"]))
        perturb_lora_b_(module)
    assert [n for n, _ in lora_layers(wrapped)] == ["net._checkpoint_wrapped_module.0"]
    x = classification_data().dataset.tensors[0]
    torch.testing.assert_close(wrapped(x), plain(x), rtol=0, atol=0)


def test_a_compiled_single_layer_is_refused_before_any_change():
    """The wrapper of a compiled layer is no layer type LoRA knows; adapt the module inside it instead."""
    module = MLPModule()
    module.head = torch.compile(nn.Linear(4, 2))
    with pytest.raises(TargetError, match=r"unsupported types: \['head \(OptimizedModule\)'\]"):
        inject_lora(module, LoRAConfig(target_modules=["head"]))
    assert not list(lora_layers(module))


def test_saved_adapters_name_the_layers_as_the_user_wrote(tmp_path):
    config = CONFIGS["patterns"]
    plain, wrapped = MLPModule(), compiled(MLPModule())
    inject_lora(plain, config)
    inject_lora(wrapped, config)
    files = [save_adapter(m, tmp_path / name) / CONFIG_NAME for name, m in (("plain", plain), ("wrapped", wrapped))]
    plain_config, wrapped_config = (json.loads(f.read_text()) for f in files)
    assert wrapped_config == plain_config and plain_config["rank_pattern"] == {r"^net\.2": 3}


class Tagger(nn.Module):
    """An embedding, a convolution and a linear layer: every layer type that LoRA adapts (compiled below)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.conv, self.head = nn.Embedding(10, 8), nn.Conv1d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pooled = self.conv(self.embed(tokens).transpose(1, 2)).mean(-1)  # 2-D, as Inductor's addmm patterns need
        return self.head(pooled)


@pytest.mark.slow
def test_compiled_adapters_give_the_eager_outputs_on_every_layer_type():
    """Inductor's addmm patterns drop ``add_``'s ``alpha``: an update added with it came out unscaled."""
    model = Tagger()
    inject_lora(model, LoRAConfig(r=2, alpha=8, target_modules=["embed", "conv", "head"]))
    perturb_adapters_(model)
    tokens = torch.randint(0, 10, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def fit(module: MLPModule, tmp_path, config: LoRAConfig, checkpoints: ModelCheckpoint | None = None) -> MLPModule:
    callbacks = [LoRAFinetuneCallback(config), *([checkpoints] if checkpoints else [])]
    trainer = make_trainer(tmp_path, max_epochs=2, callbacks=callbacks, enable_checkpointing=checkpoints is not None)
    trainer.fit(module, token_data() if isinstance(module, LlamaModule) else classification_data())
    return module


def trained_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace("._orig_mod", ""): v for k, v in module.state_dict().items() if "lora_" in k}


@pytest.mark.slow
def test_an_mlp_trains_through_the_compiled_wrapper_as_it_does_eagerly(tmp_path):
    config = CONFIGS["patterns"]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    eager = fit(MLPModule(), tmp_path / "eager", config)
    wrapped = fit(compiled(MLPModule()), tmp_path / "compiled", config, checkpoints)
    assert wrapped.losses == pytest.approx(eager.losses, rel=1e-5)
    torch.testing.assert_close(trained_tensors(wrapped), trained_tensors(eager), rtol=1e-5, atol=1e-6)
    recorded = torch.load(checkpoints.last_model_path, weights_only=True)[ADAPTERS_KEY]["default"]
    assert sorted(recorded) == ["net.0", "net.2"] and recorded["net.2"]["r"] == 3


@pytest.mark.slow
def test_a_tiny_llama_trains_through_the_compiled_wrapper_as_it_does_eagerly(tmp_path):
    config = LoRAConfig(r=2, alpha=4, target_modules=["model.model.layers.0.self_attn.q_proj", "v_proj"])
    eager = fit(LlamaModule(), tmp_path / "eager", config)
    wrapped = fit(compiled(LlamaModule()), tmp_path / "compiled", config)
    assert len(trained_tensors(wrapped)) == 6  # A and B on three layers
    torch.testing.assert_close(trained_tensors(wrapped), trained_tensors(eager), rtol=1e-4, atol=1e-5)

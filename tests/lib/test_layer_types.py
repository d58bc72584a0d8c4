"""LoRA on every supported layer type: nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Linear and Hugging Face's GPT-2
``Conv1D`` (weight stored transposed, PEFT's ``fan_in_fan_out``). Each is proven against PEFT itself both ways,
merges and unmerges exactly, and trains through Lightning."""

from __future__ import annotations

import copy
import json

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lora_lightning import (
    AdapterFormatError,
    AdapterSpec,
    LoRAConfig,
    LoRAConv,
    LoRAEmbedding,
    LoRAFinetuneCallback,
    LoRALinear,
    TargetError,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import perturb_adapters_
from tests.helpers.models import make_llama, make_trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 20
TOKENS = torch.randint(0, VOCAB, (3, 8), generator=torch.Generator().manual_seed(1))
GPT2_TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(4))
MIXED_TARGETS = ["emb", "conv1", "conv2", "fc"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc", "wte"]


class Mixed(nn.Module):
    """One layer of each plain type: tokens -> Embedding -> Conv1d -> Conv2d (stride 2) -> Linear -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 12, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 10)
        self.head = nn.Linear(10, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(self.emb(tokens).transpose(1, 2)))  # [B, 12, L]
        h = torch.relu(self.conv2(h.reshape(h.shape[0], 3, 4, -1))).mean((2, 3))  # [B, 6]
        return self.head(torch.tanh(self.fc(h)))


def mixed(seed: int = 0) -> Mixed:
    torch.manual_seed(seed)
    return Mixed().eval()


def gpt2(seed: int = 0):
    config = transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


def run(model: nn.Module) -> torch.Tensor:
    inner = model.get_base_model() if isinstance(model, peft.PeftModel) else model
    with torch.no_grad():
        return model(TOKENS) if isinstance(inner, Mixed) else model(input_ids=GPT2_TOKENS).logits


MODELS = {"mixed": (mixed, MIXED_TARGETS), "gpt2": (gpt2, GPT2_TARGETS)}
VARIANTS = {
    "plain": {},
    "dora": {"use_dora": True},
    "rslora_gaussian": {"use_rslora": True, "init": "gaussian"},
    "patterns": {"rank_pattern": {"conv.": 2}, "alpha_pattern": {"fc": 3}},
}
GPT2_PATTERNS = {"rank_pattern": {"c_fc": 6}, "alpha_pattern": {"wte": 5}}


def variant(model_name: str, name: str) -> dict:
    """Our LoRAConfig keyword arguments of variant ``name`` for the model ``model_name``."""
    return GPT2_PATTERNS if (model_name, name) == ("gpt2", "patterns") else VARIANTS[name]


def llama_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=GPT2_TOKENS).logits


def peft_config(targets: list[str], **ours):
    names = {"alpha": "lora_alpha", "init": "init_lora_weights"}
    values = {"r": 4, "alpha": 8, "target_modules": targets, **ours}
    return peft.LoraConfig(**{names.get(k, k): v for k, v in values.items()})


# ------------------------------------------------------------------------------------------ the layer types


def test_each_layer_type_gets_its_lora_layer_with_peft_s_shapes():
    model = mixed()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, use_dora=True))
    assert isinstance(model.emb, LoRAEmbedding) and isinstance(model.fc, LoRALinear)
    assert isinstance(model.conv1, LoRAConv) and isinstance(model.conv2, LoRAConv)
    assert not isinstance(model.head, LoRALinear)
    shapes = {
        name: {key: tuple(t.shape) for key, t in layer.adapter_tensors("default").items()}
        for name, layer in lora_layers(model)
    }
    theirs = peft.get_peft_model(mixed(), peft_config(MIXED_TARGETS, use_dora=True))
    their_shapes = {
        key.removeprefix("base_model.model."): tuple(t.shape)
        for key, t in peft.get_peft_model_state_dict(theirs).items()
    }
    assert their_shapes == {f"{name}.{key}": shape for name, keys in shapes.items() for key, shape in keys.items()}
    assert shapes["emb"] == {"lora_embedding_A": (4, VOCAB), "lora_embedding_B": (8, 4), "lora_magnitude_vector": (8,)}
    assert shapes["conv2"]["lora_A.weight"] == (4, 3, 3, 3) and shapes["conv2"]["lora_B.weight"] == (6, 4, 1, 1)
    assert shapes["conv1"]["lora_magnitude_vector"] == (1, 12, 1)
    assert model.conv2.lora_A["default"].stride == (2, 2) and model.conv2.lora_B["default"].stride == (1, 1)


def test_gpt2_conv1d_is_adapted_as_a_transposed_linear():
    model = gpt2()
    conv1d = model.transformer.h[0].attn.c_attn
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=GPT2_TARGETS))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.base_layer is conv1d and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (16, 48) and conv1d.weight.shape == (16, 48)
    assert layer.lora_A["default"].weight.shape == (4, 16) and layer.lora_B["default"].weight.shape == (48, 4)
    assert isinstance(model.transformer.wte, LoRAEmbedding)
    assert model.lm_head.weight is model.transformer.wte.base_layer.weight, "the tied head must stay tied"
    perturb_adapters_(layer, scale=0.3)
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), conv1d(x) + x @ layer.delta_weight(), rtol=1e-5, atol=1e-6)
    assert layer.delta_weight().shape == conv1d.weight.shape


# --------------------------------------------------------------------------------- PEFT as oracle, both ways


@pytest.mark.parametrize("variant_name", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_peft_loads_our_adapter_to_the_same_outputs(tmp_path, model_name, variant_name):
    build, targets = MODELS[model_name]
    ours = build()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, **variant(model_name, variant_name)))
    expected = run(perturb_adapters_(ours, scale=0.3))
    assert (expected - run(build())).abs().max() > 1e-3
    path = save_adapter(ours, tmp_path / "ours")
    saved = json.loads((path / CONFIG_NAME).read_text())
    assert saved["fan_in_fan_out"] is (model_name == "gpt2")

    theirs = peft.PeftModel.from_pretrained(build(), path).eval()
    torch.testing.assert_close(run(theirs), expected, rtol=1e-5, atol=1e-5)
    our_file = load_file(path / WEIGHTS_NAME)
    their_state = peft.get_peft_model_state_dict(theirs)
    assert their_state.keys() == our_file.keys()
    for key, tensor in our_file.items():
        assert torch.equal(their_state[key], tensor), key


@pytest.mark.parametrize("variant_name", VARIANTS)
@pytest.mark.parametrize("model_name", MODELS)
def test_we_load_peft_adapters_to_the_same_outputs(tmp_path, model_name, variant_name):
    build, targets = MODELS[model_name]
    extra = {"fan_in_fan_out": True} if model_name == "gpt2" else {}
    theirs = peft.get_peft_model(build(), peft_config(targets, **extra, **variant(model_name, variant_name)))
    expected = run(perturb_adapters_(theirs, scale=0.3).eval())
    assert (expected - run(build())).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")

    ours = build()
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours), expected, rtol=1e-5, atol=1e-5)
    assert {type(layer) for _, layer in lora_layers(ours)} == (
        {LoRAEmbedding, LoRAConv, LoRALinear} if model_name == "mixed" else {LoRAEmbedding, LoRALinear}
    )


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_llama_embed_tokens_and_lm_head_both_ways_with_the_base_weights_peft_saves(tmp_path, use_dora):
    """Targeting ``embed_tokens``/``lm_head`` makes PEFT save their base weights too (``save_embedding_layers``);
    we load those into the base layers, as PEFT does: here they differ from the fresh base's."""
    targets = ["embed_tokens", "q_proj", "lm_head"]
    theirs = peft.get_peft_model(make_llama(0), peft_config(targets, use_dora=use_dora))
    with torch.no_grad():
        theirs.get_submodule("base_model.model.model.embed_tokens.base_layer").weight[5:9] += 1.0
    expected = llama_logits(perturb_adapters_(theirs, scale=0.3).eval())
    with pytest.warns(UserWarning, match="save_embedding_layers"):
        theirs.save_pretrained(tmp_path / "peft")
    assert "base_model.model.model.embed_tokens.base_layer.weight" in load_file(tmp_path / "peft" / WEIGHTS_NAME)

    ours = make_llama(0)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(llama_logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding) and isinstance(ours.lm_head, LoRALinear)

    path = save_adapter(ours, tmp_path / "ours")  # adapter tensors only: PEFT takes the base from the model
    theirs_again = peft.PeftModel.from_pretrained(make_llama(0), path).eval()
    with torch.no_grad():
        theirs_again.get_submodule("base_model.model.model.embed_tokens.base_layer").weight[5:9] += 1.0
    torch.testing.assert_close(llama_logits(theirs_again), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("key", "shape", "fragment"),
    [
        ("head.base_layer.weight", (5, 10), "neither a LoRA tensor nor"),  # head takes no adapter here
        ("emb.base_layer.weight", (VOCAB + 1, 8), r"shape \(21, 8\) in the file, the model has \(20, 8\)"),
    ],
)
def test_only_base_weights_of_the_file_s_own_targets_load_and_only_in_shape(tmp_path, key, shape, fragment):
    model = mixed()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS))
    path = save_adapter(model, tmp_path / "ours")
    tensors = load_file(path / WEIGHTS_NAME) | {f"base_model.model.{key}": torch.zeros(shape)}
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    fresh = mixed()
    with pytest.raises(AdapterFormatError, match=fragment):
        load_adapter(fresh, path)
    assert not list(lora_layers(fresh))


def test_pissa_on_gpt2_conv1d_matches_peft_both_ways(tmp_path):
    base = gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]
    ours = gpt2()
    inject_lora(ours, LoRAConfig(r=4, alpha=8, target_modules=targets, init="pissa", use_dora=True))
    torch.testing.assert_close(run(ours), run(base), rtol=1e-5, atol=1e-5)  # unchanged at step 0
    theirs = peft.get_peft_model(gpt2(), peft_config(targets, init="pissa", use_dora=True, fan_in_fan_out=True))
    for name, layer in lora_layers(ours):
        their_layer = theirs.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(layer.base_layer.weight, their_layer.base_layer.weight, rtol=1e-5, atol=1e-6)
        a, b = layer.factors("default")
        torch.testing.assert_close(b @ a, their_layer.lora_B["default"].weight @ their_layer.lora_A["default"].weight)

    expected = run(perturb_adapters_(ours, scale=0.3))
    path = save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(gpt2(), path)), expected, rtol=1e-5, atol=1e-5)
    expected = run(perturb_adapters_(theirs, scale=0.3).eval())
    theirs.save_pretrained(tmp_path / "peft")
    again = gpt2()
    load_adapter(again, tmp_path / "peft")
    torch.testing.assert_close(run(again), expected, rtol=1e-5, atol=1e-5)


def test_olora_on_gpt2_conv1d_factors_the_untransposed_weight():
    """PEFT 0.21's OLoRA factors a Conv1D's stored ``[in, out]`` weight without transposing it, which gives
    ``A``/``B`` of the wrong shapes (its own forward then fails); ours factors ``W = weight.T`` like a Linear's,
    so it must equal PEFT's OLoRA on the equivalent ``nn.Linear``."""
    model = gpt2()
    conv1d = model.transformer.h[0].mlp.c_fc
    linear = nn.Linear(16, 64)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.T)
        linear.bias.copy_(conv1d.bias)
    x = torch.randn(3, 16)
    expected = linear(x).detach()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["c_fc"], init="olora"))
    theirs = peft.get_peft_model(nn.Sequential(linear), peft_config(["0"], init="olora")).get_base_model()[0]
    layer = model.transformer.h[0].mlp.c_fc
    for ours_factor, their_factor in zip(layer.factors("default"), (theirs.lora_A, theirs.lora_B), strict=True):
        torch.testing.assert_close(ours_factor, their_factor["default"].weight)
    torch.testing.assert_close(layer.base_layer.weight, theirs.base_layer.weight.T)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs(x), expected, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_adapter_tensor_and_dora_magnitude_of_every_layer_type():
    model = mixed().train()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, use_dora=True))
    perturb_adapters_(model, scale=0.3)(TOKENS).square().sum().backward()
    for name, layer in lora_layers(model):
        for key, tensor in layer.adapter_tensors("default").items():
            assert tensor.grad is not None and tensor.grad.abs().sum() > 0, f"{name}.{key}"
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ------------------------------------------------------------------------------------- merging and unmerging


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("model_name", MODELS)
def test_merge_unmerge_round_trip_for_every_layer_type(model_name, use_dora):
    build, targets = MODELS[model_name]
    targets = [t for t in targets if t != "wte"]  # GPT-2's wte is tied to its head: see the test below
    model = build()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=targets, use_dora=use_dora, init="gaussian"))
    expected = run(perturb_adapters_(model, scale=0.3))
    bases = {name: layer.base_layer.weight.clone() for name, layer in lora_layers(model)}
    for _, layer in lora_layers(model):
        layer.merge()
    merged = run(model)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    for name, layer in lora_layers(model):
        assert not torch.allclose(layer.base_layer.weight, bases[name]), name
        layer.unmerge()
        torch.testing.assert_close(layer.base_layer.weight, bases[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-5)

    plain = merge_lora(copy.deepcopy(model))
    assert not list(lora_layers(plain))
    torch.testing.assert_close(run(plain), expected, rtol=1e-5, atol=1e-5)
    base_types = {type(m) for m in build().modules()}
    assert {type(m) for m in plain.modules()} == base_types


def test_merging_a_tied_embedding_unties_it_so_the_head_keeps_the_base_weight():
    """GPT-2's head shares ``wte``'s weight. Merging ``wte``'s adapter in place would change the head too (PEFT
    0.21's ``merge_and_unload`` does, and its merged logits differ); ours gives ``wte`` its own weight first."""
    model = gpt2()
    original = model.lm_head.weight.detach().clone()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=GPT2_TARGETS, use_dora=True))
    expected = run(perturb_adapters_(model, scale=0.3))
    with pytest.warns(UserWarning, match=r"untied the weights of \['transformer.wte'\]"):
        merge_lora(model)
    torch.testing.assert_close(run(model), expected, rtol=1e-5, atol=1e-5)
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert torch.equal(model.lm_head.weight, original) and not torch.equal(model.transformer.wte.weight, original)


def test_merged_layers_equal_peft_s_merge_and_unload(tmp_path):
    model = mixed()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, use_dora=True))
    path = save_adapter(perturb_adapters_(model, scale=0.3), tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(mixed(), path).merge_and_unload()
    ours = merge_lora(model)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, theirs.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------------------- embedding details


def test_dropout_never_applies_to_an_embedding_s_indices():
    """An embedding's input is indices: as in PEFT, its adapter has no dropout, even with ``dropout > 0``
    (which still applies to the other layers)."""
    model = mixed()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, dropout=0.5))
    assert isinstance(model.emb.lora_dropout["default"], nn.Identity)
    assert isinstance(model.fc.lora_dropout["default"], nn.Dropout)
    perturb_adapters_(model.emb, scale=0.3).train()
    out = model.emb(TOKENS)
    torch.testing.assert_close(out, model.emb.eval()(TOKENS))
    model.train()(TOKENS).sum().backward()  # the whole model trains with dropout on
    assert model.emb.lora_embedding_A["default"].grad is not None


def test_embedding_adapter_respects_padding_idx_like_the_base():
    layer = perturb_adapters_(
        LoRAEmbedding(nn.Embedding(VOCAB, 8, padding_idx=0), AdapterSpec(r=4, alpha=8)), scale=0.3
    )
    tokens = torch.tensor([[0, 3, 0, 5]])
    layer(tokens).sum().backward()
    grad = layer.lora_embedding_A["default"].grad
    assert torch.count_nonzero(grad[:, 0]) == 0 and torch.count_nonzero(grad[:, 3]) > 0


# --------------------------------------------------------------------------------------------------- errors


def test_pissa_and_olora_on_embeddings_and_convolutions_are_refused_before_any_change():
    model = mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TargetError) as error:
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, init="pissa"))
    message = str(error.value)
    for name, kind in (("emb", "Embedding"), ("conv1", "Conv1d"), ("conv2", "Conv2d")):
        assert f"layer '{name}': init='pissa' works on linear layers only, not on {kind}" in message
    assert "'fc'" not in message
    assert not list(lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["fc"], init="olora"))  # a Linear takes it


@pytest.mark.parametrize(
    ("conv", "fragment"),
    [
        (nn.Conv2d(4, 4, 3, dilation=2), "'dilation': (2, 2)"),
        (nn.Conv1d(4, 4, 3, padding=1, padding_mode="circular"), "'padding_mode': 'circular'"),
    ],
)
def test_unsupported_convolutions_are_refused(conv, fragment):
    model = nn.Sequential(conv)
    with pytest.raises(TargetError, match="supports dilation=1 and padding_mode='zeros' only") as error:
        inject_lora(model, LoRAConfig(r=2, target_modules=["0"]))
    assert fragment in str(error.value)
    assert not list(lora_layers(model))


# --------------------------------------------------------------------------------------- through Lightning


class MixedModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = mixed().train()
        self.losses: list[float] = []
        self.grads: set[str] = set()

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        loss = nn.functional.cross_entropy(self.net(tokens), labels)
        self.losses.append(loss.item())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        self.grads |= {n for n, p in self.named_parameters() if p.grad is not None}

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-2)


def token_labels() -> DataLoader:
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (32, 8), generator=generator)
    return DataLoader(TensorDataset(tokens, tokens[:, 0] % 5), batch_size=8)


def test_fit_on_embedding_and_conv_layers_trains_only_their_adapters(tmp_path):
    module = MixedModule()
    base_before = {k: v.clone() for k, v in module.net.state_dict().items()}
    config = LoRAConfig(r=4, alpha=8, target_modules=MIXED_TARGETS, dropout=0.1)
    make_trainer(tmp_path, max_epochs=6, callbacks=[LoRAFinetuneCallback(config)]).fit(module, token_labels())
    assert sum(module.losses[-4:]) < sum(module.losses[:4])
    adapter_keys = {
        f"net.{name}.{layer.state_key('default', key)}"
        for name, layer in lora_layers(module.net)
        for key in layer.adapter_tensors("default")
    }
    assert module.grads == adapter_keys and len(adapter_keys) == 8
    state = module.net.state_dict()
    for key, tensor in base_before.items():
        name, _, leaf = key.rpartition(".")
        adapted = f"{name}.base_layer.{leaf}" if name in MIXED_TARGETS else key
        assert torch.equal(state[adapted], tensor), key

    expected = run(module.net.eval())
    path = save_adapter(module.net, tmp_path / "adapter")
    torch.testing.assert_close(run(peft.PeftModel.from_pretrained(mixed(), path)), expected, rtol=1e-5, atol=1e-5)

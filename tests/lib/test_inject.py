import re

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    LoRALinear,
    TargetError,
    adapter_parameters,
    find_targets,
    inject_lora,
    merge_lora,
    sizing,
    unload_lora,
)
from lora_lightning.layers import ModulesToSave
from tests.helpers.adapters import assert_unchanged, snapshot
from tests.helpers.models import make_llama, make_mlp

LLAMA_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def llama_layer_names(*leaves: str, layers: int = 2) -> list[str]:
    block = {
        "q_proj": "self_attn",
        "k_proj": "self_attn",
        "v_proj": "self_attn",
        "o_proj": "self_attn",
        "gate_proj": "mlp",
        "up_proj": "mlp",
        "down_proj": "mlp",
    }
    return [f"model.layers.{i}.{block[leaf]}.{leaf}" for i in range(layers) for leaf in leaves]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target_modules": "all-linear"}, llama_layer_names(*LLAMA_LINEARS)),
        ({"target_modules": ["q_proj", "v_proj"]}, llama_layer_names("q_proj", "v_proj")),
        ({"target_modules": ["self_attn.o_proj"]}, llama_layer_names("o_proj")),
        ({"target_modules": ["model.layers.1.mlp.up_proj"]}, ["model.layers.1.mlp.up_proj"]),
        ({"target_modules": r"model\.layers\.0\..*_proj"}, llama_layer_names(*LLAMA_LINEARS, layers=1)),
        ({"target_modules": r".*\.(q|k)_proj"}, llama_layer_names("q_proj", "k_proj")),
        (
            {"target_modules": "all-linear", "exclude_modules": ["mlp.down_proj", "o_proj"]},
            llama_layer_names("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
        ),
        (
            {"target_modules": "all-linear", "exclude_modules": r".*\.layers\.1\..*"},
            llama_layer_names(*LLAMA_LINEARS, layers=1),
        ),
        ({"target_modules": ["q_proj", "lm_head"]}, [*llama_layer_names("q_proj"), "lm_head"]),
    ],
)
def test_target_matching_on_llama(kwargs, expected):
    assert sorted(find_targets(make_llama(), LoRAConfig(**kwargs))) == sorted(expected)


def test_all_linear_skips_the_last_linear_of_a_plain_model():
    assert find_targets(make_mlp(), LoRAConfig()) == ["0", "2"]


def test_modules_to_save_are_trained_in_full_and_not_adapted():
    model = make_mlp()
    report = inject_lora(model, LoRAConfig(r=2, target_modules="[024]", modules_to_save=["4"]))
    assert report.targets == ["0", "2"] and report.modules_to_save == ["4"]
    assert isinstance(model[4], ModulesToSave) and isinstance(model[4].original_module, nn.Linear)
    assert all(p.requires_grad for p in model[4].modules_to_save["default"].parameters())
    assert not any(p.requires_grad for p in model[4].original_module.parameters())


def test_inject_freezes_the_base_and_counts_parameters():
    model = make_llama()
    total_before = sum(p.numel() for p in model.parameters())
    report = inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # q_proj: 32 -> 32, v_proj: 32 -> 16 (2 KV heads of 8): A [4, 32] + B [out, 4]
    expected_adapter = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    assert report.params.adapter == report.params.trainable == expected_adapter
    assert report.params.total == total_before + expected_adapter
    assert "LoRA on 4 layers" in str(report) and "left out" not in str(report)


@pytest.mark.parametrize(
    ("model", "kwargs", "line"),
    [
        (make_mlp, {"target_modules": ["0"]}, "LoRA on 1 layer; trainable params: 96 of 1,828 .*"),
        (make_mlp, {}, "LoRA on 2 layers; trainable params: .*; all-linear left out: 4$"),
        (make_llama, {}, "LoRA on 14 layers; .*; all-linear left out: lm_head$"),
    ],
)
def test_the_report_line_counts_layers_and_names_the_heads_all_linear_left_out(model, kwargs, line):
    assert re.fullmatch(line, str(inject_lora(model(), LoRAConfig(r=2, **kwargs))))


def test_a_rank_above_a_layers_side_warns_and_works_as_in_peft():
    """r=20 on a 16 -> 32 layer: the update's rank stays 16 there; PEFT allows it, so we do, and say where."""
    model = make_mlp()
    x = torch.randn(3, 16)
    with pytest.warns(UserWarning, match=r"smaller side of 1 layer\(s\).*: '0' r=20 \(16 -> 32\)$"):
        inject_lora(model, LoRAConfig(r=20))
    assert model[0].lora_A["default"].weight.shape == (20, 16)
    model(x).sum().backward()
    assert model[0].lora_B["default"].weight.grad is not None


def test_the_adapter_bytes_are_checked_against_the_free_memory_of_their_device(monkeypatch):
    """The estimate from the shapes (A and B of r=4 on 16 -> 32 and 32 -> 32, fp32: 1,792 bytes) against what
    `free_bytes` reports: one byte short is refused before any change, enough passes."""
    need = 4 * 4 * (16 + 32 + 32 + 32)
    for free, refused in ((need - 1, True), (need, False)):
        monkeypatch.setattr(sizing, "free_bytes", lambda device, free=free: free)
        model = make_mlp()
        before = snapshot(model)
        if refused:
            with pytest.raises(TargetError, match=rf"need 1.8 kB on cpu, which has {need - 1:,} B free|need 1.8 kB"):
                inject_lora(model, LoRAConfig(r=4))
            assert_unchanged(model, before)
        else:
            inject_lora(model, LoRAConfig(r=4))


def test_injected_model_is_unchanged_at_step_zero():
    model = make_llama()
    tokens = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        expected = model(tokens).logits
        inject_lora(model, LoRAConfig(r=4))
        assert torch.equal(model(tokens).logits, expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_modules": ["q_proj", "qkv_proj"]}, r"target_modules: \['qkv_proj'\] match no module"),
        ({"target_modules": r"transformer\.h\..*"}, "match no module"),
        ({"target_modules": ["self_attn"]}, r"unsupported types: \['model.layers.0.self_attn \(LlamaAttention\)"),
        ({"target_modules": ["input_layernorm"]}, "LlamaRMSNorm"),
        ({"target_modules": "all-linear", "exclude_modules": ["q_prj"]}, r"exclude_modules: \['q_prj'\]"),
        ({"modules_to_save": ["classifier"]}, r"modules_to_save: \['classifier'\] match no module"),
        ({"r": 10**9}, r"the adapters need 4.1 TB on cpu, which has .* free; the largest: '.*' r=1000000000"),
        ({"target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "leaves no layer to adapt"),
    ],
)
def test_bad_targets_raise_with_candidates_and_leave_the_model_untouched(kwargs, message):
    model = make_llama()
    before = snapshot(model)
    with pytest.raises(TargetError, match=message) as error:
        inject_lora(model, LoRAConfig(**kwargs))
    assert "adaptable layers: " in str(error.value) and "q_proj (x2)" in str(error.value)
    assert_unchanged(model, before)


def test_second_injection_raises_and_changes_nothing():
    model = make_mlp()
    inject_lora(model, LoRAConfig(r=2))
    before = snapshot(model)
    with pytest.raises(TargetError, match="already has adapter 'default' on 2 layers"):
        inject_lora(model, LoRAConfig(r=2))
    assert_unchanged(model, before)


def trained_mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = make_mlp()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for param in adapter_parameters(model):
            param.normal_(std=0.2)
    x = torch.randn(6, 16)
    return model, x, model(x).detach()


def test_merge_lora_folds_adapters_in_and_removes_the_layers():
    model, x, adapted = trained_mlp()
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model[0]) is nn.Linear
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_unload_lora_restores_the_original_model():
    original = make_mlp()
    x = torch.randn(6, 16)
    expected = original(x)
    model, _, adapted = trained_mlp()
    assert not torch.allclose(adapted, expected)
    model[0].merge()  # a merged layer is unmerged before it is removed
    unload_lora(model)
    assert repr(model) == repr(original)
    torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=1e-6)
    inject_lora(model, LoRAConfig(r=2))  # and it can be adapted again


def test_injection_on_the_meta_device_allocates_nothing():
    """(Its speed is measured in benchmarks/, not asserted here.)"""
    with torch.device("meta"):
        model = nn.ModuleDict(
            {f"layer{i}": nn.ModuleDict({"q": nn.Linear(4096, 4096), "up": nn.Linear(4096, 14336)}) for i in range(32)}
        )
    report = inject_lora(model, LoRAConfig(r=16, target_modules=["q", "up"]))
    assert len(report.targets) == 64
    assert all(p.is_meta for p in model.parameters())


def test_injecting_into_an_8b_llama_on_the_meta_device_allocates_nothing():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8,
    )  # fmt: skip
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    report = inject_lora(model, LoRAConfig(r=16, alpha=32))
    assert len(report.targets) == 32 * 7 and "lm_head" not in report.targets
    assert report.params.adapter == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert all(p.is_meta for p in model.parameters())  # nothing allocated

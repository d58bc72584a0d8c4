"""4-bit NF4 bases (`lora_lightning.quant`): bitsandbytes and torchao, forward and backward on CPU, LoRA on top."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lora_lightning import (
    LoRAConfig,
    adapter_parameters,
    inject_lora,
    load_adapter,
    merge_lora,
    param_summary,
    quant,
    quantize_linears,
    save_adapter,
)
from tests.helpers.models import tiny_llama_config

PACKAGES = {"bnb-nf4": "bitsandbytes", "torchao-nf4": "torchao"}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_llama(seed: int = 0) -> nn.Module:
    """conftest's tiny Llama, widened to 64 so every layer suits bitsandbytes' CPU kernels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=128)).eval()


@pytest.fixture(params=quant.KINDS)
def kind(request) -> str:
    pytest.importorskip(PACKAGES[request.param])
    return request.param


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if type(m) is nn.Linear}


def state(model: nn.Module) -> dict[str, tuple[type, torch.Tensor]]:
    """Every module's type and every parameter, to show a model untouched."""
    types = {n: type(m) for n, m in model.named_modules()}
    return {"types": types, "params": {n: p.detach().clone() for n, p in model.named_parameters()}}


def assert_same_state(before: dict, model: nn.Module) -> None:
    after = state(model)
    assert after["types"] == before["types"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name], value), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantizes_every_linear_but_the_head_frozen(kind, dtype):
    model = make_llama()
    names = quantize_linears(model, kind, compute_dtype=dtype)
    assert names == [f"model.layers.{i}.{part}.{leaf}" for i in range(2) for part, leaf in _parts()]
    for name in names:
        layer = model.get_submodule(name)
        assert quant.is_quantized(layer) and isinstance(layer, nn.Linear)
        assert quant.compute_dtype(layer) == dtype
        assert not any(p.requires_grad for p in layer.parameters())
    short = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    library = kind.split("-")[0]
    assert quant.describe(model.get_submodule(names[0])) == (
        f"{library} nf4 4-bit, blocksize 64, double-quantized scales, compute dtype {short}"
    )
    assert type(model.lm_head) is nn.Linear and not quant.is_quantized(model.lm_head)  # the output head stays


def _parts():
    return [("self_attn", leaf) for leaf in LINEARS[:4]] + [("mlp", leaf) for leaf in LINEARS[4:]]


def test_dequantized_weight_is_within_nf4_error_of_the_original(kind):
    model = make_llama()
    original = linear_weights(model)
    for name in quantize_linears(model, kind, compute_dtype=torch.bfloat16):
        weight = original[name]
        restored = quant.dequantized_weight(model.get_submodule(name))
        assert restored.dtype == torch.float32 and restored.shape == weight.shape
        # NF4: each weight within about 0.14 of its 64-block's absmax (plus the error of the 8-bit block scale)
        blocks, restored_blocks = weight.reshape(-1, 64), restored.reshape(-1, 64)
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        assert ((restored_blocks - blocks).abs() <= 0.25 * absmax).all(), name
        assert (restored - weight).norm() <= 0.12 * weight.norm(), name
        assert not torch.equal(restored, weight)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_and_input_gradient_use_the_dequantized_weight(kind, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 8))
    quantize_linears(model, kind, compute_dtype=dtype)
    layer = model[0]
    weight, bias = quant.dequantized_weight(layer), layer.bias.float()
    x = torch.randn(5, 64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32  # computed in the compute dtype, returned in the input's
    expected = x.detach() @ weight.T + bias
    tolerance = {"atol": 0.05, "rtol": 0.02} if dtype == torch.bfloat16 else {"atol": 1e-4, "rtol": 1e-4}
    torch.testing.assert_close(y, expected, **tolerance)
    grad_out = torch.randn_like(y)
    y.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ weight, **tolerance)


def test_input_gradients_survive_an_eval_pass(kind):
    """Lightning validates (eval mode, no grad) before and between training steps; bitsandbytes 0.49+ would
    repack its CPU weights then into a layout without autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    quantize_linears(model, kind, compute_dtype=torch.bfloat16)
    weight = quant.dequantized_weight(model[0])
    model.eval()
    with torch.no_grad():
        model(torch.randn(3, 64))
    model.train()
    x = torch.randn(3, 64, requires_grad=True)
    model[0](x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert torch.equal(quant.dequantized_weight(model[0]), weight)


def test_dequantize_linear_gives_a_plain_frozen_linear(kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    quantize_linears(model, kind, compute_dtype=torch.bfloat16)
    layer = model[0].eval()
    plain = quant.dequantize_linear(layer)
    assert type(plain) is nn.Linear and plain.weight.dtype == torch.bfloat16 and not plain.training
    assert not plain.weight.requires_grad and not plain.bias.requires_grad
    assert torch.equal(plain.weight, quant.dequantized_weight(layer).to(torch.bfloat16))
    assert torch.equal(plain.bias, layer.bias.to(torch.bfloat16))
    full = quant.dequantize_linear(layer, dtype=torch.float32)
    assert full.weight.dtype == torch.float32 and torch.equal(full.weight, quant.dequantized_weight(layer))
    x = torch.randn(4, 64)
    torch.testing.assert_close(full(x), layer(x), atol=0.05, rtol=0.02)  # bf16 compute vs fp32


def test_moving_the_model_keeps_it_quantized(kind):
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    quantize_linears(model, kind, compute_dtype=torch.float32)
    weight = quant.dequantized_weight(model[0])
    model.to("cpu")
    assert quant.is_quantized(model[0]) and torch.equal(quant.dequantized_weight(model[0]), weight)


def test_skip_replaces_the_default_and_takes_whole_modules(kind):
    model = make_llama()
    names = quantize_linears(model, kind, skip=["mlp", "model.layers.0.self_attn.q_proj"])
    assert names == [
        *(f"model.layers.0.self_attn.{leaf}" for leaf in LINEARS[1:4]),
        *(f"model.layers.1.self_attn.{leaf}" for leaf in LINEARS[:4]),
        "lm_head",  # an explicit skip list replaces the default (the output head)
    ]
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_tied_weights_and_linear_subclasses_are_left_alone(kind):
    class Scaled(nn.Linear):
        pass

    first, second = nn.Linear(64, 64), nn.Linear(64, 64)
    second.weight = first.weight
    model = nn.Sequential(first, second, Scaled(64, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    assert quantize_linears(model, kind) == ["3"]


def test_lora_on_a_quantized_base_trains_and_merges(kind):
    torch.manual_seed(0)
    model = make_llama().train()
    quantize_linears(model, kind, compute_dtype=torch.float32)
    frozen = {n: quant.dequantized_weight(m) for n, m in model.named_modules() if quant.is_quantized(m)}
    report = inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(report.targets) == 14 and all(quant.is_quantized(model.get_submodule(n).base_layer) for n in frozen)
    adapters = list(adapter_parameters(model))
    assert adapters and all(p.dtype == torch.float32 for p in adapters)
    optimizer = torch.optim.AdamW(adapters, lr=1e-2)
    tokens = torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    for name, weight in frozen.items():  # the 4-bit base did not move
        assert torch.equal(quant.dequantized_weight(model.get_submodule(name).base_layer), weight)

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    with pytest.warns(UserWarning, match="dequantized"):
        merge_lora(model)
    assert not any(quant.is_quantized(m) for m in model.modules())
    assert all(type(model.get_submodule(n)) is nn.Linear for n in frozen)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tokens).logits, expected, atol=1e-4, rtol=1e-4)


def test_bad_kind_dtype_or_skip_leave_the_model_untouched():
    model = make_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"kind='nf4': must be one of 'bnb-nf4', 'torchao-nf4'"):
        quantize_linears(model, "nf4")
    with pytest.raises(ValueError, match=r"compute_dtype=torch\.float64: must be one of bfloat16, float16, float32"):
        quantize_linears(model, "bnb-nf4", compute_dtype=torch.float64)
    with pytest.raises(ValueError, match=r"compute_dtype='int8'"):
        quantize_linears(model, "torchao-nf4", compute_dtype="int8")
    with pytest.raises(TypeError, match="skip="):
        quantize_linears(model, "bnb-nf4", skip="lm_head")
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        quantize_linears({"not": "a model"}, "bnb-nf4")
    assert_same_state(before, model)


def test_skip_naming_no_module_and_nothing_left_are_errors(kind):
    model = make_llama()
    before = state(model)
    with pytest.raises(ValueError, match=r"skip: \['qproj'\] match no module"):
        quantize_linears(model, kind, skip=["q_proj", "qproj"])
    with pytest.raises(ValueError, match=r"no nn\.Linear layer left to quantize"):
        quantize_linears(model, kind, skip=["model", "lm_head"])
    assert_same_state(before, model)


@pytest.mark.parametrize("kind_name", quant.KINDS)
def test_a_missing_package_says_how_to_install_it(monkeypatch, kind_name):
    model = make_llama()
    before = state(model)
    package = PACKAGES[kind_name]
    for loaded in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, package, None)  # import now raises ImportError
    with pytest.raises(ImportError, match=rf"kind='{kind_name}' needs the {package} package.*lora-lightning\[quant\]"):
        quantize_linears(model, kind_name)
    assert_same_state(before, model)


def test_quantizing_twice_or_after_lora_is_refused(kind):
    model = make_llama()
    inject_lora(model, LoRAConfig(r=2, target_modules=["q_proj"]))
    before = state(model)
    with pytest.raises(ValueError, match="quantize the base first, then inject LoRA"):
        quantize_linears(model, kind)
    assert_same_state(before, model)
    again = make_llama()
    quantize_linears(again, kind)
    with pytest.raises(ValueError, match=r"no nn\.Linear layer left"):
        quantize_linears(again, kind)


def test_shapes_a_kind_cannot_hold_are_refused_by_name():
    pytest.importorskip("torchao")
    pytest.importorskip("bitsandbytes")
    model = nn.Sequential(nn.Linear(10, 6), nn.Linear(6, 64), nn.Linear(32, 64), nn.Linear(64, 1), nn.Linear(64, 2))
    before = state(model)
    with pytest.raises(ValueError, match=r"- 0: 6x10 = 60 weights, not a multiple of the NF4 blocksize 64") as err:
        quantize_linears(model, "torchao-nf4", skip=[])
    assert "- 1:" not in str(err.value) and "- 2:" not in str(err.value)
    with pytest.raises(ValueError, match="bitsandbytes on CPU needs in_features to be a multiple of 64") as err:
        quantize_linears(model, "bnb-nf4", skip=[])
    assert [line.split(":")[0] for line in str(err.value).splitlines()[1:]] == ["  - 0", "  - 1", "  - 2", "  - 3"]
    assert_same_state(before, model)
    assert quantize_linears(model, "bnb-nf4", skip=["0", "1", "2", "3"]) == ["4"]


def test_meta_weights_are_refused(kind):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 2))
    with pytest.raises(ValueError, match="0: its weight is on the meta device"):
        quantize_linears(model, kind)


def test_storage_counts_packed_weights_at_about_four_bits(kind):
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(256, 512))
    model[2].weight = model[0].weight  # tied: counted once, and never quantized
    assert quant.storage_bytes(model) == 4 * (2 * 512 * 256 + 512 + 256 + 512)
    assert quantize_linears(model, kind, compute_dtype=torch.bfloat16) == ["1"]
    rest = 4 * (512 * 256 + 512 + 512) + 2 * 256  # the tied fp32 weight, fp32 biases, the bf16 bias of "1"
    bits = 8 * (quant.storage_bytes(model) - rest) / (512 * 256)
    assert 4.0 < bits < 4.3  # 4-bit codes, an 8-bit scale per 64 weights, a few second-level scales


def test_reading_a_plain_layer_is_a_type_error():
    plain = nn.Linear(4, 4)
    assert not quant.is_quantized(plain) and not quant.is_quantized(nn.ReLU())
    for reader in (quant.dequantized_weight, quant.dequantize_linear, quant.compute_dtype, quant.describe):
        with pytest.raises(TypeError, match="Linear is not a 4-bit layer"):
            reader(plain)


def test_an_fp32_model_trains_adapters_in_the_compute_dtype_and_counts_unpacked_weights(kind):
    """The usual QLoRA setup: an fp32 model, 4-bit layers computing in bf16. Adapters take the compute dtype,
    their update joins the fp32 stream, and parameter counts stay those of the unquantized model."""
    model = make_llama().train()
    total = sum(p.numel() for p in model.parameters())
    quantize_linears(model, kind)  # compute dtype bf16
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    assert {p.dtype for p in adapter_parameters(model)} == {torch.bfloat16}
    assert param_summary(model).total == total + param_summary(model).adapter
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert loss.dtype == torch.float32
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in adapter_parameters(model))


def test_adapters_on_a_4bit_base_load_in_peft_and_back(kind, tmp_path):
    """PEFT as the oracle on the same 4-bit base: ours -> PEFT and PEFT -> ours give the same logits."""
    peft = pytest.importorskip("peft")
    tokens = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    noise = torch.Generator().manual_seed(3)

    def quantized() -> nn.Module:
        model = make_llama()
        quantize_linears(model, kind, compute_dtype=torch.float32)
        return model

    def perturb(params) -> None:
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn(p.shape, generator=noise) * 0.1)

    ours = quantized()
    with torch.no_grad():
        base_logits = ours(input_ids=tokens).logits
    inject_lora(ours, LoRAConfig(r=4, alpha=8))
    perturb(adapter_parameters(ours))
    save_adapter(ours, tmp_path / "ours")
    with torch.no_grad():
        expected = ours(input_ids=tokens).logits
        assert not torch.allclose(expected, base_logits, atol=1e-3)
        got = peft.PeftModel.from_pretrained(quantized(), tmp_path / "ours").eval()(input_ids=tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    theirs = peft.get_peft_model(quantized(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    perturb(p for n, p in theirs.named_parameters() if "lora_" in n)
    theirs.eval().save_pretrained(tmp_path / "theirs")
    mine = quantized()
    load_adapter(mine, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(mine(input_ids=tokens).logits, theirs(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)

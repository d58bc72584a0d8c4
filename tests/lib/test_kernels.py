"""lora_lightning.kernels and LoRAFinetuneCallback(kernels=...): argument checks, the pip line when Liger-Kernel is
missing, what gets patched and in which order, and the refusal of an adapted output head. Liger needs Triton and
CUDA, so these CPU tests stand a recording module in for it (the real one runs in tests/lib/test_gpu_fused.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, LoRALayer, apply_kernels, inject_lora
from lora_lightning.fused import install_fused_paths
from lora_lightning.kernels import check_kernels
from tests.helpers.models import LlamaModule, make_llama, make_trainer, token_data


@pytest.fixture
def fake_liger(monkeypatch):
    """A stand-in ``liger_kernel``: its Llama patch binds a recording forward to every RMSNorm and MLP."""
    calls: list[dict] = []

    def apply_liger_kernel_to_llama(rope=True, cross_entropy=False, fused_linear_cross_entropy=True, rms_norm=True,
                                    swiglu=True, model=None):  # fmt: skip
        calls.append({"fused_linear_cross_entropy": fused_linear_cross_entropy, "model": model, "rope": rope})
        base = getattr(model, model.base_model_prefix, model)
        for layer in base.layers:
            layer.mlp.forward = types.MethodType(type(layer.mlp).forward, layer.mlp)
            layer.mlp._get_name = lambda: "LigerSwiGLUMLP"
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.forward = types.MethodType(type(norm).forward, norm)
                norm._get_name = lambda: "LigerRMSNorm"

    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = {"llama": apply_liger_kernel_to_llama}
    transformers_module = types.ModuleType("liger_kernel.transformers")
    transformers_module.monkey_patch = monkey_patch
    package = types.ModuleType("liger_kernel")
    package.transformers = transformers_module
    for name, module in (
        ("liger_kernel", package),
        ("liger_kernel.transformers", transformers_module),
        ("liger_kernel.transformers.monkey_patch", monkey_patch),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    return calls


@pytest.fixture
def no_liger(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel", None)  # import liger_kernel... raises ImportError


@pytest.mark.parametrize("bad", ["triton", "", None, "Liger"])
def test_an_unknown_kernels_value_is_refused_naming_the_argument(bad):
    with pytest.raises(ValueError, match=r"LoRAFinetuneCallback\(kernels=.*'none' \(default\) or 'liger'"):
        LoRAFinetuneCallback(LoRAConfig(r=4), kernels=bad)
    with pytest.raises(ValueError, match=r"kernels=.* is not one of"):
        apply_kernels(make_llama(), bad)


def test_without_liger_the_callback_fails_at_setup_with_the_pip_line(tmp_path, no_liger):
    module = LlamaModule()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4), kernels="liger")])
    with pytest.raises(ImportError, match=r"pip install 'lora-lightning\[kernels\]'.*liger-kernel==0.8.5"):
        trainer.fit(module, token_data())
    assert not any(isinstance(m, LoRALayer) for m in module.modules())  # nothing was changed
    with pytest.raises(ImportError, match=r"liger-kernel==0\.8\.5"):
        check_kernels("liger")
    check_kernels("none")  # needs nothing


def test_apply_kernels_patches_the_hf_model_and_says_what(fake_liger):
    model = make_llama()
    report = apply_kernels(model, "liger")
    assert [call["model"] for call in fake_liger] == [model] and fake_liger[0]["fused_linear_cross_entropy"]
    kinds = report.patched[""]
    assert "LigerRMSNorm x4" in kinds and "LigerSwiGLUMLP x2" in kinds
    assert "fused linear cross-entropy (when called with labels=)" in kinds and "RoPE (apply_rotary_pos_emb)" in kinds
    assert str(report).startswith("kernels='liger' patched the model: LigerSwiGLUMLP x2, LigerRMSNorm x4")


def test_a_headless_model_gets_no_fused_loss(fake_liger):
    apply_kernels(torch.nn.ModuleDict({"backbone": make_llama().model}), "liger")
    assert fake_liger[0]["fused_linear_cross_entropy"] is False


@pytest.mark.parametrize("adapt_now", [True, False])
def test_an_adapted_output_head_is_refused_before_anything_changes(fake_liger, adapt_now):
    model = make_llama()
    if adapt_now:
        inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match=r"lm_head.*modules_to_save"):
        apply_kernels(model, "liger", adapting=[] if adapt_now else ["model.layers.0.self_attn.q_proj", "lm_head"])
    assert fake_liger == []


def test_kernels_go_in_before_the_fused_paths(fake_liger):
    model = make_llama()
    inject_lora(model, LoRAConfig(r=4))
    install_fused_paths(model)
    with pytest.raises(RuntimeError, match="before install_fused_paths"):
        apply_kernels(model, "liger")
    assert fake_liger == []


def test_models_liger_does_not_know_are_refused(fake_liger):
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"found \{'the model': 'gpt2'\}"):
        apply_kernels(gpt2, "liger")


def test_the_callback_patches_then_injects_then_fuses(tmp_path, fake_liger):
    module = LlamaModule()
    trainer = make_trainer(
        tmp_path, max_epochs=1, callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8), kernels="liger")]
    )
    trainer.fit(module, token_data())
    assert [call["model"] for call in fake_liger] == [module.model]
    assert any(isinstance(m, LoRALayer) for m in module.modules())


def test_the_callback_refuses_a_head_target_before_injecting(tmp_path, fake_liger):
    module = LlamaModule()
    config = LoRAConfig(r=4, target_modules=["q_proj", "lm_head"])
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[LoRAFinetuneCallback(config, kernels="liger")])
    with pytest.raises(ValueError, match="lm_head"):
        trainer.fit(module, token_data())
    assert fake_liger == [] and not any(isinstance(m, LoRALayer) for m in module.modules())

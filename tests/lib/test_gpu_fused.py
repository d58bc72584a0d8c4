"""The fused paths and Liger-Kernel on CUDA (run on the device machine; skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, adapter_parameters, apply_kernels, inject_lora
from lora_lightning.fused import _rerun, install_fused_paths
from tests.helpers.models import LlamaModule, make_trainer, tiny_llama_config, token_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
transformers = pytest.importorskip("transformers")


def llama(dtype: torch.dtype, kernels: str = "none", fused: bool = True, **config) -> torch.nn.Module:
    fields = dict(hidden_size=256, intermediate_size=704, num_attention_heads=8, num_key_value_heads=2, vocab_size=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(**(fields | config))).to("cuda", dtype).train()
    if kernels != "none":
        apply_kernels(model, kernels)
    inject_lora(model, LoRAConfig(r=16, alpha=32))
    with torch.no_grad():
        generator = torch.Generator(device="cuda").manual_seed(1)
        for param in adapter_parameters(model):
            param.copy_(torch.randn(param.shape, generator=generator, device="cuda") * 0.05)
    if fused:
        install_fused_paths(model)
    return model


def grads(model: torch.nn.Module, steps: int = 2) -> list[torch.Tensor]:
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(2)).cuda()
    for _ in range(steps):  # the first forward is where shared inputs are seen
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens, labels=tokens).loss.backward()
    return [p.grad.float() for p in adapter_parameters(model)]


def assert_close_in_norm(got: list[torch.Tensor], want: list[torch.Tensor], tolerance: float) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g - w).norm() <= tolerance * w.norm(), (g - w).norm() / w.norm()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_gradients_match_the_per_layer_path_on_cuda(dtype, tolerance):
    assert_close_in_norm(grads(llama(dtype)), grads(llama(dtype, fused=False)), tolerance)


def needs_liger():
    return pytest.importorskip("liger_kernel.transformers")


def test_liger_composes_with_the_fused_paths():
    needs_liger()
    fused_model = llama(torch.bfloat16, kernels="liger")
    mlp = fused_model.model.layers[0].mlp.__dict__["_lora_fused_paths"].mlp
    assert mlp.elementwise == "silu"  # its own kernels, not Liger's SwiGLU
    assert_close_in_norm(grads(fused_model), grads(llama(torch.bfloat16, kernels="liger", fused=False)), 3e-2)


def test_under_liger_the_nodes_keep_the_norms_inputs_instead_of_their_own():
    """Liger's RMSNorm keeps its input, so the fused nodes keep that and run the norm again in backward. The first
    block's norm reads the frozen embeddings' output, which needs no gradient: no node of the norm keeps it, so
    the node reading that norm keeps its own input. (Hugging Face's norm: tests/lib/test_fused.py, on the CPU.)"""
    needs_liger()
    model = llama(torch.bfloat16, kernels="liger")
    want = grads(llama(torch.bfloat16, kernels="liger", fused=False), steps=1)
    assert_close_in_norm(grads(model, steps=2), want, 3e-2)
    outputs = {}  # held, so that no saved tensor reuses their memory
    for name, module in model.named_modules():
        if name.endswith("layernorm"):
            module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out))
    saved = set()
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(2)).cuda()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t
    ):
        model(input_ids=tokens, labels=tokens).loss.backward()
    kept = {name for name, out in outputs.items() if out.untyped_storage().data_ptr() in saved}
    assert len(outputs) == 4 and kept == {"model.layers.0.input_layernorm"}


def test_under_liger_the_norms_run_again_as_one_kernel():
    needs_liger()
    model = llama(torch.bfloat16, kernels="liger", hidden_size=512)
    want = grads(llama(torch.bfloat16, kernels="liger", hidden_size=512, fused=False))
    assert_close_in_norm(grads(model), want, 3e-2)
    reruns = [rerun for rerun in model.__dict__["_lora_fused_paths"].producers._reruns.values() if rerun is not None]
    assert reruns and all(rerun.probed is not None for rerun in reruns)


@pytest.mark.parametrize(("width", "offset"), [(256, 0.0), (576, 0.0), (2048, 0.0), (3072, 1.0)])
def test_the_norm_kernel_gives_liger_s_rmsnorm_bits(width, offset):
    """The rerun kernel must give the norm's output bit for bit: the node's ``A`` gradients read it as the input."""
    needs_liger()
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    from lora_lightning import norm_triton

    norm = LigerRMSNorm(width, offset=offset).to("cuda", torch.bfloat16)
    generator = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=generator, device="cuda"))
    x = 8 * torch.randn(3, 1001, width, generator=generator, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(norm_triton.rms_norm(x, norm.weight, norm.variance_epsilon, offset), norm(x))
    # narrow norms are probed at 32768 rows too, where Liger reduces rows in blocks: the rerun is the kernel if
    # that gives the same bits
    many = 8 * torch.randn(32768, width, generator=generator, device="cuda", dtype=torch.bfloat16)
    same = torch.equal(norm_triton.rms_norm(many, norm.weight, norm.variance_epsilon, offset), norm(many))
    assert (_rerun(norm, x).probed is not None) == (width > 256 or same)


def test_the_rerun_kernel_reads_a_strided_weight_as_its_values():
    from lora_lightning import norm_triton

    x, weight = torch.randn(4, 100, device="cuda"), torch.randn(200, device="cuda")[::2]
    want = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * weight
    torch.testing.assert_close(norm_triton.rms_norm(x, weight, 1e-6), want)


def test_a_norm_that_keeps_its_input_with_other_bits_runs_its_own_forward_again():
    needs_liger()
    from liger_kernel.transformers.rms_norm import LigerRMSNorm

    norm = LigerRMSNorm(256, casting_mode="gemma").to("cuda", torch.bfloat16)  # the weight in fp32 too
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(4, 256, device="cuda", dtype=torch.bfloat16)
    assert _rerun(norm, x).probed is None


def test_liger_refuses_an_adapted_head():
    needs_liger()
    model = transformers.LlamaForCausalLM(tiny_llama_config()).cuda()
    inject_lora(model, LoRAConfig(r=4, target_modules=["q_proj", "lm_head"]))
    before = model.model.norm.__dict__.get("forward")
    with pytest.raises(ValueError, match="lm_head"):
        apply_kernels(model, "liger")
    assert model.model.norm.__dict__.get("forward") is before  # nothing patched


@pytest.mark.parametrize("kernels", ["none", "liger"])
def test_fit_on_gpu_with_the_fused_paths(tmp_path, kernels):
    if kernels == "liger":
        needs_liger()
    module = LlamaModule()
    trainer = make_trainer(
        tmp_path,
        accelerator="gpu",
        max_epochs=2,
        precision="bf16-true",
        callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8, dropout=0.05), kernels=kernels)],
    )
    trainer.fit(module, token_data())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in adapter_parameters(module))
    assert any(torch.count_nonzero(p) > 0 for p in adapter_parameters(module))


@pytest.mark.slow
def test_200_steps_of_a_smollm2_135m_shape_track_the_per_layer_path():
    """SmolLM2-135M's shape (30 layers, hidden 576, 9/3 heads, intermediate 1536), bf16, on a learnable token stream
    with fused AdamW (as the benchmark; it updates in place without moving version counters): the fused path's loss
    curve follows the per-layer path's within bf16 noise."""
    shape = dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=4096, max_position_embeddings=512,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(3)
    start = torch.randint(0, 4096, (64, 1), generator=generator)
    stream = (start + 7 * torch.arange(256)) % 4096  # the next token is the previous one plus 7
    curves = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(tiny_llama_config(**shape)).to("cuda", torch.bfloat16).train()
        inject_lora(model, LoRAConfig(r=16, alpha=32))
        if fused:
            install_fused_paths(model)
        optimizer = torch.optim.AdamW(adapter_parameters(model), lr=1e-3, fused=True)  # writes in place, unversioned
        losses = []
        for step in range(200):
            batch = stream[(8 * step) % 64 :][:8].cuda()
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    fused_curve, plain_curve = curves
    assert fused_curve[-20:].mean() < 0.7 * fused_curve[:5].mean()  # it learned
    assert abs(fused_curve[-20:].mean() - plain_curve[-20:].mean()) <= 0.05 * plain_curve[-20:].mean()
    assert (fused_curve - plain_curve).abs().mean() <= 0.05 * plain_curve.mean()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_a_compiled_model_runs_the_mlp_custom_op_with_the_per_layer_gradients(dtype, tolerance):
    model = llama(dtype)
    compiled = torch.compile(model)
    tokens = torch.randint(0, 512, (4, 128), generator=torch.Generator().manual_seed(2)).cuda()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        compiled(input_ids=tokens, labels=tokens).loss.backward()
    got = [p.grad.float() for p in adapter_parameters(model)]
    assert_close_in_norm(got, grads(llama(dtype, fused=False)), tolerance)


def test_a_compiled_mlp_gives_the_eager_node_s_output_and_gradients():
    """The custom op runs the node's Triton kernels: the compiled MLP gives the eager fused MLP's output and
    gradients."""
    model = llama(torch.float32)
    mlp = model.model.layers[0].mlp
    x = torch.randn(4, 64, 256, device="cuda", requires_grad=True)
    inputs = [x, *(p for p in mlp.parameters() if p.requires_grad)]
    want_y = mlp(x)
    want = torch.autograd.grad(want_y.square().sum(), inputs)
    y = torch.compile(mlp, fullgraph=True)(x)
    got = torch.autograd.grad(y.square().sum(), inputs)
    torch.testing.assert_close(y, want_y)
    assert_close_in_norm(list(got), list(want), 1e-5)

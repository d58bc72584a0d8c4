"""CUDA checks, run on the device machine (skipped where no GPU is present)."""

import pytest
import torch

from lora_lightning import AdapterSpec, LoRAConfig, LoRAFinetuneCallback, LoRALinear, adapter_parameters, inject_lora
from tests.helpers.models import LlamaModule, make_llama, make_trainer, token_data

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_path_matches_module_path_on_cuda_bf16(dropout):
    torch.manual_seed(0)
    base = torch.nn.Linear(256, 512, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, AdapterSpec(r=16, alpha=32, dropout=dropout))
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    x = torch.randn(4, 64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer.eval()  # dropout off: both paths compute the same function
    assert layer._fused_forward(x, "default") is not None  # the fused node applies
    fused = layer(x)
    fused.float().square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        t.grad = None
    reference = base(x) + layer.scaling * layer.lora_B["default"](layer.lora_A["default"](x))
    reference.float().square().sum().backward()
    torch.testing.assert_close(fused, reference, atol=2e-2, rtol=2e-2)
    for got, want in zip(
        grads, (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad), strict=True
    ):
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


def test_adapters_live_on_the_base_device_and_dtype():
    model = make_llama().to("cuda", torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4))
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for p in adapter_parameters(model))


@pytest.mark.parametrize("precision", ["bf16-true", "bf16-mixed"])
def test_fit_on_gpu(tmp_path, precision):
    module = LlamaModule()
    trainer = make_trainer(
        tmp_path,
        accelerator="gpu",
        max_epochs=3,
        precision=precision,
        callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8, dropout=0.05))],
    )
    trainer.fit(module, token_data())
    assert trainer.callback_metrics.get("train_loss") is None or torch.isfinite(trainer.callback_metrics["train_loss"])
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in adapter_parameters(module))
    assert any(
        torch.count_nonzero(layer.lora_B["default"].weight) > 0
        for layer in module.modules()
        if isinstance(layer, LoRALinear)
    )

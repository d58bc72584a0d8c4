"""The round-two reliability checks that need CUDA (run with ``pytest -m gpu tests/lib`` on the device machine;
skipped elsewhere): adapter bytes checked against the GPU's free memory, and an adapter of a bf16 CUDA model saved
and loaded through the concurrent-safe files. The CUDA dropout replay is in test_reliability_dropout.py."""

from __future__ import annotations

import pytest
import torch

from lora_lightning import LoRAConfig, TargetError, inject_lora, load_adapter, save_adapter
from lora_lightning.params import lora_layers
from lora_lightning.sizing import free_bytes
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.models import make_llama

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))


def test_adapters_larger_than_the_gpus_free_memory_are_refused_before_any_change():
    model = make_llama().to("cuda", torch.bfloat16)
    free = free_bytes(torch.device("cuda", torch.cuda.current_device()))
    assert 0 < free <= torch.cuda.get_device_properties(0).total_memory
    rank = free // (2 * 2 * 32) + 1  # A and B of one 32 -> 32 layer in bf16 already exceed what is free
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"the adapters need .* on cuda:\d, which has .* free"):
        inject_lora(model, LoRAConfig(r=rank, target_modules=["q_proj"]))
    assert_unchanged(model, before)


def test_a_cuda_bf16_adapter_round_trips_through_a_folder(tmp_path):
    model = make_llama().to("cuda", torch.bfloat16)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    perturb_adapters_(model).eval()
    with torch.no_grad():
        expected = model(input_ids=TOKENS.cuda()).logits
    save_adapter(model, tmp_path / "adapter")
    save_adapter(model, tmp_path / "adapter", overwrite=True)
    again = make_llama().to("cuda", torch.bfloat16).eval()
    load_adapter(again, tmp_path / "adapter")
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for _, la in lora_layers(again) for p in la.parameters())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=TOKENS.cuda()).logits, expected, rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]

"""Gradient checkpointing and torch.compile over LoRA layers."""

import pytest
import torch

from lora_lightning import LoRAConfig, adapter_parameters, inject_lora
from tests.helpers.models import make_llama


def adapter_grads(checkpointing: bool, reentrant: bool = False, dropout: float = 0.0) -> list[torch.Tensor]:
    model = make_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for param in adapter_parameters(model):
            param.normal_(std=0.1)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        if reentrant:  # reentrant checkpointing only sees gradients if its inputs require them
            model.enable_input_require_grads()
    tokens = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)  # the same dropout masks in every run
    model(input_ids=tokens, labels=tokens).loss.backward()
    return [p.grad for p in adapter_parameters(model)]


@pytest.mark.parametrize(("reentrant", "dropout"), [(False, 0.0), (True, 0.0), (False, 0.1)])
def test_gradient_checkpointing_reaches_the_adapters(reentrant, dropout):
    expected = adapter_grads(checkpointing=False, dropout=dropout)
    actual = adapter_grads(checkpointing=True, reentrant=reentrant, dropout=dropout)
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in actual)
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.slow
def test_a_lora_block_compiles_without_graph_breaks():
    model = make_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.05))
    block = model.model.layers[0].mlp
    with torch.no_grad():
        for param in adapter_parameters(block):
            param.normal_(std=0.1)
    x = torch.randn(2, 5, 32, requires_grad=True)
    block.eval()
    expected = block(x)
    compiled = torch.compile(block, fullgraph=True)  # fullgraph: any graph break raises
    actual = compiled(x)
    torch.testing.assert_close(actual, expected)
    actual.sum().backward()
    assert block.up_proj.lora_B["default"].weight.grad is not None

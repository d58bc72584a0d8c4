"""LoRA dropout in training, through the public layers only (whatever autograd node `LoRALinear` runs inside), on
CPU and, marked ``gpu``, on CUDA: the masks that backward uses are the ones forward drew, backward leaves the
random generator where forward left it also across chained layers, and eval draws nothing.

The masks are read from the outputs, not from the implementation: with ``A = B = I`` (``r = in = out``) the
adapter's share of the output is ``s * dropout(x)``, zero exactly where an input was dropped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import AdapterSpec, LoRALinear

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, cuda])]
P, SCALING, WIDTH = 0.5, 1.5, 64


def generator_state(device: str) -> torch.Tensor:
    return torch.cuda.get_rng_state() if device == "cuda" else torch.get_rng_state()


def identity_layer(device: str, seed: int = 0) -> LoRALinear:
    """A frozen WIDTH x WIDTH base with an adapter of A = B = I, alpha chosen for SCALING, dropout P."""
    torch.manual_seed(seed)
    base = nn.Linear(WIDTH, WIDTH, device=device).requires_grad_(False)
    layer = LoRALinear(base, AdapterSpec(r=WIDTH, alpha=SCALING * WIDTH, dropout=P))
    with torch.no_grad():
        for factor in layer.factors("default"):
            factor.copy_(torch.eye(WIDTH))
    return layer.train()


def inputs(device: str) -> torch.Tensor:
    """Entries at least 0.5 away from 0, so a kept entry (x / (1 - P)) cannot pass for a dropped one (0)."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 8, WIDTH, generator=generator) + 0.5
    signs = torch.randint(0, 2, x.shape, generator=generator) * 2 - 1
    return (x * signs).to(device).requires_grad_(True)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_uses_the_dropout_masks_forward_drew(device):
    """The layer's gradients (x, A, B) equal autograd's through ``base(x) + s * (m * x / (1 - p)) A^T B^T`` with
    the mask ``m`` that forward's output shows."""
    layer = identity_layer(device)
    x = inputs(device)
    out = layer(x)
    with torch.no_grad():
        dropped_x = (out - layer.base_layer(x)) / SCALING
    kept = dropped_x.abs() > 0.25
    assert 0.3 < kept.float().mean().item() < 0.7, "dropout with p=0.5 should keep about half"
    torch.testing.assert_close(dropped_x, torch.where(kept, x / (1 - P), 0.0), rtol=1e-5, atol=1e-5)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(device)
    (out * weights).sum().backward()

    a, b = (factor.detach().clone().requires_grad_(True) for factor in layer.factors("default"))
    x_ref = x.detach().clone().requires_grad_(True)
    reference = layer.base_layer(x_ref) + SCALING * ((x_ref * kept / (1 - P)) @ a.T) @ b.T
    (reference * weights).sum().backward()
    got = (x.grad, *(factor.grad for factor in layer.factors("default")))
    for name, mine, expected in zip(("x", "A", "B"), got, (x_ref.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(mine, expected, rtol=1e-5, atol=1e-4, msg=f"the gradient of {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_of_chained_layers_leaves_the_generator_where_forward_left_it(device):
    """With one layer, a backward that replays its mask and does not restore the generator ends where forward
    ended anyway (it drew the same numbers again); with two chained layers it does not."""
    first, second = identity_layer(device, seed=0), identity_layer(device, seed=1)
    x = inputs(device)
    out = second(first(x))
    after_forward = generator_state(device)
    out.square().sum().backward()
    assert torch.equal(generator_state(device), after_forward)
    assert first.factors("default")[0].grad is not None and x.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_eval_turns_dropout_off_and_draws_nothing(device):
    layer = identity_layer(device).eval()
    x = inputs(device)
    before = generator_state(device)
    out = layer(x)
    assert torch.equal(generator_state(device), before), "eval drew random numbers"
    with torch.no_grad():
        torch.testing.assert_close(out, layer.base_layer(x) + SCALING * x, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(layer.train()(x), out), "the control: training mode does drop"

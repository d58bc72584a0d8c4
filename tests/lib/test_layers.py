import pytest
import torch
from torch import nn

from lora_lightning import AdapterSpec, LoRALinear
from lora_lightning.functional import lora_linear
from lora_lightning.layers import lora_layer_type


def make_layer(dtype=torch.float32, **kwargs) -> LoRALinear:
    torch.manual_seed(0)
    spec = AdapterSpec(r=kwargs.pop("r", 4), alpha=kwargs.pop("alpha", 8), **kwargs)
    return LoRALinear(nn.Linear(12, 20, dtype=dtype), spec)


def test_wraps_base_without_copying_and_starts_as_the_identity_update():
    base = nn.Linear(12, 20)
    x = torch.randn(3, 5, 12)
    expected = base(x)
    layer = LoRALinear(base, AdapterSpec(r=4, alpha=8))
    assert layer.base_layer is base and layer.base_layer.weight is base.weight
    assert torch.equal(layer(x), expected)  # B = 0: bit for bit
    assert (
        torch.count_nonzero(layer.lora_A["default"].weight) > 0
        and torch.count_nonzero(layer.lora_B["default"].weight) == 0
    )
    assert layer.lora_A["default"].weight.shape == (4, 12) and layer.lora_B["default"].weight.shape == (20, 4)


def test_forward_is_base_plus_scaled_low_rank_update():
    layer = make_layer()
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(7, 12)
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias
    expected = expected + 2.0 * (x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T)
    torch.testing.assert_close(layer(x), expected)


class ColumnMajorLinear(nn.Linear):
    """A linear layer whose output has its first two dimensions stored swapped (not contiguous)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight, self.bias).transpose(0, 1).contiguous().transpose(0, 1)


def test_a_base_with_a_non_contiguous_output_gets_the_update_too():
    torch.manual_seed(0)
    layer = LoRALinear(ColumnMajorLinear(12, 20), AdapterSpec(r=4, alpha=8))
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(3, 7, 12)
    expected = x @ layer.base_layer.weight.T + layer.base_layer.bias
    expected = expected + 2.0 * (x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scaling():
    assert make_layer(r=9, alpha=6, use_rslora=True).scaling == pytest.approx(2.0)


def test_gradients_reach_only_the_adapters_when_base_is_frozen():
    layer = make_layer()
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight)
    layer(torch.randn(4, 12)).sum().backward()
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None
    assert layer.base_layer.weight.grad is None


def test_dropout_only_on_the_adapter_branch():
    layer = make_layer(dropout=0.5)
    x = torch.randn(64, 12)
    layer.train()
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0, so dropout cannot show
    nn.init.normal_(layer.lora_B["default"].weight)
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert isinstance(make_layer(dropout=0.0).lora_dropout["default"], nn.Identity)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_adapters_take_the_base_dtype(dtype):
    layer = make_layer(dtype=dtype)
    assert layer.lora_A["default"].weight.dtype == dtype and layer.lora_B["default"].weight.dtype == dtype


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_merge_and_unmerge_reproduce_the_unmerged_output(dtype, tolerance):
    layer = make_layer(dtype=dtype)
    nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    original_weight = layer.base_layer.weight.detach().clone()
    x = torch.randn(5, 12, dtype=dtype)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(layer.base_layer(x), unmerged, atol=tolerance, rtol=tolerance)
    layer.unmerge()
    torch.testing.assert_close(layer.base_layer.weight, original_weight, atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(layer(x), unmerged, atol=tolerance, rtol=tolerance)


def test_merge_twice_and_unmerge_unmerged_raise():
    layer = make_layer()
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


def test_builds_on_the_meta_device():
    with torch.device("meta"):
        base = nn.Linear(4096, 4096)
    layer = LoRALinear(base, AdapterSpec(r=16, alpha=32))
    assert layer.lora_A["default"].weight.is_meta and layer.lora_B["default"].weight.is_meta


def fused_inputs(dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    weight, bias = torch.randn(5, 6, dtype=dtype), torch.randn(5, dtype=dtype)
    lora_a = torch.randn(2, 6, dtype=dtype, requires_grad=True)
    lora_b = torch.randn(5, 2, dtype=dtype, requires_grad=True)
    return x, weight, bias, lora_a, lora_b


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_function_gradients_match_finite_differences(dropout):
    x, weight, bias, lora_a, lora_b = fused_inputs()

    def apply(x, lora_a, lora_b):
        torch.manual_seed(1234)  # the same mask in every evaluation gradcheck makes
        return lora_linear(x, weight, bias, lora_a, lora_b, 1.5, dropout)

    assert torch.autograd.gradcheck(apply, (x, lora_a, lora_b))


def test_fused_path_equals_the_module_path():
    layer = make_layer(dtype=torch.float64)
    layer.base_layer.requires_grad_(False)
    nn.init.normal_(layer.lora_B["default"].weight)
    x = torch.randn(4, 3, 12, dtype=torch.float64, requires_grad=True)
    assert layer._fused_forward(x, "default") is not None  # the fused node applies
    fused = layer(x)
    fused.square().sum().backward()
    fused_grads = [t.grad.clone() for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight)]
    for t in (x, layer.lora_A["default"].weight, layer.lora_B["default"].weight):
        t.grad = None
    reference = layer.base_layer(x) + layer.scaling * layer.lora_B["default"](layer.lora_A["default"](x))
    reference.square().sum().backward()
    torch.testing.assert_close(fused, reference)
    for got, want in zip(
        fused_grads, (x.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_fused_dropout_is_reproducible_and_leaves_the_generator_where_forward_left_it():
    x, weight, bias, lora_a, lora_b = fused_inputs()
    torch.manual_seed(7)
    kept = lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.5)
    after_forward = torch.get_rng_state()
    kept.sum().backward()  # applies the mask forward drew
    assert torch.equal(torch.get_rng_state(), after_forward)
    torch.manual_seed(7)
    assert torch.equal(lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.5), kept)
    assert not torch.equal(lora_linear(x, weight, bias, lora_a, lora_b, 1.0, 0.5), kept)


def test_fused_dropout_statistics():
    ones = torch.ones(20000, 1, dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    dropped = lora_linear(ones, torch.zeros(1, 1, dtype=torch.float64), None, one, one, 1.0, 0.25)
    assert set(dropped.unique().tolist()) <= {0.0, 1 / 0.75}
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv"])
def test_dora_keeps_a_bf16_layer_in_bf16(kind):
    """DoRA's weight norm is computed in fp32; its scale must not promote a bf16 layer's output to fp32."""
    base, x = {
        "linear": (nn.Linear(12, 20), torch.randn(3, 12)),
        "embedding": (nn.Embedding(30, 20), torch.randint(0, 30, (3, 5))),
        "conv": (nn.Conv1d(12, 20, 3), torch.randn(3, 12, 9)),
    }[kind]
    base = base.to(torch.bfloat16)
    layer = lora_layer_type(base)(base, AdapterSpec(r=4, alpha=8, use_dora=True))
    out = layer(x.to(torch.bfloat16) if x.is_floating_point() else x)
    assert out.dtype == torch.bfloat16

"""The Triton kernels of the fused nodes against PyTorch: the dropout products of lora_lightning.dropout_triton with
the masks they draw, the mask's distribution, the fused nodes' dropout on CUDA, and the SiLU gate of
lora_lightning.gate_triton (run on the device machine; skipped where no GPU is present)."""

from __future__ import annotations

import pytest
import torch

from lora_lightning.functional import LinearOperands, lora_gated_mlp, lora_shared_input

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
kernels = pytest.importorskip("lora_lightning.dropout_triton", exc_type=ImportError)
gate_kernels = pytest.importorskip("lora_lightning.gate_triton", exc_type=ImportError)


def unpacked(bits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``[n, k]`` keep mask that the bytes ``bits`` hold (bit ``j % 8`` of byte ``j // 8``)."""
    shifts = torch.arange(8, device=bits.device)
    return ((bits[..., None].long() >> shifts) & 1).flatten(-2)[..., :k].bool()


def mask(n: int, k: int, seed: int, p: float) -> torch.Tensor:
    """The keep mask the kernels draw for an ``[n, k]`` input under ``seed``, from the bits forward writes."""
    _, bits = kernels.dropped_linear(torch.zeros(n, k, device="cuda"), torch.zeros(1, k, device="cuda"), seed, p)
    assert bits.shape == (n, (k + 7) // 8) and bits.dtype == torch.uint8
    return unpacked(bits, k)


SEED = (1 << 40) + 12345


@pytest.mark.parametrize(("n", "k", "r"), [(300, 203, 1), (256, 2048, 16), (129, 8192, 48)])
def test_the_three_products_equal_pytorch_with_the_kernels_mask(n, k, r):
    p = 0.3
    generator = torch.Generator(device="cuda").manual_seed(0)
    x, gh = (torch.randn(n, w, device="cuda", generator=generator) for w in (k, r))
    a = torch.randn(r, k, device="cuda", generator=generator) / k**0.5
    gx = torch.randn(n, k, device="cuda", generator=generator)
    h, bits = kernels.dropped_linear(x, a, SEED, p)
    keep = unpacked(bits, k)  # the mask forward applied, as backward reads it
    assert torch.equal(keep, mask(n, k, SEED, p))  # a function of the seed and the position alone
    dropped = x * keep / (1 - p)
    torch.testing.assert_close(h, dropped @ a.t(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kernels.grad_factor(gh, x, bits, p), gh.t() @ dropped, rtol=1e-4, atol=1e-3)
    want = gx + (gh @ a) * keep / (1 - p)
    torch.testing.assert_close(kernels.add_dropped_grad_(gx.clone(), gh, a, bits, p), want, rtol=1e-4, atol=1e-4)


def test_the_mask_does_not_depend_on_the_input_s_layout_and_bf16_accumulates_in_fp32():
    p, n, k = 0.1, 200, 300
    x = torch.randn(k, n, device="cuda").t()  # column-major rows
    a = torch.randn(16, k, device="cuda")
    want = (x * mask(n, k, SEED, p) / (1 - p)) @ a.t()
    torch.testing.assert_close(kernels.dropped_linear(x, a, SEED, p)[0], want, rtol=1e-4, atol=1e-4)
    half = kernels.dropped_linear(x.bfloat16(), a.bfloat16(), SEED, p)[0].float()
    assert (half - want).norm() <= 1e-2 * want.norm()


def test_a_column_major_input_past_2_to_the_31_elements_is_addressed_in_64_bits():
    # element (i, j) of a column-major [n, k] tensor lies j * n elements in: past 2^31 for the last fifth of columns
    p, n, k, r = 0.1, 5 * 2**16, 8192, 16
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=generator).t()
    a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16, generator=generator) / k**0.5
    gh = torch.randn(n, r, device="cuda", dtype=torch.bfloat16, generator=generator)
    h, bits = kernels.dropped_linear(x, a, SEED, p)
    last = slice(n - 64, n)
    dropped_last = x[last].float() * unpacked(bits[last], k) / (1 - p)
    want = dropped_last @ a.float().t()
    assert (h[last].float() - want).norm() <= 1e-2 * want.norm()
    blocks = [slice(i, i + 2**15) for i in range(0, n, 2**15)]  # gh^T d(x), a block of rows at a time
    want = sum(gh[b].float().t() @ (x[b].float() * unpacked(bits[b], k)) for b in blocks) / (1 - p)
    assert (kernels.grad_factor(gh, x, bits, p) - want).norm() <= 1e-2 * want.norm()
    gx = torch.zeros(k, n, device="cuda", dtype=torch.bfloat16).t()
    kernels.add_dropped_grad_(gx, gh, a, bits, p)
    want = (gh[last].float() @ a.float()) * unpacked(bits[last], k) / (1 - p)
    assert (gx[last].float() - want).norm() <= 1e-2 * want.norm()


def test_the_mask_keeps_each_element_with_probability_1_minus_p_independently():
    p, n, k = 0.05, 1024, 1024
    keep = mask(n, k, SEED, p).float()
    total = n * k
    assert abs(keep.mean().item() - (1 - p)) < 5 * (p * (1 - p) / total) ** 0.5
    # neighbours (within a group of eight columns, and across rows) are uncorrelated
    for a, b in ((keep[:, :-1], keep[:, 1:]), (keep[:-1], keep[1:])):
        correlation = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(correlation.item()) < 5 / total**0.5
    assert not torch.equal(mask(n, k, SEED + 1, p), keep.bool())
    assert torch.equal(mask(n, k, SEED, p), keep.bool())


def operands(shapes: list[tuple[int, int]], p: float) -> list[LinearOperands]:
    generator = torch.Generator(device="cuda").manual_seed(3)
    return [
        LinearOperands(
            torch.randn(o, i, device="cuda", generator=generator) / i**0.5,
            None,
            (torch.randn(8, i, device="cuda", generator=generator) / i**0.5).requires_grad_(),
            (torch.randn(o, 8, device="cuda", generator=generator) * 0.1).requires_grad_(),
            2.0,
            p,
        )
        for i, o in shapes
    ]


def seeds(count: int, start: int) -> list[int]:
    """The kernel seeds the nodes draw from the CPU generator seeded with ``start``, in call order."""
    torch.manual_seed(start)
    return [int(torch.randint(1 << 32, 1 << 62, ())) for _ in range(count)]


def test_the_gated_mlp_node_on_cuda_gives_the_gradients_of_the_masks_it_drew():
    """Forward draws one seed per dropped input from the CPU generator; backward draws none and applies the same
    masks: the gradients equal plain autograd's with those masks, and the CUDA generator is untouched."""
    p = 0.1
    layers = operands([(64, 96), (64, 96), (96, 64)], p)
    leaf = torch.randn(4, 32, 72, device="cuda", requires_grad=True)
    x = leaf[..., 3:67]  # a strided input
    act = torch.nn.SiLU()
    torch.manual_seed(11)
    cuda_state = torch.cuda.get_rng_state()
    y = lora_gated_mlp(x, act, *layers)
    after_forward = torch.get_rng_state()
    factors = [leaf, *(t for layer in layers for t in (layer.lora_a, layer.lora_b))]
    got = torch.autograd.grad(y.square().sum(), factors)
    assert torch.equal(torch.get_rng_state(), after_forward) and torch.equal(torch.cuda.get_rng_state(), cuda_state)

    seed_x, seed_p = seeds(2, 11)
    (w_g, _, a_g, b_g, s, _), (w_u, _, a_u, b_u, _, _), (w_d, _, a_d, b_d, _, _) = layers
    dropped = x * mask(128, 64, seed_x, p).view(x.shape) / (1 - p)
    gate = x @ w_g.t() + s * (dropped @ a_g.t()) @ b_g.t()
    up = x @ w_u.t() + s * (dropped @ a_u.t()) @ b_u.t()
    product = act(gate) * up
    dropped_product = product * mask(128, 96, seed_p, p).view(product.shape) / (1 - p)
    want_y = product @ w_d.t() + s * (dropped_product @ a_d.t()) @ b_d.t()
    want = torch.autograd.grad(want_y.square().sum(), factors)
    torch.testing.assert_close(y, want_y, rtol=1e-4, atol=1e-4)
    for g, w in zip(got, want, strict=True):
        assert (g - w).norm() <= 1e-4 * w.norm()


def test_the_shared_input_node_on_cuda_gives_the_gradients_of_its_one_mask():
    p = 0.2
    layers = operands([(64, 64), (64, 32)], p)
    x = torch.randn(2, 50, 64, device="cuda", requires_grad=True)
    torch.manual_seed(5)
    q, k = lora_shared_input(x, layers)
    factors = [x, *(t for layer in layers for t in (layer.lora_a, layer.lora_b))]
    got = torch.autograd.grad(q.square().sum() + k.sum(), factors)
    (seed,) = seeds(1, 5)
    dropped = x * mask(100, 64, seed, p).view(x.shape) / (1 - p)
    want_q, want_k = (x @ w.t() + s * (dropped @ a.t()) @ b.t() for w, _, a, b, s, _ in layers)
    want = torch.autograd.grad(want_q.square().sum() + want_k.sum(), factors)
    for g, w in zip(got, want, strict=True):
        assert (g - w).norm() <= 1e-4 * w.norm()


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_the_silu_gate_kernel_equals_pytorch_s_silu_times_up(dtype, tolerance):
    """Its backward: test_the_silu_gate_backward_gives_the_adapter_gradients_in_the_same_pass."""
    generator = torch.Generator(device="cuda").manual_seed(4)
    gate, up = (torch.randn(37, 1001, device="cuda", generator=generator) * 4 for _ in range(2))
    want = torch.nn.functional.silu(gate) * up
    strided = torch.stack([gate, gate], dim=-1).to(dtype)[..., 0]  # a strided input works too
    got = gate_kernels.silu_mul(strided, up.to(dtype))
    assert got.dtype == dtype and (got.float() - want).norm() <= tolerance * want.norm()


@pytest.mark.parametrize(
    ("n", "k", "ranks", "p", "dtype", "tolerance"),
    [
        (8192, 8192, (16, 16, 16), 0.0, torch.bfloat16, 1e-2),  # the benchmark's Llama-1B MLP
        (300, 1001, (16, 16, 16), 0.0, torch.float32, 1e-5),
        (257, 704, (8, 4, 12), 0.1, torch.float32, 1e-5),
        (130, 96, (100, 16, 40), 0.0, torch.float32, 1e-5),
        (64, 256, (64, 64, 64), 0.3, torch.bfloat16, 1e-2),
    ],
)
def test_the_silu_gate_backward_gives_the_adapter_gradients_in_the_same_pass(n, k, ranks, p, dtype, tolerance):
    """gG, gU, and gA_d = gh_d^T d(P), gB_g = s_g gG^T h_g, gB_u = s_u gU^T h_u, against PyTorch on the kernel's
    mask (with dropout the kernel is given g W_d and adds d'(gh_d A_d) to make gP); in bf16 against float64
    products of the same bf16 inputs."""
    r_d, r_g, r_u = ranks
    generator = torch.Generator(device="cuda").manual_seed(6)
    gate, up, grad = (torch.randn(n, k, device="cuda", generator=generator).to(dtype) for _ in range(3))
    gh_d = torch.randn(n, r_d, device="cuda", generator=generator).to(dtype)
    h_gu = torch.randn(n, r_g + r_u, device="cuda", generator=generator).to(dtype)
    a_d = torch.randn(r_d, k, device="cuda", generator=generator).to(dtype)
    bits = kernels.dropped_linear(gate, a_d, SEED, p)[1] if p else None  # the mask of SEED, as forward writes it
    got = gate_kernels.silu_mul_backward_factors(gate, up, grad, gh_d, a_d, h_gu, r_g, (0.5, 2.0), bits, p)
    a, b, d = gate.double(), up.double(), grad.double()
    silu = torch.nn.functional.silu(a)
    product = silu * b
    if p:
        keep = mask(n, k, SEED, p).double() / (1 - p)
        product = product * keep
        d = d + (gh_d.double() @ a_d.double()) * keep
    grad_up = d * silu
    grad_gate = d * b * torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a)))
    want = (
        grad_gate,
        grad_up,
        gh_d.double().t() @ product,
        0.5 * grad_gate.t() @ h_gu[:, :r_g].double(),
        2.0 * grad_up.t() @ h_gu[:, r_g:].double(),
    )
    for g, w, kind in zip(got, want, [dtype, dtype, torch.float32, torch.float32, torch.float32], strict=True):
        assert g.dtype == kind and g.shape == w.shape  # the factors' gradients: fp32 sums (autograd casts them)
        assert (g.double() - w).norm() <= tolerance * w.norm()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_silu_gate_with_a_dropped_linear_equals_the_two_kernels_it_joins(dtype):
    generator = torch.Generator(device="cuda").manual_seed(7)
    gate, up = (torch.randn(300, 1000, device="cuda", generator=generator).to(dtype) for _ in range(2))
    a = (torch.randn(16, 1000, device="cuda", generator=generator) / 30).to(dtype)
    product, h, bits = gate_kernels.silu_mul_dropped_linear(gate, up, a, SEED, 0.1)
    want_product = gate_kernels.silu_mul(gate, up)
    assert torch.equal(product, want_product)
    want_h, want_bits = kernels.dropped_linear(want_product, a, SEED, 0.1)
    assert torch.equal(bits, want_bits)
    torch.testing.assert_close(h, want_h)

"""The fused autograd nodes of lora_lightning.functional against plain autograd: float64 gradcheck, the same
gradients as the module path, and what their dropout is (one mask per shared input, drawn in forward and kept for
backward)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning.functional import (
    InputProducer,
    LinearOperands,
    MLPBuffers,
    lora_gated_mlp,
    lora_gated_mlp_op,
    lora_linear,
    lora_shared_input,
)

DTYPE = torch.float64


def operands(n_in: int, n_out: int, r: int, scaling: float, dropout: float, seed: int, bias: bool = True) -> list:
    """``[W, b, A, B]`` (A and B requiring grad) and the scaling and dropout of one layer."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=g, dtype=DTYPE) / n_in**0.5
    b = torch.randn(n_out, generator=g, dtype=DTYPE) if bias else None
    a = (torch.randn(r, n_in, generator=g, dtype=DTYPE) / n_in**0.5).requires_grad_()
    lora_b = (torch.randn(n_out, r, generator=g, dtype=DTYPE) * 0.5).requires_grad_()
    return [weight, b, a, lora_b, scaling, dropout]


def reference_linear(x, weight, bias, a, lora_b, scaling, mask=None, p=0.0):
    dropped = x if mask is None else x * mask / (1 - p)
    return F.linear(x, weight, bias) + scaling * (dropped @ a.t()) @ lora_b.t()


def seeded(fn, seed: int = 7):
    """``fn`` made deterministic: the CPU generator is reset before every call (gradcheck calls it many times)."""

    def call(*args):
        torch.manual_seed(seed)
        return fn(*args)

    return call


def test_gradcheck_single_layer_with_dropout():
    x = torch.randn(2, 3, 5, dtype=DTYPE, requires_grad=True)
    w, b, a, lora_b, s, p = operands(5, 4, 2, 1.5, 0.3, seed=0)
    assert torch.autograd.gradcheck(seeded(lambda x, a, lb: lora_linear(x, w, b, a, lb, s, p)), (x, a, lora_b))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradcheck_shared_input(dropout):
    x = torch.randn(2, 3, 6, dtype=DTYPE, requires_grad=True)
    layers = [operands(6, n_out, r, s, dropout, seed=i) for i, (n_out, r, s) in enumerate([(6, 2, 2.0), (3, 3, 0.5)])]
    factors = [t for layer in layers for t in layer[2:4]]

    def shared(x, *factors):
        ops = [
            LinearOperands(w, b, fa, fb, s, p)
            for (w, b, _, _, s, p), fa, fb in zip(layers, factors[::2], factors[1::2], strict=True)
        ]
        return lora_shared_input(x, ops)

    assert torch.autograd.gradcheck(seeded(shared), (x, *factors))


@pytest.mark.parametrize("elementwise", ["torch", "silu"])
@pytest.mark.parametrize(("dropout", "down_dropout"), [(0.0, 0.0), (0.3, 0.2)])
def test_gradcheck_gated_mlp(dropout, down_dropout, elementwise):
    x = torch.randn(2, 3, 5, dtype=DTYPE, requires_grad=True)
    specs = [(5, 7, 2, 2.0, dropout), (5, 7, 3, 0.5, dropout), (7, 5, 2, 1.0, down_dropout)]
    layers = [operands(*spec, seed=i) for i, spec in enumerate(specs)]
    factors = [t for layer in layers for t in layer[2:4]]

    def mlp(x, *factors):
        ops = [
            LinearOperands(w, b, fa, fb, s, p)
            for (w, b, _, _, s, p), fa, fb in zip(layers, factors[::2], factors[1::2], strict=True)
        ]
        return lora_gated_mlp(x, nn.SiLU(), *ops, elementwise=elementwise)

    assert torch.autograd.gradcheck(seeded(mlp), (x, *factors))


def test_gated_mlp_takes_any_activation_module():
    x = torch.randn(2, 4, 5, dtype=DTYPE, requires_grad=True)
    layers = [
        operands(*spec, seed=i) for i, spec in enumerate([(5, 6, 2, 2.0, 0), (5, 6, 2, 2.0, 0), (6, 5, 2, 2.0, 0)])
    ]
    ops = [LinearOperands(*layer) for layer in layers]
    act = nn.GELU(approximate="tanh")
    fused = lora_gated_mlp(x, act, *ops)
    gate, up = (reference_linear(x, *layer[:5]) for layer in layers[:2])
    want = reference_linear(act(gate) * up, *layers[2][:5])
    torch.testing.assert_close(fused, want)
    grads = torch.autograd.grad(fused.square().sum(), [x, *(t for layer in layers for t in layer[2:4])])
    wants = torch.autograd.grad(want.square().sum(), [x, *(t for layer in layers for t in layer[2:4])])
    for got, expected in zip(grads, wants, strict=True):
        torch.testing.assert_close(got, expected)


def test_shared_input_without_a_gradient_for_one_output():
    """An output nobody uses gets no gradient; the others' gradients are unchanged."""
    x = torch.randn(4, 6, dtype=DTYPE, requires_grad=True)
    layers = [operands(6, 5, 2, 2.0, 0.0, seed=i) for i in range(3)]
    outs = lora_shared_input(x, [LinearOperands(*layer) for layer in layers])
    (outs[0].sum() + outs[2].square().sum()).backward()
    want = reference_linear(x, *layers[0][:5]).sum() + reference_linear(x, *layers[2][:5]).square().sum()
    factors = [t for layer in layers for t in layer[2:4]]
    got = [x.grad, *(t.grad for t in factors)]
    expected = torch.autograd.grad(want, [x, *factors], allow_unused=True)
    assert got[3] is None and got[4] is None  # the unused layer's A and B
    for g, e in zip(got, expected, strict=True):
        if e is not None:
            torch.testing.assert_close(g, e)


def test_one_mask_per_shared_input_with_peft_s_marginal_distribution():
    """With ``A = I`` the node's ``h`` is ``d(x)`` itself: every layer of the input sees the same mask, kept entries
    are scaled by 1/(1-p), and about a fraction p is dropped (PEFT's marginal per adapter)."""
    p, n = 0.25, 64
    x = torch.rand(512, n, dtype=DTYPE) + 0.5  # no zeros, so a zero in d(x) is a dropped entry
    eye = torch.eye(n, dtype=DTYPE)
    layers = [LinearOperands(torch.zeros(n, n, dtype=DTYPE), None, eye, eye, 1.0, p) for _ in range(2)]
    torch.manual_seed(0)
    first, second = lora_shared_input(x, layers)
    torch.testing.assert_close(first, second)  # one mask for both layers
    kept = first != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 0.01
    torch.testing.assert_close(first[kept], (x / (1 - p))[kept])


@pytest.mark.parametrize("dropout", [0.2])
@pytest.mark.parametrize("strided", [False, True])
def test_backward_applies_the_forward_masks_and_leaves_the_generator_where_forward_left_it(dropout, strided):
    """Two chained fused MLPs with dropout: the gradients equal autograd's over the very masks forward drew, and
    backward leaves the default generator where forward left it; also for an input that is a strided view."""
    leaf = torch.randn(3, 4, 7 if strided else 5, dtype=DTYPE, requires_grad=True)
    x = leaf[..., 1:6] if strided else leaf
    blocks = [
        [
            operands(*spec, seed=10 * k + i)
            for i, spec in enumerate([(5, 7, 2, 2.0, dropout)] * 2 + [(7, 5, 2, 1.0, dropout)])
        ]
        for k in range(2)
    ]
    act = nn.SiLU()
    torch.manual_seed(3)
    start = torch.get_rng_state()
    y = x
    for layers in blocks:
        y = lora_gated_mlp(y, act, *(LinearOperands(*layer) for layer in layers))
    after_forward = torch.get_rng_state()
    factors = [t for layers in blocks for layer in layers for t in layer[2:4]]
    got = torch.autograd.grad(y.square().sum(), [leaf, *factors])
    assert torch.equal(torch.get_rng_state(), after_forward)

    torch.set_rng_state(start)  # the reference draws the same masks in the same order
    y = x
    for gate, up, down in blocks:
        mask = torch.native_dropout(y.reshape(-1, 5), dropout, True)[1].view(y.shape)
        g = reference_linear(y, *gate[:5], mask=mask, p=dropout)
        u = reference_linear(y, *up[:5], mask=mask, p=dropout)
        product = act(g) * u
        mask_p = torch.native_dropout(product.reshape(-1, 7), dropout, True)[1].view(product.shape)
        y = reference_linear(product, *down[:5], mask=mask_p, p=dropout)
    expected = torch.autograd.grad(y.square().sum(), [leaf, *factors])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_gated_mlp_refuses_buffers_its_weights_are_not_views_of():
    x = torch.randn(2, 3, 5, dtype=DTYPE)
    layers = [
        operands(*spec, seed=i) for i, spec in enumerate([(5, 6, 2, 2.0, 0), (5, 6, 2, 2.0, 0), (6, 5, 2, 2.0, 0)])
    ]
    ops = [LinearOperands(*layer) for layer in layers]
    buffers = MLPBuffers.fold(*(op.weight for op in ops), 2, 2, 2)
    before = [t.clone() for t in (buffers.gate, buffers.up, buffers.down)]
    with pytest.raises(ValueError, match=r"weights are not the views of `buffers` \(MLPBuffers.fold\)"):
        lora_gated_mlp(x, nn.SiLU(), *ops, buffers=buffers)
    assert all(torch.equal(a, b) for a, b in zip(before, (buffers.gate, buffers.up, buffers.down), strict=True))
    folded = [op._replace(weight=view) for op, view in zip(ops, buffers.weights(), strict=True)]
    torch.testing.assert_close(
        lora_gated_mlp(x, nn.SiLU(), *folded, buffers=buffers), lora_gated_mlp(x, nn.SiLU(), *ops)
    )


@pytest.mark.parametrize("node", ["shared input", "gated MLP"])
def test_a_node_given_its_input_s_producer_keeps_the_source_and_gives_the_same_gradients(node):
    """With `InputProducer`, the node keeps the producer's input (its own input is not saved) and recomputes its
    input from it in backward, replaying the same dropout masks: the gradients are exactly those without."""
    source = torch.randn(2, 3, 5, dtype=DTYPE)
    producer = InputProducer(torch.tanh, source)
    specs = [(5, 7, 2, 2.0, 0.3), (5, 7, 3, 0.5, 0.3), (7, 5, 2, 1.0, 0.2)]
    layers = [operands(*spec, seed=i) for i, spec in enumerate(specs)]
    factors = [t for layer in layers for t in layer[2:4]]

    def run(given: InputProducer | None) -> tuple[bool, set[int], list[torch.Tensor]]:
        """Whether the node saved its input, the storages it saved, and the gradients."""
        x = torch.tanh(source).requires_grad_(True)
        ops = [LinearOperands(*layer) for layer in layers]
        saved: set[int] = set()
        torch.manual_seed(3)
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.add(t.untyped_storage().data_ptr()) or t, lambda t: t
        ):
            if node == "shared input":
                out = sum(y.sum(-1) for y in lora_shared_input(x, ops[:2], given))
            else:
                out = lora_gated_mlp(x, nn.SiLU(), *ops, producer=given)
        grads = torch.autograd.grad(out.square().sum(), [x, *factors[: 4 if node == "shared input" else 6]])
        return x.untyped_storage().data_ptr() in saved, saved, list(grads)

    saved_x, _, want = run(None)
    assert saved_x
    saved_x, saved, got = run(producer)
    assert not saved_x and source.untyped_storage().data_ptr() in saved
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.mark.filterwarnings("ignore:lora_lightning. a gated MLP's weights are not views")  # unfolded on purpose
@pytest.mark.parametrize("column_major_b", [False, True])
def test_the_gated_mlp_custom_op_is_the_node_with_true_fake_kernels_and_gradients(column_major_b):
    """The op that torch.compile keeps whole (`lora_gated_mlp_op`): the eager node's output and gradients, float64
    gradcheck, and fake kernels that give its outputs' shapes, dtypes and strides (opcheck), also for a factor
    stored column-major (as an SVD slice or `load_state_dict(assign=True)` can leave it)."""
    gate, up = (LinearOperands(*operands(5, 7, 2, 2.0, 0.0, seed=s, bias=False)) for s in (1, 2))
    if column_major_b:
        gate = gate._replace(lora_b=gate.lora_b.detach().t().contiguous().t().requires_grad_())
    down = LinearOperands(*operands(7, 5, 3, 1.5, 0.0, seed=3, bias=False))
    x = torch.randn(3, 4, 5, dtype=DTYPE, requires_grad=True)
    inputs = [x, *(t for layer in (gate, up, down) for t in (layer.lora_a, layer.lora_b))]

    def op(x, a_g, b_g, a_u, b_u, a_d, b_d):
        factors = zip((gate, up, down), (a_g, a_u, a_d), (b_g, b_u, b_d), strict=True)
        return lora_gated_mlp_op(x, *(layer._replace(lora_a=a, lora_b=b) for layer, a, b in factors))

    want_y = lora_gated_mlp(x, F.silu, gate, up, down, "silu")
    want = torch.autograd.grad(want_y.square().sum(), inputs)
    y = op(*inputs)
    got = torch.autograd.grad(y.square().sum(), inputs)
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    assert torch.autograd.gradcheck(op, inputs)
    args = (x, gate.weight, up.weight, down.weight, *inputs[1:], [2.0, 2.0, 1.5])
    torch.library.opcheck(torch.ops.lora_lightning.gated_mlp.default, args)
    outputs = torch.ops.lora_lightning.gated_mlp(*args)
    backward = (torch.randn_like(outputs[0]), *(t.detach() for t in (*args[:10], *outputs[1:])), args[10])
    torch.library.opcheck(torch.ops.lora_lightning.gated_mlp_backward.default, backward)


def test_the_gated_mlp_custom_op_refuses_a_bias_or_dropout():
    gate, up = (LinearOperands(*operands(5, 7, 2, 2.0, 0.0, seed=s, bias=False)) for s in (1, 2))
    down = LinearOperands(*operands(7, 5, 3, 1.5, 0.0, seed=3, bias=False))
    x = torch.randn(3, 5, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"up has dropout=0\.1"):
        lora_gated_mlp_op(x, gate, up._replace(dropout=0.1), down)
    with pytest.raises(ValueError, match="down has a bias"):
        lora_gated_mlp_op(x, gate, up, down._replace(bias=torch.zeros(5, dtype=DTYPE)))

"""Fused LoRA autograd nodes, for eager training with frozen bases.

Notation: rows ``x`` (``[tokens, in]``), a frozen base ``W``, ``b``, adapter factors ``A`` (``[r, in]``) and ``B``
(``[out, r]``), scaling ``s``, dropout ``d(x) = x * m / (1 - p)`` with keep mask ``m``, and ``d'`` the same product
applied to a gradient. ``g`` is the gradient arriving at a node's output.

`lora_linear`, one layer: ``y = x W^T + b + s (d(x) A^T) B^T``. Autograd over separate modules would keep
``d(x)`` as well as ``x``, write the update into a new tensor and sum two input gradients; this node saves only
``x`` and the small ``h = d(x) A^T``, accumulates the update into the base output in place and the adapter's input
gradient into the base's. Backward: ``gB = s g^T h``, ``gh = s g B``, ``gA = gh^T d(x)``, ``gx = g W + d'(gh A)``.

`lora_shared_input`, layers ``i = 1..n`` that read the same ``x`` (q/k/v of an attention block): one mask and one
GEMM for all ``A`` factors, ``h = d(x) [A_1; ...; A_n]^T`` (one read of ``x``), then
``y_i = x W_i^T + b_i + s_i h_i B_i^T``. Backward: ``gB_i = s_i g_i^T h_i``, ``gh_i = s_i g_i B_i``,
``[gA_1; ...; gA_n] = [gh_1 | ... | gh_n]^T d(x)`` in one GEMM, and ``gx = sum_i g_i W_i + d'([gh_1 | ...] [A_1; ...])``
accumulated into one buffer.

`lora_gated_mlp`, ``y = down(act(gate(x)) * up(x))`` with all three adapted, folds the factors into the base
GEMMs (`MLPBuffers`) so that no rank-``r`` product is added into, or read from, an intermediate-wide tensor on
its own: ``[x | h_g | h_u]`` (``h = d(x) [A_g; A_u]^T``) times ``[W_g | s_g B_g]`` and ``[W_u | 0 | s_u B_u]``
gives ``G`` and ``U``; ``P = act(G) * U``; ``P [W_d; A_d]^T = [P W_d^T | h_d]`` gives down's base output and
``h_d`` in one GEMM (when down has no dropout), and ``y = P W_d^T + b_d + s_d h_d B_d^T``. It saves ``x``,
``[h_g | h_u]``, ``G``, ``U`` and ``h_d``, never ``P`` or ``act(G)``: backward recomputes them. Backward:
``gB_d = s_d g^T h_d``, ``gh_d = s_d g B_d``, ``gA_d = gh_d^T d(P)``, ``gP = [g | gh_d] [W_d; A_d]`` (``g W_d +
d'(gh_d A_d)`` with dropout), ``gU = gP * act(G)``, ``gG = act'(G) * gP * U``, ``gB_g = s_g gG^T h_g`` (and up's),
``[gx | gh_g | gh_u] = gG [W_g | s_g B_g] + gU [W_u | 0 | s_u B_u]``, ``[gA_g; gA_u] = [gh_g | gh_u]^T d(x)`` and
``gx += d'([gh_g | gh_u] [A_g; A_u])``. On CUDA a SiLU gate's ``gG``, ``gU``, ``gA_d``, ``gB_g`` and ``gB_u`` come
from one pass over ``G``, ``U`` and ``gP`` that recomputes ``P`` tile by tile (`gate_triton`): ``P`` is never
written again.

Given an `InputProducer` (``x = fn(source)``, where the producer's own node keeps ``source``, as a norm kernel that
saves its input does), the shared-input and gated MLP nodes save ``source`` instead of ``x`` and recompute ``x``
in backward: one frozen-norm pass bought for one saved activation of the model's width.

Each dropout mask is drawn once, in forward, and saved with the node (`dropout`: on CUDA one bit per element,
written and read by Triton kernels that apply it as they multiply); no node keeps a dropped input.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from lora_lightning.dropout import DroppedInput, dropped_linear, kernel_seed
from lora_lightning.triton_support import triton_applies

# How `lora_gated_mlp` computes ``act(G) * U`` and its gradients: "torch" (any activation module, its gradient
# through autograd) or "silu" (a SiLU activation: on CUDA the fused kernels of `gate_triton`, elsewhere PyTorch's SiLU
# kernels called directly).
GATES = ("torch", "silu")


class LinearOperands(NamedTuple):
    """One adapted linear layer as the fused nodes take it."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dropout: float


class InputProducer(NamedTuple):
    """How a node's input ``x`` came about: ``fn(source)`` gives it again, bit for bit (a frozen norm on the hidden
    states, say). A node given one saves ``source``, which the producer's own backward keeps anyway, instead of
    ``x``, and recomputes ``x`` in backward (without autograd)."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    source: torch.Tensor


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    dropout: float,
) -> torch.Tensor:
    """Apply the fused LoRA linear map (CPU or CUDA tensors); its dropout mask is drawn as `dropout` says."""
    return _LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, scaling, dropout)


def lora_shared_input(
    x: torch.Tensor, layers: Sequence[LinearOperands], producer: InputProducer | None = None
) -> tuple[torch.Tensor, ...]:
    """``layers`` applied to the same ``x`` as one node; they must share one dropout probability (one mask).
    With ``producer``, the node keeps ``producer.source`` rather than ``x``."""
    dropout = _one_dropout(layers)
    tensors = [t for layer in layers for t in (layer.weight, layer.bias, layer.lora_a, layer.lora_b)]
    return _SharedInputFunction.apply(x, dropout, tuple(layer.scaling for layer in layers), producer, *tensors)


def lora_gated_mlp(
    x: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    gate: LinearOperands,
    up: LinearOperands,
    down: LinearOperands,
    elementwise: str = "torch",
    buffers: MLPBuffers | None = None,
    producer: InputProducer | None = None,
) -> torch.Tensor:
    """``down(act(gate(x)) * up(x))`` as one node; gate and up must share one dropout probability. ``buffers``
    holds the three weights beside their factors (`MLPBuffers.fold`); without it the node folds a copy per call.
    With ``producer``, the node keeps ``producer.source`` rather than ``x``."""
    dropouts = (_one_dropout((gate, up)), down.dropout)
    scalings = (gate.scaling, up.scaling, down.scaling)
    layers = (gate, up, down)
    if buffers is None:
        buffers = MLPBuffers.fold(*(layer.weight for layer in layers), *(layer.lora_a.shape[0] for layer in layers))
    elif not buffers.holds(*(layer.weight for layer in layers)):
        raise ValueError("lora_gated_mlp: the layers' weights are not the views of `buffers` (MLPBuffers.fold)")
    tensors = [t for layer in layers for t in (layer.bias, layer.lora_a, layer.lora_b)]
    return _GatedMLPFunction.apply(x, act, elementwise, dropouts, scalings, buffers, producer, *tensors)


class MLPBuffers:
    """A gated MLP's frozen weights stored beside its adapters' factors, so that the base GEMMs apply the
    factors too: ``gate`` is ``[W_g | s_g B_g]`` (``[out, in + r_g]``), ``up`` is ``[W_u | 0 | s_u B_u]`` (``[out, in +
    r_g + r_u]``), both applied to ``[x | h_g | h_u]``; ``down`` is ``[W_d; A_d]`` (``[out + r_d, in]``), whose
    product with ``P`` is ``[P W_d^T | P A_d^T]``. A forward writes the factor blocks; its backward writes them
    again only if another forward wrote others in between."""

    __slots__ = ("__weakref__", "_blocks", "_layout", "_written", "down", "gate", "ranks", "up")
    _by_storage: weakref.WeakValueDictionary[int, MLPBuffers] = weakref.WeakValueDictionary()

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, ranks: tuple[int, int, int]):
        self.gate, self.up, self.down, self.ranks = gate, up, down, ranks
        self._layout = tuple(_layout(view) for view in self.weights())
        width = gate.shape[1] - ranks[0]
        # the factor blocks: s_g B_g, s_u B_u and A_d
        self._blocks = (gate[:, width:], up[:, width + ranks[0] :], down[down.shape[0] - ranks[2] :])
        self._written: tuple | None = None  # what `write_factors` last wrote
        MLPBuffers._by_storage[gate.data_ptr()] = self

    @classmethod
    def holding(
        cls, w_g: torch.Tensor, w_u: torch.Tensor, w_d: torch.Tensor, ranks: tuple[int, int, int]
    ) -> MLPBuffers:
        """The buffers whose views ``W_g``, ``W_u`` and ``W_d`` are (a fused MLP's eager call folded them), else new
        buffers folding copies of them (for this call only)."""
        buffers = cls._by_storage.get(w_g.data_ptr())
        if buffers is not None and buffers.ranks == ranks and buffers.holds(w_g, w_u, w_d):
            return buffers
        warnings.warn(
            "lora_lightning: a gated MLP's weights are not views of folded buffers for its active adapters' ranks "
            "(not folded yet, the model moved, cast or copied since, or an adapter of other ranks made active), so "
            "each call of its custom op folds copies of them: slower, and more memory. Call "
            "lora_lightning.fold_gated_mlps(model) on the training device before the first compiled step, and again "
            "after such a change (LoRAFinetuneCallback does as fit starts).",
            stacklevel=2,
        )
        return cls.fold(w_g, w_u, w_d, *ranks)

    @classmethod
    def fold(cls, w_g: torch.Tensor, w_u: torch.Tensor, w_d: torch.Tensor, r_g: int, r_u: int, r_d: int) -> MLPBuffers:
        """New buffers holding copies of ``W_g``, ``W_u`` and ``W_d`` (zeros in the factor blocks)."""
        width = w_g.shape[1]
        gate = w_g.new_zeros(w_g.shape[0], width + r_g)
        up = w_u.new_zeros(w_u.shape[0], width + r_g + r_u)
        down = w_d.new_zeros(w_d.shape[0] + r_d, w_d.shape[1])
        buffers = cls(gate, up, down, (r_g, r_u, r_d))
        for view, weight in zip(buffers.weights(), (w_g, w_u, w_d), strict=True):
            view.copy_(weight)
        return buffers

    def weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The views of ``W_g``, ``W_u`` and ``W_d``."""
        width = self.gate.shape[1] - self.ranks[0]
        return self.gate[:, :width], self.up[:, :width], self.down[: self.down.shape[0] - self.ranks[2]]

    def holds(self, *weights: torch.Tensor) -> bool:
        """Whether ``weights`` (gate, up, down) are the views `weights` gives."""
        return tuple(_layout(w) for w in weights) == self._layout

    def write_factors(
        self, lora_b_g: torch.Tensor, lora_b_u: torch.Tensor, lora_a_d: torch.Tensor, scalings: Sequence[float]
    ) -> None:
        """Write ``s_g B_g``, ``s_u B_u`` and ``A_d`` into their blocks. Runs inside the nodes, where autograd records
        nothing. A forward always writes: an optimizer step changes the factors in place, and a fused one (such as
        ``AdamW(fused=True)``) leaves their in-place version counters as they were."""
        block_g, block_u, block_d = self._blocks
        torch.mul(lora_b_g, scalings[0], out=block_g)
        torch.mul(lora_b_u, scalings[1], out=block_u)
        block_d.copy_(lora_a_d)
        self._written = ((lora_b_g, lora_b_u, lora_a_d), tuple(scalings))

    def hold_factors(
        self, lora_b_g: torch.Tensor, lora_b_u: torch.Tensor, lora_a_d: torch.Tensor, scalings: Sequence[float]
    ) -> None:
        """Make the blocks hold these factors for a backward: written again only if the last write was of other
        tensors (another adapter's forward ran in between)."""
        written = self._written
        if (
            written is None
            or written[1] != tuple(scalings)
            or any(a is not b for a, b in zip(written[0], (lora_b_g, lora_b_u, lora_a_d), strict=True))
        ):
            self.write_factors(lora_b_g, lora_b_u, lora_a_d, scalings)


def _layout(t: torch.Tensor) -> tuple:
    return t.data_ptr(), t.shape, t.stride()


def _one_dropout(layers: Sequence[LinearOperands]) -> float:
    dropouts = {layer.dropout for layer in layers}
    if len(dropouts) != 1:
        raise ValueError(f"layers that share one input share one dropout mask; got dropout probabilities {dropouts}")
    return dropouts.pop()


# ------------------------------------------------------------------------------------------------------ helpers


def _kept_input(ctx: Any, x: torch.Tensor, producer: InputProducer | None) -> torch.Tensor:
    """What a node saves for its input ``x``: ``x``, or the source that ``producer`` recomputes it from."""
    ctx.produce = None if producer is None else producer.fn
    return x if producer is None else producer.source


def _restored_input(ctx: Any, kept: torch.Tensor) -> torch.Tensor:
    """The node's input from what `_kept_input` saved."""
    if ctx.produce is None:
        return kept
    with torch.no_grad():
        return ctx.produce(kept)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (a @ b)`` as one GEMM that applies the scale as it writes (``beta=0``: the input is ignored)."""
    return torch.addmm(_ignored(a.device, a.dtype), a, b, beta=0, alpha=scaling)


@functools.cache
def _ignored(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A scalar for the input slot of `torch.addmm` with ``beta=0``, which is never read: one per device and dtype
    rather than an allocation per call."""
    return torch.empty((), device=device, dtype=dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


# ------------------------------------------------------------------------------------------------------ one layer


class _LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        dropout: float,
    ) -> torch.Tensor:
        flat = _rows(x)
        out = F.linear(flat, weight, bias)
        h, mask = dropped_linear(flat, lora_a, dropout)
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b, h, mask)
        ctx.scaling, ctx.dropout = scaling, dropout
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b, h, mask = ctx.saved_tensors
        needs_x, _, _, needs_a, needs_b = ctx.needs_input_grad[:5]
        g = _rows(grad_out)
        grad_b = _scaled_mm(g.t(), h, ctx.scaling) if needs_b else None
        gh = _scaled_mm(g, lora_b, ctx.scaling)
        dropped = DroppedInput(_rows(x), mask, ctx.dropout)
        grad_a = dropped.grad_factor(gh) if needs_a else None
        grad_x = dropped.add_input_grad_(torch.mm(g, weight), gh, lora_a).view(x.shape) if needs_x else None
        return grad_x, None, None, grad_a, grad_b, None, None


# ------------------------------------------------------------------------------------------------------ shared input


def _shared_forward(
    flat: torch.Tensor, dropout: float, scalings: Sequence[float], layers: Sequence[Sequence[torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
    """The stacked ``A``, ``h``, the mask and the outputs ``y_i`` of layers ``(W, b, A, B)`` on rows ``flat`` (one
    mask, one ``A`` GEMM)."""
    a_cat = torch.cat([a for _, _, a, _ in layers])
    h, mask = dropped_linear(flat, a_cat, dropout)
    outs = []
    for (weight, bias, _, lora_b), h_i, scaling in zip(layers, _split(h, layers), scalings, strict=True):
        outs.append(F.linear(flat, weight, bias).addmm_(h_i, lora_b.t(), alpha=scaling))
    return a_cat, h, mask, outs


def _shared_backward(
    dropped: DroppedInput,
    grads: Sequence[torch.Tensor | None],
    h: torch.Tensor,
    a_cat: torch.Tensor,
    layers: Sequence[Sequence[torch.Tensor]],
    scalings: Sequence[float],
    needs: Sequence[bool],
) -> tuple[torch.Tensor | None, list[torch.Tensor | None], list[torch.Tensor | None]]:
    """``gx``, the ``gA_i`` and the ``gB_i`` of `_shared_forward` on ``dropped`` (``needs``: x, then A and B of
    each layer)."""
    grads_b: list[torch.Tensor | None] = []
    ghs, grad_x = [], None
    for (weight, _, _, lora_b), g, h_i, scaling, needs_b in zip(
        layers, grads, _split(h, layers), scalings, needs[2::2], strict=True
    ):
        if g is None:  # an output nobody used
            ghs.append(h_i.new_zeros(h_i.shape))
            grads_b.append(None)
            continue
        grads_b.append(_scaled_mm(g.t(), h_i, scaling) if needs_b else None)
        ghs.append(_scaled_mm(g, lora_b, scaling))
        if needs[0]:
            grad_x = torch.mm(g, weight) if grad_x is None else grad_x.addmm_(g, weight)
    gh = torch.cat(ghs, dim=1)
    grads_a: list[torch.Tensor | None] = [None] * len(layers)
    if any(needs[1::2]):
        stacked = dropped.grad_factor(gh).split(_ranks(layers))
        grads_a = [ga if n and g is not None else None for ga, g, n in zip(stacked, grads, needs[1::2], strict=True)]
    if needs[0]:
        grad_x = dropped.add_input_grad_(grad_x if grad_x is not None else torch.zeros_like(dropped.x), gh, a_cat)
    return grad_x, grads_a, grads_b


def _ranks(layers: Sequence[Sequence[torch.Tensor]]) -> list[int]:
    return [a.shape[0] for _, _, a, _ in layers]


def _split(h: torch.Tensor, layers: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    return h.split(_ranks(layers), dim=1)


def _layers(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """``(W, b, A, B)`` per layer from the flat argument list."""
    return [tuple(tensors[i : i + 4]) for i in range(0, len(tensors), 4)]


def _saved(layers: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """What backward needs of each layer besides the stacked ``A``: ``W`` and ``B``."""
    return [t for weight, _, _, lora_b in layers for t in (weight, lora_b)]


def _restored(saved: Sequence[torch.Tensor], a_cat: torch.Tensor, ranks: Sequence[int]) -> list[tuple]:
    """``(W, None, A, B)`` per layer from `_saved` and the stacked ``A``."""
    return [(w, None, a, lora_b) for w, lora_b, a in zip(saved[::2], saved[1::2], a_cat.split(ranks), strict=True)]


def _needs(needs_input_grad: Sequence[bool], first: int, count: int) -> list[bool]:
    """Whether ``x``, then ``A`` and ``B`` of ``count`` layers (arguments from index ``first`` on), need gradients."""
    return [needs_input_grad[0]] + [n for i in range(count) for n in needs_input_grad[first + 4 * i + 2 :][:2]]


class _SharedInputFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        dropout: float,
        scalings: tuple[float, ...],
        producer: InputProducer | None,
        *tensors: torch.Tensor,
    ):
        layers = _layers(tensors)
        a_cat, h, mask, outs = _shared_forward(_rows(x), dropout, scalings, layers)
        ctx.save_for_backward(_kept_input(ctx, x, producer), h, a_cat, mask, *_saved(layers))
        ctx.dropout, ctx.scalings, ctx.ranks = dropout, scalings, _ranks(layers)
        ctx.set_materialize_grads(False)
        return tuple(out.view(*x.shape[:-1], out.shape[-1]) for out in outs)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        kept, h, a_cat, mask, *saved = ctx.saved_tensors
        x = _restored_input(ctx, kept)
        layers = _restored(saved, a_cat, ctx.ranks)
        needs = _needs(ctx.needs_input_grad, 4, len(layers))
        grads = [None if g is None else _rows(g) for g in grads]
        dropped = DroppedInput(_rows(x), mask, ctx.dropout)
        grad_x, grads_a, grads_b = _shared_backward(dropped, grads, h, a_cat, layers, ctx.scalings, needs)
        per_layer = [t for ga, gb in zip(grads_a, grads_b, strict=True) for t in (None, None, ga, gb)]
        return (None if grad_x is None else grad_x.view(x.shape), None, None, None, *per_layer)


# ------------------------------------------------------------------------------------------------------ gated MLP


def _gate(act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor, how: str) -> torch.Tensor:
    """``act(G) * U``."""
    if how == "silu" and triton_applies(gate):
        from lora_lightning import gate_triton

        return gate_triton.silu_mul(gate, up)
    return (F.silu(gate) if how == "silu" else act(gate)) * up


class _GateRecomputed:
    """``act(G) * U`` recomputed in backward, with what its gradient needs (``act`` runs once)."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor], gate: torch.Tensor, up: torch.Tensor, how: str):
        self.gate, self.up, self.silu = gate, up, how != "torch"
        if self.silu:
            self.activated = F.silu(gate)
        else:
            with torch.enable_grad():
                self.leaf = gate.detach().requires_grad_(True)
                self.activated = act(self.leaf)
        self.product = self.activated.detach() * up

    def backward(self, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(gG, gU)`` given the gradient of the product."""
        grad_up = grad * self.activated.detach()
        if self.silu:
            return torch.ops.aten.silu_backward(grad * self.up, self.gate), grad_up
        (grad_gate,) = torch.autograd.grad(self.activated, self.leaf, grad * self.up)
        return grad_gate, grad_up


def _gate_backward(
    ctx: Any,
    g: torch.Tensor,
    gh_d: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    h_gu: torch.Tensor,
    a_d: torch.Tensor,
    mask_p: torch.Tensor | None,
) -> tuple[torch.Tensor, ...]:
    """``(gG, gU, gA_d, gB_g, gB_u)`` of a gated MLP node from down's output gradient ``g`` and ``gh_d`` (``mask_p``:
    down's dropout mask): on CUDA for a SiLU gate, one `gate_triton` pass that recomputes ``P`` on the fly;
    elsewhere ``P`` is recomputed, then read by ``gA_d``'s GEMM."""
    buffers, (s_g, s_u, _), (_, p_d) = ctx.buffers, ctx.scalings, ctx.dropouts
    out_d, rank_g = g.shape[1], ctx.rank_g
    # gP = [g | gh_d] [W_d; A_d]; with dropout g W_d, to which d'(gh_d A_d) is added below (one mask with d(P))
    grad = torch.mm(g, buffers.down[:out_d]) if p_d else torch.mm(torch.cat([g, gh_d], dim=1), buffers.down)
    if ctx.elementwise != "torch" and triton_applies(gate):
        from lora_lightning import gate_triton

        return gate_triton.silu_mul_backward_factors(gate, up, grad, gh_d, a_d, h_gu, rank_g, (s_g, s_u), mask_p, p_d)
    gated = _GateRecomputed(ctx.act, gate, up, ctx.elementwise)
    dropped_product = DroppedInput(gated.product, mask_p, p_d)
    grad_product = dropped_product.add_input_grad_(grad, gh_d, a_d) if p_d else grad
    del grad
    grad_a_d = dropped_product.grad_factor(gh_d)
    del dropped_product, gated.product
    grad_gate, grad_up = gated.backward(grad_product)
    del grad_product, gated
    grad_b_g = _scaled_mm(grad_gate.t(), h_gu[:, :rank_g], s_g)
    grad_b_u = _scaled_mm(grad_up.t(), h_gu[:, rank_g:], s_u)
    return grad_gate, grad_up, grad_a_d, grad_b_g, grad_b_u


def _mlp_forward(ctx: Any, flat: torch.Tensor, tensors: Sequence[torch.Tensor | None]) -> tuple[torch.Tensor, list]:
    """Down's output rows of a gated MLP on rows ``flat`` (``tensors``: bias, A, B of gate, up, down; the rest in
    ``ctx``), and what backward needs besides the input: ``[h_gu, G, U, h_d, mask_x, mask_p, A_gu, A_d, B_g, B_u,
    B_d]``."""
    (b_g, a_g, lora_b_g), (b_u, a_u, lora_b_u), (b_d, a_d, lora_b_d) = (tensors[i : i + 3] for i in (0, 3, 6))
    buffers, dropouts, scalings, elementwise = ctx.buffers, ctx.dropouts, ctx.scalings, ctx.elementwise
    buffers.write_factors(lora_b_g, lora_b_u, a_d, scalings)
    width, out_d = flat.shape[1], buffers.down.shape[0] - a_d.shape[0]
    a_gu = torch.cat([a_g, a_u])
    h_gu, mask_x = dropped_linear(flat, a_gu, dropouts[0])
    x_cat = torch.cat([flat, h_gu], dim=1)  # [x | h_g | h_u]
    gate = F.linear(x_cat[:, : width + a_g.shape[0]], buffers.gate, b_g)
    up = F.linear(x_cat, buffers.up, b_u)
    del x_cat
    if dropouts[1] and elementwise == "silu" and triton_applies(gate):  # P and h_d = d(P) A_d^T in one pass
        from lora_lightning import gate_triton

        product, h_d, mask_p = gate_triton.silu_mul_dropped_linear(gate, up, a_d, kernel_seed(), dropouts[1])
    else:
        product = _gate(ctx.act, gate, up, elementwise)
        h_d, mask_p = dropped_linear(product, a_d, dropouts[1]) if dropouts[1] else (None, None)
    if dropouts[1]:  # h_d reads the dropped product: not the down GEMM's
        out = F.linear(product, buffers.down[:out_d], b_d).addmm_(h_d, lora_b_d.t(), alpha=scalings[2])
    else:  # [y | h_d] = P [W_d; A_d]^T
        bias = None if b_d is None else torch.cat([b_d, b_d.new_zeros(a_d.shape[0])])
        both = F.linear(product, buffers.down, bias)
        h_d = both[:, out_d:].clone()
        out = both[:, :out_d].addmm_(h_d, lora_b_d.t(), alpha=scalings[2])
    return out, [h_gu, gate, up, h_d, mask_x, mask_p, a_gu, a_d, lora_b_g, lora_b_u, lora_b_d]


def _mlp_backward(
    ctx: Any, flat: torch.Tensor, saved: Sequence[torch.Tensor | None], g: torch.Tensor, needs: Sequence[bool]
) -> tuple[torch.Tensor | None, ...]:
    """``(gx, gA_g, gB_g, gA_u, gB_u, gA_d, gB_d)`` of `_mlp_forward` on rows ``flat`` for down's output gradient
    rows ``g`` (``needs``: whether each is needed)."""
    h_gu, gate, up, h_d, mask_x, mask_p, a_gu, a_d, lora_b_g, lora_b_u, lora_b_d = saved
    buffers, s_d, p_gu, rank_g = ctx.buffers, ctx.scalings[2], ctx.dropouts[0], ctx.rank_g
    buffers.hold_factors(lora_b_g, lora_b_u, a_d, ctx.scalings)  # another forward may have written others
    grad_b_d = _scaled_mm(g.t(), h_d, s_d) if needs[6] else None
    gh_d = _scaled_mm(g, lora_b_d, s_d)
    grad_gate, grad_up, grad_a_d, grad_b_g, grad_b_u = _gate_backward(ctx, g, gh_d, gate, up, h_gu, a_d, mask_p)
    del gh_d
    # [gx | gh_g | gh_u] = gU [W_u | 0 | s_u B_u] + gG [W_g | s_g B_g] (onto the first width + r_g columns)
    grad_cat = torch.mm(grad_up, buffers.up)
    width = grad_cat.shape[1] - h_gu.shape[1]
    grad_cat[:, : width + rank_g].addmm_(grad_gate, buffers.gate)
    del grad_gate, grad_up
    gh = grad_cat[:, width:].clone()
    dropped = DroppedInput(flat, mask_x, p_gu)
    grad_a_g = grad_a_u = None
    if needs[1] or needs[3]:
        grad_a_g, grad_a_u = dropped.grad_factor(gh).split([rank_g, a_gu.shape[0] - rank_g])
    grad_x = dropped.add_input_grad_(grad_cat[:, :width], gh, a_gu) if needs[0] else None
    grads = (grad_x, grad_a_g, grad_b_g, grad_a_u, grad_b_u, grad_a_d, grad_b_d)
    return tuple(grad if need else None for grad, need in zip(grads, needs, strict=True))


class _GatedMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
        elementwise: str,
        dropouts: tuple[float, float],
        scalings: tuple[float, float, float],
        buffers: MLPBuffers,
        producer: InputProducer | None,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        ctx.act, ctx.elementwise, ctx.dropouts, ctx.scalings = act, elementwise, dropouts, scalings
        ctx.rank_g = tensors[1].shape[0]
        ctx.buffers = buffers  # held, not saved: forward and backward write its factor blocks
        out, saved = _mlp_forward(ctx, _rows(x), tensors)
        ctx.save_for_backward(_kept_input(ctx, x, producer), *saved)
        return out.view(*x.shape[:-1], out.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        kept, *saved = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = (n[0], n[8], n[9], n[11], n[12], n[14], n[15])
        flat = _rows(_restored_input(ctx, kept))
        grad_x, grad_a_g, grad_b_g, grad_a_u, grad_b_u, grad_a_d, grad_b_d = _mlp_backward(
            ctx, flat, saved, _rows(grad_out), needs
        )
        if grad_x is not None:
            grad_x = grad_x.view(*grad_out.shape[:-1], flat.shape[1])
        per_layer = (None, grad_a_g, grad_b_g, None, grad_a_u, grad_b_u, None, grad_a_d, grad_b_d)
        return (grad_x, None, None, None, None, None, None, *per_layer)


# ------------------------------------------------------------------------------------------------------ custom op

# Under torch.compile a gated MLP with a SiLU gate, bias-free layers and no dropout runs as these two custom ops, the
# math and kernels of `_GatedMLPFunction`, which Inductor keeps whole around the rest of its graph. The op saves its
# input (no norm recompute) and runs on the weights an eager call or `fused.fold_gated_mlps` folded, else folds copies
# for the call (`MLPBuffers.holding`). No dropout: masks drawn inside an opaque op would be drawn anew where
# activation checkpointing in the compiled graph runs it again.

_Forward = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
_Backward = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class _OpState:
    """What `_mlp_forward` and `_mlp_backward` read of an autograd node's ``ctx``, for the custom ops."""

    def __init__(self, weights: Sequence[torch.Tensor], factors: Sequence[torch.Tensor], scalings: list[float]) -> None:
        ranks = (factors[0].shape[0], factors[2].shape[0], factors[4].shape[0])
        self.buffers = MLPBuffers.holding(*weights, ranks)
        self.act, self.elementwise, self.rank_g = F.silu, "silu", ranks[0]
        self.scalings, self.dropouts = tuple(scalings), (0.0, 0.0)


@torch.library.custom_op("lora_lightning::gated_mlp", mutates_args=())
def _gated_mlp_op(
    x: torch.Tensor,
    w_g: torch.Tensor,
    w_u: torch.Tensor,
    w_d: torch.Tensor,
    a_g: torch.Tensor,
    b_g: torch.Tensor,
    a_u: torch.Tensor,
    b_u: torch.Tensor,
    a_d: torch.Tensor,
    b_d: torch.Tensor,
    scalings: list[float],
) -> _Forward:
    """``(y, h_gu, G, U, h_d)``: down's output and what backward needs besides the inputs."""
    state = _OpState((w_g, w_u, w_d), (a_g, b_g, a_u, b_u, a_d, b_d), scalings)
    out, saved = _mlp_forward(state, _rows(x), (None, a_g, b_g, None, a_u, b_u, None, a_d, b_d))
    return out.view(*x.shape[:-1], out.shape[1]), *saved[:4]


@_gated_mlp_op.register_fake
def _(x, w_g, w_u, w_d, a_g, b_g, a_u, b_u, a_d, b_d, scalings):
    n, inter, r_d, out_d = x.numel() // x.shape[-1], w_g.shape[0], a_d.shape[0], w_d.shape[0]
    out = x.new_empty(n, out_d + r_d)[:, :out_d]  # a view of [y | h_d], as the down GEMM writes it
    gate = x.new_empty(n, inter)
    h_gu = x.new_empty(n, a_g.shape[0] + a_u.shape[0])
    return out.view(*x.shape[:-1], out_d), h_gu, gate, torch.empty_like(gate), x.new_empty(n, r_d)


@torch.library.custom_op("lora_lightning::gated_mlp_backward", mutates_args=())
def _gated_mlp_backward_op(
    g: torch.Tensor,
    x: torch.Tensor,
    w_g: torch.Tensor,
    w_u: torch.Tensor,
    w_d: torch.Tensor,
    a_g: torch.Tensor,
    b_g: torch.Tensor,
    a_u: torch.Tensor,
    b_u: torch.Tensor,
    a_d: torch.Tensor,
    b_d: torch.Tensor,
    h_gu: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    h_d: torch.Tensor,
    scalings: list[float],
) -> _Backward:
    """``(gx, gA_g, gB_g, gA_u, gB_u, gA_d, gB_d)``."""
    factors = (a_g, b_g, a_u, b_u, a_d, b_d)
    state = _OpState((w_g, w_u, w_d), factors, scalings)
    state.buffers.write_factors(b_g, b_u, a_d, scalings)  # always: whatever a forward wrote in between, or not
    saved = [h_gu, gate, up, h_d, None, None, torch.cat([a_g, a_u]), a_d, b_g, b_u, b_d]
    grad_x, *grads = _mlp_backward(state, _rows(x), saved, _rows(g), (True,) * 7)
    # contiguous copies: no aliases between outputs, and the fake kernel's strides whatever the factors' layout
    grads = [
        grad.to(f.dtype, memory_format=torch.contiguous_format, copy=True)
        for grad, f in zip(grads, factors, strict=True)
    ]
    return grad_x.view(x.shape), *grads


@_gated_mlp_backward_op.register_fake
def _(g, x, w_g, w_u, w_d, a_g, b_g, a_u, b_u, a_d, b_d, h_gu, gate, up, h_d, scalings):
    n, width = x.numel() // x.shape[-1], x.shape[-1]
    grad_x = x.new_empty(n, width + h_gu.shape[1])[:, :width].view(x.shape)  # a view of [gx | gh], as written
    return grad_x, *(f.new_empty(f.shape) for f in (a_g, b_g, a_u, b_u, a_d, b_d))


def _op_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    *tensors, scalings = inputs
    ctx.save_for_backward(*tensors, *output[1:])
    ctx.scalings = scalings


def _op_backward(ctx: Any, grad_out: torch.Tensor, *unused: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    grad_x, *factor_grads = torch.ops.lora_lightning.gated_mlp_backward(grad_out, *ctx.saved_tensors, ctx.scalings)
    return grad_x, None, None, None, *factor_grads, None


_gated_mlp_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def lora_gated_mlp_op(x: torch.Tensor, gate: LinearOperands, up: LinearOperands, down: LinearOperands) -> torch.Tensor:
    """`lora_gated_mlp` with a SiLU gate as a custom op that torch.compile keeps whole; for bias-free layers without
    dropout."""
    layers = (gate, up, down)
    for role, layer in zip(("gate", "up", "down"), layers, strict=True):
        if layer.bias is not None:
            raise ValueError(
                f"lora_gated_mlp_op: {role} has a bias; the op takes bias-free layers (lora_gated_mlp does)"
            )
        if layer.dropout:
            raise ValueError(
                f"lora_gated_mlp_op: {role} has dropout={layer.dropout}; the op takes 0 (lora_gated_mlp takes any)"
            )
    factors = [t for layer in layers for t in (layer.lora_a, layer.lora_b)]
    return _gated_mlp_op(x, gate.weight, up.weight, down.weight, *factors, [float(layer.scaling) for layer in layers])[
        0
    ]


# ------------------------------------------------------------------------------------------------------ traced

# Under torch.compile, siblings that read one ``x`` share ``h = d(x) [A_1; ...; A_n]^T`` (one mask, one GEMM) as
# plain operations, whose backward Inductor derives: ``[gA_1; ...] = [gh_1 | ...]^T d(x)`` and ``d'([gh_1 | ...]
# [A_1; ...])`` are one GEMM each, as in `lora_shared_input`. Each layer adds ``s_i h_i B_i^T`` to its base output.


def shared_factor_products(x: torch.Tensor, layers: Sequence[LinearOperands]) -> tuple[torch.Tensor, ...]:
    """``(h_1, ..., h_n)``, ``h_i = d(x) A_i^T`` with one dropout mask and one GEMM; the layers share one dropout
    probability."""
    p = _one_dropout(layers)
    dropped = F.dropout(x, p) if p else x
    h = F.linear(dropped, torch.cat([layer.lora_a for layer in layers]))
    return h.split([layer.lora_a.shape[0] for layer in layers], dim=-1)


def linear_with_factor_product(x: torch.Tensor, layer: LinearOperands, h: torch.Tensor) -> torch.Tensor:
    """``x W^T + b + s h B^T`` for ``h`` from `shared_factor_products`, the update scaled before it is added into the
    base output, as the module path adds it (`LoRALinear._add_update`)."""
    out = F.linear(x, layer.weight, layer.bias)
    out.view(-1, out.shape[-1]).addmm_((h * layer.scaling).reshape(-1, h.shape[-1]), layer.lora_b.t())
    return out

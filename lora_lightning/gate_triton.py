"""Triton kernels for a SiLU gate ``P = silu(G) * U`` (`functional.lora_gated_mlp` on CUDA), in fp32 inside.

Forward is one pass where PyTorch's eager ops take two (``silu``, then ``*``); with down's dropout, the same pass
also gives ``h_d = d(P) A_d^T`` and writes the mask's bits (`dropout_triton`). Backward, ``gU = gP * silu(G)`` and
``gG = gP * U * silu'(G)`` with ``silu'(a) = s (1 + a (1 - s))``, ``s = sigmoid(a)``, is one pass that also gives
the three adapter gradients that read an intermediate-wide tensor: ``gA_d = gh_d^T d(P)`` (``P`` recomputed from
the tiles of ``G`` and ``U`` it reads anyway, with the mask bits that forward wrote), ``gB_g = s_g gG^T h_g`` and
``gB_u = s_u gU^T h_u``. Unfused, those take a pass to recompute ``P`` and three rank-``r`` GEMMs that
read ``P``, ``gG`` and ``gU`` again: about 2.2x the memory traffic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lora_lightning.dropout_triton import (
    keep_mask,
    load_mask,
    new_mask,
    precision,
    processors,
    ranks_block,
    row_splits,
    store_mask,
    threshold,
)

BLOCK = 2048
BLOCK_ROWS = 64
# `silu_mul_dropped_linear`'s blocks: 128 us on an H200 at 8192 x 8192, r=16, against 274 us with 64 x 128 and 197 us
# for `silu_mul` and `dropout_triton.dropped_linear` apart.
DROPPED_ROWS, DROPPED_COLUMNS = 16, 256
# Programs of the backward pass (column blocks x row splits) per streaming processor: 8 took 258 us against 301 us
# for 2 on an H200 at Llama-1B's MLP (8192 x 8192, r=16).
SPLITS_PER_PROCESSOR = 8


@triton.jit
def _silu_mul(gate, up, out, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    a = tl.load(gate + offsets, mask, 0.0).to(tl.float32)
    b = tl.load(up + offsets, mask, 0.0).to(tl.float32)
    tl.store(out + offsets, (a * tl.sigmoid(a) * b).to(out.dtype.element_ty), mask)


@triton.jit
def _silu_mul_dropped_linear(
    gate, up, out, a, h, bits, n, k, r, seed, thresh, scale,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``P`` on this program's ``BM`` rows, ``h = d(P) A^T`` over them and the bits of the mask (`dropout_triton`'s)."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, k, BK):
        cols = k0 + tl.arange(0, BK)
        inside = (rows[:, None] < n) & (cols[None, :] < k)
        offsets = rows[:, None] * k + cols[None, :]
        g = tl.load(gate + offsets, inside, 0.0).to(tl.float32)
        u = tl.load(up + offsets, inside, 0.0).to(tl.float32)
        product = (g * tl.sigmoid(g) * u).to(out.dtype.element_ty)
        tl.store(out + offsets, product, inside)
        keep = keep_mask(seed, rows, k0 // 8, tl.cdiv(k, 8), thresh, BM, BK)
        store_mask(bits, keep, rows, k0 // 8, tl.cdiv(k, 8), n, BM, BK)
        dropped = tl.where(keep, product, 0.0)
        factor = tl.load(a + ranks[None, :] * k + cols[:, None], (ranks[None, :] < r) & (cols[:, None] < k), 0.0)
        acc = tl.dot(dropped.to(a.dtype.element_ty), factor, acc, input_precision=PRECISION)
    mask = (rows[:, None] < n) & (ranks[None, :] < r)
    tl.store(h + rows[:, None] * r + ranks[None, :], (acc * scale).to(h.dtype.element_ty), mask)


@triton.jit
def _silu_mul_backward_factors(
    gate, up, grad, grad_gate, grad_up, gh_d, a_d, h_gu, bits, partial, n, k, r_d, r_g, r_u, rows_per_split,
    drop_scale, s_g, s_u,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """gG and gU on this program's ``BN`` columns over one split of the rows, and the split's share of ``gA_d``
    (``[r_d, k]``), ``gB_g`` (``[k, r_g]``) and ``gB_u`` (``[k, r_u]``), in fp32 at ``partial[split]``. With
    dropout, ``grad`` is ``g W_d`` and the tile adds ``d'(gh_d A_d)`` to it first."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    r_gu = r_g + r_u
    acc_d = tl.zeros((BR, BN), dtype=tl.float32)
    acc_g = tl.zeros((BN, BR), dtype=tl.float32)
    acc_u = tl.zeros((BN, BR), dtype=tl.float32)
    first = split.to(tl.int64) * rows_per_split
    if DROPOUT:  # this program's columns of A_d
        down = tl.load(a_d + ranks[:, None] * k + cols[None, :], (ranks[:, None] < r_d) & (cols[None, :] < k), 0.0)
    for m0 in range(0, rows_per_split, BM):  # the last split runs past n: masked
        rows = first + m0 + tl.arange(0, BM)
        inside = (rows[:, None] < n) & (cols[None, :] < k)
        offsets = rows[:, None] * k + cols[None, :]
        a = tl.load(gate + offsets, inside, 0.0).to(tl.float32)
        b = tl.load(up + offsets, inside, 0.0).to(tl.float32)
        d = tl.load(grad + offsets, inside, 0.0).to(tl.float32)
        row_ranks = rows[:, None] < n
        factor_d = tl.load(gh_d + rows[:, None] * r_d + ranks[None, :], row_ranks & (ranks[None, :] < r_d), 0.0)
        if DROPOUT:  # gP = g W_d + d'(gh_d A_d), and gA_d reads d(P): one mask
            keep = load_mask(bits, rows, tl.program_id(0) * (BN // 8), tl.cdiv(k, 8), n, BM, BN)
            d += tl.where(keep, tl.dot(factor_d, down, input_precision=PRECISION) * drop_scale, 0.0)
        s = tl.sigmoid(a)
        activated = a * s
        g_up = (d * activated).to(grad_up.dtype.element_ty)
        g_gate = (d * b * s * (1.0 + a * (1.0 - s))).to(grad_gate.dtype.element_ty)
        tl.store(grad_up + offsets, g_up, inside)
        tl.store(grad_gate + offsets, g_gate, inside)
        product = (activated * b).to(gh_d.dtype.element_ty)
        if DROPOUT:
            product = tl.where(keep, product, 0.0)
        acc_d = tl.dot(tl.trans(factor_d), product, acc_d, input_precision=PRECISION)
        h_g = tl.load(h_gu + rows[:, None] * r_gu + ranks[None, :], row_ranks & (ranks[None, :] < r_g), 0.0)
        acc_g = tl.dot(tl.trans(g_gate.to(h_g.dtype)), h_g, acc_g, input_precision=PRECISION)
        h_u = tl.load(h_gu + rows[:, None] * r_gu + r_g + ranks[None, :], row_ranks & (ranks[None, :] < r_u), 0.0)
        acc_u = tl.dot(tl.trans(g_up.to(h_u.dtype)), h_u, acc_u, input_precision=PRECISION)
    out = partial + split.to(tl.int64) * (r_d + r_g + r_u) * k
    tl.store(out + ranks[:, None] * k + cols[None, :], acc_d * drop_scale, (ranks[:, None] < r_d) & (cols[None, :] < k))
    out += r_d * k
    tl.store(out + cols[:, None] * r_g + ranks[None, :], acc_g * s_g, (cols[:, None] < k) & (ranks[None, :] < r_g))
    out += r_g * k
    tl.store(out + cols[:, None] * r_u + ranks[None, :], acc_u * s_u, (cols[:, None] < k) & (ranks[None, :] < r_u))


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(G) * U``."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    _silu_mul[(triton.cdiv(gate.numel(), BLOCK),)](gate, up, out, gate.numel(), BLOCK=BLOCK, num_warps=8)
    return out


def silu_mul_dropped_linear(
    gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor, seed: int, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(P, d(P) A^T, the mask's bits)`` for rows ``G``, ``U`` (``[n, k]``) and ``A`` (``[r, k]``), in one pass: the
    values of `silu_mul` and then `dropout_triton.dropped_linear` (the same mask), without reading ``P`` again."""
    gate, up, a = gate.contiguous(), up.contiguous(), a.contiguous()
    n, k = gate.shape
    out, h, bits = torch.empty_like(gate), gate.new_empty(n, a.shape[0]), new_mask(n, k, gate.device)
    _silu_mul_dropped_linear[(triton.cdiv(n, DROPPED_ROWS),)](
        gate, up, out, a, h, bits, n, k, a.shape[0], seed, threshold(p), 1.0 / (1.0 - p),
        BM=DROPPED_ROWS, BK=DROPPED_COLUMNS, BR=ranks_block(a.shape[0]), PRECISION=precision(a),
        num_warps=4, num_stages=3,
    )  # fmt: skip
    return out, h, bits


def silu_mul_backward_factors(
    gate: torch.Tensor,
    up: torch.Tensor,
    grad: torch.Tensor,
    gh_d: torch.Tensor,
    a_d: torch.Tensor,
    h_gu: torch.Tensor,
    rank_g: int,
    scalings: tuple[float, float],
    bits: torch.Tensor | None,
    p: float,
) -> tuple[torch.Tensor, ...]:
    """``(gG, gU, gA_d, gB_g, gB_u)`` for rows ``G``, ``U`` (``[n, k]``), ``gh_d`` (``[n, r_d]``), ``A_d``
    (``[r_d, k]``) and ``[h_g | h_u]`` (``[n, r_g + r_u]``), the scalings ``(s_g, s_u)`` and down's dropout (the
    ``bits`` of its mask, as `silu_mul_dropped_linear` wrote them, and ``p``). ``grad`` is ``gP`` without dropout
    and ``g W_d`` with it: the kernel adds ``d'(gh_d A_d)``. Deterministic (a fixed split of the rows, summed in
    fp32). The factor gradients are fp32 views of one buffer (autograd casts a node's gradients to its inputs'
    dtypes, with no Python op each)."""
    gate, up, grad, gh_d, a_d, h_gu = (t.contiguous() for t in (gate, up, grad, gh_d, a_d, h_gu))
    n, k = gate.shape
    r_d, r_g, r_u = gh_d.shape[1], rank_g, h_gu.shape[1] - rank_g
    ranks = ranks_block(max(r_d, r_g, r_u))
    columns = 64 if ranks <= 32 else 32 if ranks <= 64 else 16
    column_blocks = triton.cdiv(k, columns)
    splits, rows_per_split = row_splits(n, BLOCK_ROWS, SPLITS_PER_PROCESSOR * processors(gate.device) // column_blocks)
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    partial = gate.new_empty(splits, (r_d + r_g + r_u) * k, dtype=torch.float32)  # every element written
    _silu_mul_backward_factors[(column_blocks, splits)](
        gate, up, grad, grad_gate, grad_up, gh_d, a_d, h_gu, gate if bits is None else bits, partial,
        n, k, r_d, r_g, r_u, rows_per_split, 1.0 / (1.0 - p), *scalings,
        BM=BLOCK_ROWS, BN=columns, BR=ranks, DROPOUT=p > 0, PRECISION=precision(gh_d),
        num_warps=4, num_stages=2,
    )  # fmt: skip
    grad_a_d, grad_b_g, grad_b_u = partial.sum(0).split([r_d * k, r_g * k, r_u * k])
    return grad_gate, grad_up, grad_a_d.view(r_d, k), grad_b_g.view(k, r_g), grad_b_u.view(k, r_u)

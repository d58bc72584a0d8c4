"""Triton kernels for `dropout`: the three products of a LoRA input's dropout, each reading its operands once.

The keep mask of element ``(i, j)`` of an ``[n, k]`` input is a function of ``(seed, i, j)`` alone: Philox-4x32
(``tl.randint4x``) at counter ``i * ceil(k / 8) + j // 8`` gives four 32-bit words, whose eight 16-bit halves are
the uniforms of columns ``8 (j // 8) ... 8 (j // 8) + 7``; an element is kept when its half is at least
``round(p * 2^16)``. So a mask is drawn the same whatever the tiling or the input's strides, and the dropout
probability is ``p`` to within ``2^-17``.

Forward (`dropped_linear`) draws the mask as it multiplies and also writes it packed, one bit per element
(``[n, ceil(k / 8)]`` bytes, bit ``j % 8`` of byte ``j // 8``: a sixteenth of a bf16 input); backward
(`grad_factor`, `add_dropped_grad_`) reads those bits instead of running Philox again, which costs more than the
products themselves. No kernel writes ``d(x)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_K = 32, 128
# Launch settings measured on an H200 (CUDA-graph replays, bf16, p=0.05, 8192 rows): `dropped_linear` with 32-row
# blocks took 19.4 us at k=2048, r=16 and 74.9 us at k=8192 against 27.7 and 107.6 us with 64-row blocks.


def threshold(p: float) -> int:
    """The 16-bit threshold below which a uniform drops its element."""
    return round(p * 65536)


def packed_columns(k: int) -> int:
    """Bytes per row of a packed mask of ``k`` columns."""
    return triton.cdiv(k, 8)


@triton.jit
def keep_mask(seed, rows, col8, n_col8, thresh, BM: tl.constexpr, BK: tl.constexpr):
    """The ``[BM, BK]`` keep mask of ``rows`` and the ``BK`` columns from ``8 * col8`` on, drawn."""
    counters = rows[:, None].to(tl.int64) * n_col8 + (col8 + tl.arange(0, BK // 8))[None, :].to(tl.int64)
    r0, r1, r2, r3 = tl.randint4x(seed, counters)
    words = tl.join(tl.join(r0, r1), tl.join(r2, r3)).reshape(BM, BK // 2)
    halves = tl.join(words & 0xFFFF, (words >> 16) & 0xFFFF).reshape(BM, BK)
    return halves >= thresh


@triton.jit
def store_mask(bits, keep, rows, col8, n_col8, n, BM: tl.constexpr, BK: tl.constexpr):
    """Write the ``[BM, BK]`` mask ``keep`` of ``rows`` and the columns from ``8 * col8`` on into ``bits``."""
    shifted = keep.to(tl.int32).reshape(BM, BK // 8, 8) << tl.arange(0, 8)[None, None, :]
    columns = col8 + tl.arange(0, BK // 8)
    inside = (rows[:, None] < n) & (columns[None, :] < n_col8)
    tl.store(bits + rows[:, None] * n_col8 + columns[None, :], tl.sum(shifted, axis=2).to(tl.uint8), inside)


@triton.jit
def load_mask(bits, rows, col8, n_col8, n, BM: tl.constexpr, BK: tl.constexpr):
    """The ``[BM, BK]`` mask of ``rows`` and the columns from ``8 * col8`` on, read from ``bits``."""
    columns = col8 + tl.arange(0, BK // 8)
    inside = (rows[:, None] < n) & (columns[None, :] < n_col8)
    packed = tl.load(bits + rows[:, None] * n_col8 + columns[None, :], inside, 0).to(tl.int32)
    return ((packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1).reshape(BM, BK) != 0


@triton.jit
def _dropped_linear(
    x, a, h, bits, n, k, r, sxn, sxk, sar, sak, shn, shr, seed, thresh, scale,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``h = d(x) A^T`` for the ``BM`` rows of this program, and their mask's bits."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    ranks = tl.arange(0, BR)
    n_col8 = tl.cdiv(k, 8)
    acc = tl.zeros((BM, BR), dtype=tl.float32)
    for k0 in range(0, k, BK):
        cols = k0 + tl.arange(0, BK)
        offsets = rows[:, None] * sxn + cols[None, :].to(tl.int64) * sxk  # a column-major input: j * n past int32
        tile = tl.load(x + offsets, (rows[:, None] < n) & (cols[None, :] < k), 0.0)
        keep = keep_mask(seed, rows, k0 // 8, n_col8, thresh, BM, BK)
        store_mask(bits, keep, rows, k0 // 8, n_col8, n, BM, BK)
        tile = tl.where(keep, tile, 0.0).to(a.dtype.element_ty)
        factor = tl.load(
            a + ranks[None, :] * sar + cols[:, None] * sak, (ranks[None, :] < r) & (cols[:, None] < k), 0.0
        )
        acc = tl.dot(tile, factor, acc, input_precision=PRECISION)
    mask = (rows[:, None] < n) & (ranks[None, :] < r)
    tl.store(h + rows[:, None] * shn + ranks[None, :] * shr, (acc * scale).to(h.dtype.element_ty), mask)


@triton.jit
def _grad_factor(
    gh, x, bits, out, n, k, r, rows_per_split, sgn, sgr, sxn, sxk, scale,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """One split's ``gh^T d(x)`` over its rows, for the ``BK`` columns of this program (fp32, summed after)."""
    cols = tl.program_id(0) * BK + tl.arange(0, BK)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    n_col8 = tl.cdiv(k, 8)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    first = split.to(tl.int64) * rows_per_split
    for m0 in range(first, tl.minimum(first + rows_per_split, n), BM):
        rows = m0 + tl.arange(0, BM)
        offsets = rows[:, None] * sxn + cols[None, :].to(tl.int64) * sxk
        tile = tl.load(x + offsets, (rows[:, None] < n) & (cols[None, :] < k), 0.0)
        tile = tl.where(load_mask(bits, rows, tl.program_id(0) * (BK // 8), n_col8, n, BM, BK), tile, 0.0)
        grads = tl.load(
            gh + rows[:, None] * sgn + ranks[None, :] * sgr, (rows[:, None] < n) & (ranks[None, :] < r), 0.0
        )
        acc = tl.dot(tl.trans(grads), tile.to(grads.dtype), acc, input_precision=PRECISION)
    mask = (ranks[:, None] < r) & (cols[None, :] < k)
    tl.store(out + split * r * k + ranks[:, None] * k + cols[None, :], acc * scale, mask)


@triton.jit
def _add_dropped_grad(
    gx, gh, a, bits, n, k, r, sgxn, sgxk, sghn, sghr, sar, sak, scale,
    BM: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """``gx += d'(gh A)`` on this program's ``[BM, BK]`` tile."""
    rows = tl.program_id(0).to(tl.int64) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BK + tl.arange(0, BK)
    ranks = tl.arange(0, BR)
    grads = tl.load(gh + rows[:, None] * sghn + ranks[None, :] * sghr, (rows[:, None] < n) & (ranks[None, :] < r), 0.0)
    factor = tl.load(a + ranks[:, None] * sar + cols[None, :] * sak, (ranks[:, None] < r) & (cols[None, :] < k), 0.0)
    update = tl.dot(grads, factor, input_precision=PRECISION) * scale
    keep = load_mask(bits, rows, tl.program_id(1) * (BK // 8), tl.cdiv(k, 8), n, BM, BK)
    mask = (rows[:, None] < n) & (cols[None, :] < k)
    pointers = gx + rows[:, None] * sgxn + cols[None, :].to(tl.int64) * sgxk
    total = tl.load(pointers, mask, 0.0).to(tl.float32) + tl.where(keep, update, 0.0)
    tl.store(pointers, total.to(gx.dtype.element_ty), mask)


def ranks_block(r: int) -> int:
    """A kernel's block over ranks: a power of two, at least `tl.dot`'s 16."""
    return max(16, triton.next_power_of_2(r))


def precision(t: torch.Tensor) -> str:
    """`tl.dot`'s ``input_precision`` for operands like ``t``: exact in fp32."""
    return "ieee" if t.dtype == torch.float32 else "tf32"


def new_mask(n: int, k: int, device: torch.device) -> torch.Tensor:
    """An unwritten packed mask for an ``[n, k]`` input."""
    return torch.empty(n, packed_columns(k), device=device, dtype=torch.uint8)


def dropped_linear(x: torch.Tensor, a: torch.Tensor, seed: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d(x) A^T, the mask's bits)`` for rows ``x`` (``[n, k]``) and ``A`` (``[r, k]``)."""
    n, k = x.shape
    h, bits = x.new_empty(n, a.shape[0]), new_mask(n, k, x.device)
    _dropped_linear[(triton.cdiv(n, BLOCK_M),)](
        x, a, h, bits, n, k, a.shape[0], *x.stride(), *a.stride(), *h.stride(), seed, threshold(p), 1.0 / (1.0 - p),
        BM=BLOCK_M, BK=BLOCK_K, BR=ranks_block(a.shape[0]), PRECISION=precision(x), num_warps=4, num_stages=3,
    )  # fmt: skip
    return h, bits


def grad_factor(gh: torch.Tensor, x: torch.Tensor, bits: torch.Tensor, p: float) -> torch.Tensor:
    """``gh^T d(x)`` for rows ``x`` (``[n, k]``) and ``gh`` (``[n, r]``), in fp32 (autograd casts a node's
    gradients): deterministic (a fixed split of the rows, summed in fp32)."""
    n, k = x.shape
    r = gh.shape[1]
    column_blocks = triton.cdiv(k, BLOCK_K)
    splits, rows_per_split = row_splits(n, BLOCK_M, 2 * processors(x.device) // column_blocks)
    partial = x.new_empty(splits, r, k, dtype=torch.float32)  # every element written
    _grad_factor[(column_blocks, splits)](
        gh, x, bits, partial, n, k, r, rows_per_split, *gh.stride(), *x.stride(), 1.0 / (1.0 - p),
        BM=BLOCK_M, BK=BLOCK_K, BR=ranks_block(r), PRECISION=precision(x), num_warps=4, num_stages=3,
    )  # fmt: skip
    return partial.sum(0)


def add_dropped_grad_(
    gx: torch.Tensor, gh: torch.Tensor, a: torch.Tensor, bits: torch.Tensor, p: float
) -> torch.Tensor:
    """``gx += d'(gh A)`` in place for ``gx`` (``[n, k]``, any strides), ``gh`` (``[n, r]``) and ``A`` (``[r, k]``)."""
    n, k = gx.shape
    _add_dropped_grad[(triton.cdiv(n, BLOCK_M), triton.cdiv(k, BLOCK_K))](
        gx, gh, a, bits, n, k, a.shape[0], *gx.stride(), *gh.stride(), *a.stride(), 1.0 / (1.0 - p),
        BM=BLOCK_M, BK=BLOCK_K, BR=ranks_block(a.shape[0]), PRECISION=precision(gx), num_warps=4, num_stages=2,
    )  # fmt: skip
    return gx


def row_splits(n: int, block: int, wanted: int) -> tuple[int, int]:
    """``(splits, rows per split)``: about ``wanted`` (at least 1) splits of ``n`` rows, each a whole number of
    ``block``-row blocks, for kernels that sum per-split partials over rows."""
    splits = max(1, min(triton.cdiv(n, block), wanted))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), block) * block
    return (triton.cdiv(n, rows_per_split) if n else 1), rows_per_split


@functools.cache
def processors(device: torch.device) -> int:
    """The device's streaming processors."""
    return torch.cuda.get_device_properties(device).multi_processor_count

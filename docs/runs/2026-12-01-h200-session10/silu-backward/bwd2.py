"""Where the library SiLU-gate backward kernel's time goes: the kernel with its dots or its stores left out."""
# ruff: noqa: E402, E501, B023  (a measurement script, run once on the device)

import triton
import triton.language as tl

from lora_lightning.dropout_triton import load_mask


@triton.jit
def _bwd_var(
    gate, up, grad, grad_gate, grad_up, gh_d, a_d, h_gu, bits, partial, n, k, r_d, r_g, r_u, rows_per_split,
    drop_scale, s_g, s_u,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    DOTS: tl.constexpr, STORES: tl.constexpr,
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
        if STORES:
            tl.store(grad_up + offsets, g_up, inside)
            tl.store(grad_gate + offsets, g_gate, inside)
        else:
            acc_g += tl.sum(g_gate.to(tl.float32) + g_up.to(tl.float32), axis=0)[:, None]
        if DOTS:
            product = (activated * b).to(gh_d.dtype.element_ty)
            if DROPOUT:
                product = tl.where(keep, product, 0.0)
            acc_d = tl.dot(tl.trans(factor_d), product, acc_d, input_precision=PRECISION)
            h_g = tl.load(h_gu + rows[:, None] * r_gu + ranks[None, :], row_ranks & (ranks[None, :] < r_g), 0.0)
            acc_g = tl.dot(tl.trans(g_gate.to(h_g.dtype)), h_g, acc_g, input_precision=PRECISION)
            h_u = tl.load(h_gu + rows[:, None] * r_gu + r_g + ranks[None, :], row_ranks & (ranks[None, :] < r_u), 0.0)
            acc_u = tl.dot(tl.trans(g_up.to(h_u.dtype)), h_u, acc_u, input_precision=PRECISION)
        else:
            acc_d += tl.sum((activated * b), axis=0)[None, :]
    out = partial + split.to(tl.int64) * (r_d + r_g + r_u) * k
    tl.store(out + ranks[:, None] * k + cols[None, :], acc_d * drop_scale, (ranks[:, None] < r_d) & (cols[None, :] < k))
    out += r_d * k
    tl.store(out + cols[:, None] * r_g + ranks[None, :], acc_g * s_g, (cols[:, None] < k) & (ranks[None, :] < r_g))
    out += r_g * k
    tl.store(out + cols[:, None] * r_u + ranks[None, :], acc_u * s_u, (cols[:, None] < k) & (ranks[None, :] < r_u))


import torch

from lora_lightning import gate_triton as gt
from lora_lightning.dropout_triton import precision, processors, row_splits


def run(G, U, gP, gh_d, a_d, h_gu, r, bits, p, dots=True, stores=True, per_sm=8, BM=64, BN=64, warps=4, stages=2):
    n, k = G.shape
    r_d = r_g = r_u = r
    column_blocks = triton.cdiv(k, BN)
    splits, rows_per_split = row_splits(n, BM, per_sm * processors(G.device) // column_blocks)
    grad_gate, grad_up = torch.empty_like(G), torch.empty_like(U)
    partial = G.new_empty(splits, 3 * r * k, dtype=torch.float32)
    _bwd_var[(column_blocks, splits)](
        G, U, gP, grad_gate, grad_up, gh_d, a_d, h_gu, G if bits is None else bits, partial,
        n, k, r_d, r_g, r_u, rows_per_split, 1.0 / (1.0 - p), 0.5, 2.0,
        BM=BM, BN=BN, BR=16, DROPOUT=p > 0, PRECISION=precision(gh_d), DOTS=dots, STORES=stores,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return grad_gate, grad_up, partial


def gbench(fn, reps=20):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps * 1e3


bf = torch.bfloat16
n = k = 8192
r = 16
torch.manual_seed(0)
G, U, gP = (torch.randn(n, k, device="cuda", dtype=bf) for _ in range(3))
gh_d = torch.randn(n, r, device="cuda", dtype=bf)
h_gu = torch.randn(n, 2 * r, device="cuda", dtype=bf)
a_d = torch.randn(r, k, device="cuda", dtype=bf)
ref = gt.silu_mul_backward_factors(G, U, gP, gh_d, a_d, h_gu, r, (0.5, 2.0), None, 0.0)
new = run(G, U, gP, gh_d, a_d, h_gu, r, None, 0.0)
print("same gG/gU as the library:", torch.equal(ref[0], new[0]), torch.equal(ref[1], new[1]))
print(
    f"library        {gbench(lambda: gt.silu_mul_backward_factors(G, U, gP, gh_d, a_d, h_gu, r, (0.5, 2.0), None, 0.0)):7.1f} us"
)
for dots, stores in ((True, True), (False, True), (True, False), (False, False)):
    for per_sm in (8, 32):
        for stages in (2, 3):
            t = gbench(lambda: run(G, U, gP, gh_d, a_d, h_gu, r, None, 0.0, dots, stores, per_sm, stages=stages))
            print(f"dots={dots!s:5} stores={stores!s:5} per_sm={per_sm:2} stages={stages} {t:7.1f} us", flush=True)
from liger_kernel.ops.swiglu import swiglu_backward

G2, U2 = G.clone(), U.clone()
print(f"liger swiglu_backward {gbench(lambda: swiglu_backward(G2, U2, gP)):7.1f} us")
print(f"read 3 write 2 (clones) {gbench(lambda: (G.clone(), U.clone(), gP.clone())):7.1f} us (3 reads 3 writes)")

"""Where the SiLU-gate backward kernel's time goes, and a transposed-tile variant (no tl.trans before the dots)."""

# ruff: noqa  (a measurement script, run once on the device)
import itertools
import os
import sys

import torch
import triton
import triton.language as tl

from lora_lightning import gate_triton as gt
from lora_lightning.dropout_triton import load_mask, precision, row_splits

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
dev = "cpu" if INTERP else "cuda"


@triton.jit
def _bwd_t(
    gate, up, grad, grad_gate, grad_up, gh_d, a_d, h_gu, bits, partial, n, k, r_d, r_g, r_u, rows_per_split,
    drop_scale, s_g, s_u,
    BM: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    DOTS: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    split = tl.program_id(1)
    ranks = tl.arange(0, BR)
    r_gu = r_g + r_u
    acc_d = tl.zeros((BN, BR), dtype=tl.float32)
    acc_g = tl.zeros((BN, BR), dtype=tl.float32)
    acc_u = tl.zeros((BN, BR), dtype=tl.float32)
    first = split.to(tl.int64) * rows_per_split
    if DROPOUT:  # [BN, BR] = A_d^T's columns
        down_t = tl.load(a_d + ranks[None, :] * k + cols[:, None], (ranks[None, :] < r_d) & (cols[:, None] < k), 0.0)
    for m0 in range(0, rows_per_split, BM):
        rows = first + m0 + tl.arange(0, BM)
        inside = (rows[None, :] < n) & (cols[:, None] < k)
        offsets = rows[None, :] * k + cols[:, None]  # [BN, BM]
        a = tl.load(gate + offsets, inside, 0.0).to(tl.float32)
        b = tl.load(up + offsets, inside, 0.0).to(tl.float32)
        d = tl.load(grad + offsets, inside, 0.0).to(tl.float32)
        row_ranks = rows[:, None] < n
        factor_d = tl.load(gh_d + rows[:, None] * r_d + ranks[None, :], row_ranks & (ranks[None, :] < r_d), 0.0)
        if DROPOUT:
            factor_d_t = tl.load(
                gh_d + rows[None, :] * r_d + ranks[:, None], (rows[None, :] < n) & (ranks[:, None] < r_d), 0.0
            )
            keep = (
                tl.trans(load_mask(bits, rows, tl.program_id(0) * (BN // 8), tl.cdiv(k, 8), n, BM, BN).to(tl.int8)) != 0
            )
            d += tl.where(keep, tl.dot(down_t, factor_d_t, input_precision=PRECISION) * drop_scale, 0.0)
        s = tl.sigmoid(a)
        activated = a * s
        g_up = (d * activated).to(grad_up.dtype.element_ty)
        g_gate = (d * b * s * (1.0 + a * (1.0 - s))).to(grad_gate.dtype.element_ty)
        tl.store(grad_up + offsets, g_up, inside)
        tl.store(grad_gate + offsets, g_gate, inside)
        if DOTS:
            product = (activated * b).to(gh_d.dtype.element_ty)
            if DROPOUT:
                product = tl.where(keep, product, 0.0)
            acc_d = tl.dot(product, factor_d, acc_d, input_precision=PRECISION)
            h_g = tl.load(h_gu + rows[:, None] * r_gu + ranks[None, :], row_ranks & (ranks[None, :] < r_g), 0.0)
            acc_g = tl.dot(g_gate.to(h_g.dtype), h_g, acc_g, input_precision=PRECISION)
            h_u = tl.load(h_gu + rows[:, None] * r_gu + r_g + ranks[None, :], row_ranks & (ranks[None, :] < r_u), 0.0)
            acc_u = tl.dot(g_up.to(h_u.dtype), h_u, acc_u, input_precision=PRECISION)
    out = partial + split.to(tl.int64) * (r_d + r_g + r_u) * k
    tl.store(out + ranks[None, :] * k + cols[:, None], acc_d * drop_scale, (ranks[None, :] < r_d) & (cols[:, None] < k))
    out += r_d * k
    tl.store(out + cols[:, None] * r_g + ranks[None, :], acc_g * s_g, (cols[:, None] < k) & (ranks[None, :] < r_g))
    out += r_g * k
    tl.store(out + cols[:, None] * r_u + ranks[None, :], acc_u * s_u, (cols[:, None] < k) & (ranks[None, :] < r_u))


def bwd_t(
    gate, up, grad, gh_d, a_d, h_gu, rank_g, scalings, bits, p, BM=64, BN=64, warps=4, stages=2, per_sm=8, dots=True
):
    n, k = gate.shape
    r_d, r_g, r_u = gh_d.shape[1], rank_g, h_gu.shape[1] - rank_g
    column_blocks = triton.cdiv(k, BN)
    sms = 132 if INTERP else torch.cuda.get_device_properties(0).multi_processor_count
    splits, rows_per_split = row_splits(n, BM, per_sm * sms // column_blocks)
    grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
    partial = gate.new_empty(splits, (r_d + r_g + r_u) * k, dtype=torch.float32)
    _bwd_t[(column_blocks, splits)](
        gate, up, grad, grad_gate, grad_up, gh_d, a_d, h_gu, gate if bits is None else bits, partial,
        n, k, r_d, r_g, r_u, rows_per_split, 1.0 / (1.0 - p), *scalings,
        BM=BM, BN=BN, BR=16, DROPOUT=p > 0, PRECISION=precision(gh_d), DOTS=dots, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    grad_a_d, grad_b_g, grad_b_u = partial.sum(0).split([r_d * k, r_g * k, r_u * k])
    return grad_gate, grad_up, grad_a_d.view(r_d, k), grad_b_g.view(k, r_g), grad_b_u.view(k, r_u)


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


def inputs(n, k, r, dtype):
    torch.manual_seed(0)
    G, U, gP = (torch.randn(n, k, device=dev, dtype=dtype) for _ in range(3))
    gh_d = torch.randn(n, r, device=dev, dtype=dtype)
    h_gu = torch.randn(n, 2 * r, device=dev, dtype=dtype)
    a_d = torch.randn(r, k, device=dev, dtype=dtype)
    return G, U, gP, gh_d, a_d, h_gu


def check(n, k, r, dtype, p, **cfg):
    G, U, gP, gh_d, a_d, h_gu = inputs(n, k, r, dtype)
    bits = None
    if p:
        _, _, bits = gt.silu_mul_dropped_linear(G, U, a_d, 12345, p)
    ref = gt.silu_mul_backward_factors(G, U, gP, gh_d, a_d, h_gu, r, (0.5, 2.0), bits, p)
    new = bwd_t(G, U, gP, gh_d, a_d, h_gu, r, (0.5, 2.0), bits, p, **cfg)
    for name, x, y in zip(("gG", "gU", "gA_d", "gB_g", "gB_u"), ref, new):
        err = (x.float() - y.float()).abs().max().item() / max(x.float().abs().max().item(), 1e-6)
        print(f"  {name} rel max err {err:.2e}", "OK" if err < 2e-2 else "BAD")


if INTERP:
    import lora_lightning.gate_triton as _g

    _g.processors = lambda device: 132
    for p in (0.0, 0.25):
        print("interp check fp32 p", p)
        check(96, 200, 5, torch.float32, p, BM=32, BN=64)
    sys.exit()

bf = torch.bfloat16
for p in (0.0, 0.05):
    print("check bf16 8192x8192 p", p)
    check(8192, 8192, 16, bf, p)
    print("check fp32 300x1000 r5 p", p)
    check(300, 1000, 5, torch.float32, p, BM=32, BN=32)
G, U, gP, gh_d, a_d, h_gu = inputs(8192, 8192, 16, bf)
_, _, bits = gt.silu_mul_dropped_linear(G, U, a_d, 12345, 0.05)
print(
    f"library bwd p0 {gbench(lambda: gt.silu_mul_backward_factors(G, U, gP, gh_d, a_d, h_gu, 16, (0.5, 2.0), None, 0.0)):.1f}"
)
print(
    f"library bwd p.05 {gbench(lambda: gt.silu_mul_backward_factors(G, U, gP, gh_d, a_d, h_gu, 16, (0.5, 2.0), bits, 0.05)):.1f}"
)
print(f"library silu_mul {gbench(lambda: gt.silu_mul(G, U)):.1f}")
try:
    from liger_kernel.ops.swiglu import swiglu_backward, swiglu_forward

    G2, U2 = G.clone(), U.clone()
    print(f"liger swiglu_backward (in place) {gbench(lambda: swiglu_backward(G2, U2, gP)):.1f}")
    print(f"liger swiglu_forward {gbench(lambda: swiglu_forward(G, U)):.1f}")
except ImportError as e:
    print(e)
print(f"copy 3 read 2 write lower bound: G.clone()+U.clone() {gbench(lambda: (G.clone(), U.clone())):.1f}")
print(
    f"transposed, no dots (elementwise floor of this structure) {gbench(lambda: bwd_t(G, U, gP, gh_d, a_d, h_gu, 16, (0.5, 2.0), None, 0.0, dots=False)):.1f}",
    flush=True,
)
res = []
for BM, BN, warps, stages, per_sm in itertools.product((32, 64, 128), (64, 128), (4, 8), (2, 3), (8, 16)):
    if BM * BN > 8192 and warps == 4:
        continue
    try:
        t0 = gbench(lambda: bwd_t(G, U, gP, gh_d, a_d, h_gu, 16, (0.5, 2.0), None, 0.0, BM, BN, warps, stages, per_sm))
        t1 = gbench(lambda: bwd_t(G, U, gP, gh_d, a_d, h_gu, 16, (0.5, 2.0), bits, 0.05, BM, BN, warps, stages, per_sm))
    except Exception as e:  # noqa: BLE001
        print("fail", BM, BN, warps, stages, per_sm, type(e).__name__, str(e)[:100])
        continue
    res.append((t0, t1, BM, BN, warps, stages, per_sm))
    print(f"{t0:7.1f} {t1:7.1f}  BM={BM} BN={BN} w={warps} st={stages} sm={per_sm}", flush=True)
print("best p0")
for x in sorted(res)[:6]:
    print(x)
print("best p.05")
for x in sorted(res, key=lambda x: x[1])[:6]:
    print(x)

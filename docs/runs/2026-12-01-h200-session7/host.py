"""Host cost per call (tiny shapes, so the GPU waits on the host): Liger RMSNorm and pieces of the fused nodes."""

import time

import torch
from liger_kernel.transformers.rms_norm import LigerRMSNorm

from lora_lightning import dropout_triton as dt
from lora_lightning import gate_triton as gt

dev, bf = "cuda", torch.bfloat16


def host(fn, reps=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e6


norm = LigerRMSNorm(2048).to(dev, bf)
src = torch.randn(1, 64, 2048, device=dev, dtype=bf, requires_grad=True)
print(f"liger rmsnorm fwd with grad {host(lambda: norm(src)):.1f} us")
with torch.no_grad():
    print(f"liger rmsnorm module.forward no_grad (our rerun) {host(lambda: norm.forward(src)):.1f} us")
y = norm(src)
g = torch.randn_like(y)
print(f"liger rmsnorm fwd+bwd {host(lambda: torch.autograd.backward(norm(src), g)):.1f} us")
x = torch.randn(64, 2048, device=dev, dtype=bf)
w = torch.randn(2048, 2048, device=dev, dtype=bf)
print(f"torch.mm {host(lambda: torch.mm(x, w)):.1f} us")
print(f"torch.cat {host(lambda: torch.cat([x, x], 1)):.1f} us")
G = torch.randn(64, 8192, device=dev, dtype=bf)
print(f"gate_triton.silu_mul {host(lambda: gt.silu_mul(G, G)):.1f} us")
a = torch.randn(16, 2048, device=dev, dtype=bf)
print(f"dropout_triton.dropped_linear {host(lambda: dt.dropped_linear(x, a, 12345, 0.05)):.1f} us")
gh = torch.randn(64, 16, device=dev, dtype=bf)
a_d = torch.randn(16, 8192, device=dev, dtype=bf)
h_gu = torch.randn(64, 32, device=dev, dtype=bf)
backward = host(lambda: gt.silu_mul_backward_factors(G, G, G, gh, a_d, h_gu, 16, (0.5, 2.0), None, 0.0))
print(f"gate_triton.silu_mul_backward_factors {backward:.1f} us")

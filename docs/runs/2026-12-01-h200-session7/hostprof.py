"""cProfile of the host side of training steps at a tiny batch (the GPU idles, so the host is the step)."""

import cProfile
import io
import pstats
import sys
import time

import liger_kernel.transformers  # noqa: F401
import torch

from benchmarks.benchmark import parse_args, settings_from_args
from benchmarks.rows import attach, make_optimizer, parse_row

name = sys.argv[1]
settings = settings_from_args(parse_args(["--shape", "llama-1b", "--batch-size", "1", "--seq-len", "64"]))
device = torch.device("cuda")
row = parse_row(name)
model = settings.build_model(device)
net, _ = attach(row, model, settings)
params = [p for p in net.parameters() if p.requires_grad]
opt, _ = make_optimizer(params, settings.lr)
tokens = settings.tokens(device)


def step():
    loss = net(input_ids=tokens, labels=tokens, use_cache=False).loss
    loss.backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


for _ in range(10):
    step()
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    step()
torch.cuda.synchronize()
print(f"{name}: {(time.perf_counter() - t) / 20 * 1e3:.1f} ms a step (host)")
pr = cProfile.Profile()
pr.enable()
for _ in range(20):
    step()
torch.cuda.synchronize()
pr.disable()
s = io.StringIO()
st = pstats.Stats(pr, stream=s)
st.sort_stats("tottime").print_stats(45)
st.sort_stats("cumulative").print_stats(60)
print(s.getvalue())

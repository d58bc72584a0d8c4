"""Where the GPU idles in a training step at the 1B shape: GPU busy time against wall time, gaps by phase and by the
kernel that ends them (the host launched it late). One row per process: python gaps.py ROW OUTDIR."""

import collections
import gzip
import json
import sys
import time
from pathlib import Path

import liger_kernel.transformers  # noqa: F401
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.benchmark import parse_args, settings_from_args
from benchmarks.rows import attach, make_optimizer, parse_row

name, out = sys.argv[1], Path(sys.argv[2])
extra = sys.argv[3:]
out.mkdir(parents=True, exist_ok=True)
settings = settings_from_args(parse_args(["--shape", "llama-1b", *extra]))
device = torch.device("cuda")
row = parse_row(name)
model = settings.build_model(device)
net, _ = attach(row, model, settings)
params = [p for p in net.parameters() if p.requires_grad]
opt, _ = make_optimizer(params, settings.lr)
tokens = settings.tokens(device)
step_net = torch.compile(net) if row.mode == "compile" else net


def step():
    with record_function("phase:forward"):
        loss = step_net(input_ids=tokens, labels=tokens, use_cache=False).loss
    with record_function("phase:backward"):
        loss.backward()
    with record_function("phase:optimizer"):
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return loss


for _ in range(8):
    step()
torch.cuda.synchronize()
ts = []
for _ in range(10):
    t = time.perf_counter()
    step()
    torch.cuda.synchronize()
    ts.append(time.perf_counter() - t)
ts.sort()
lines = [f"{name}: median {ts[5] * 1e3:.1f} ms a step (sync each step)"]
marks = []
for _ in range(10):
    t0 = time.perf_counter()
    loss = step_net(input_ids=tokens, labels=tokens, use_cache=False).loss
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)
    t3 = time.perf_counter()
    torch.cuda.synchronize()
    t4 = time.perf_counter()
    marks.append((t1 - t0, t2 - t1, t3 - t2, t4 - t3))
marks.sort(key=sum)
f, b, o, w = (1e3 * sum(m[i] for m in marks[2:8]) / 6 for i in range(4))
lines.append(
    f"host, unprofiled (mean of 6 middle steps): forward {f:.1f} ms, backward {b:.1f} ms, optimizer {o:.1f} ms, "
    f"then GPU still busy {w:.1f} ms"
)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    for _ in range(3):
        with record_function("phase:step"):
            step()
            torch.cuda.synchronize()
trace = out / f"trace_{name.replace(':', '_')}.json"
prof.export_chrome_trace(str(trace))
events = json.loads(trace.read_text())["traceEvents"]
with gzip.open(str(trace) + ".gz", "wt") as f:
    json.dump(events, f)
trace.unlink()
kernels = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
phases = [e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("phase:")]
steps = sorted((e for e in phases if e["name"] == "phase:step"), key=lambda e: e["ts"])


def phase_at(t):
    for e in phases:
        if e["name"] != "phase:step" and e["ts"] <= t <= e["ts"] + e["dur"]:
            return e["name"]
    return "other"


for i, s in enumerate(steps):
    ks = [k for k in kernels if s["ts"] <= k["ts"] <= s["ts"] + s["dur"]]
    busy, end, gaps = 0.0, None, []
    for k in ks:
        a, b = k["ts"], k["ts"] + k["dur"]
        if end is None:
            gaps.append((a - s["ts"], k))
            end = a
        if a > end:
            gaps.append((a - end, k))
            busy += k["dur"]
            end = b
        else:
            busy += max(0.0, b - end)
            end = max(end, b)
    idle = sum(g for g, _ in gaps)
    by_phase = collections.Counter()
    by_kernel = collections.Counter()
    count = collections.Counter()
    for g, k in gaps:
        by_phase[phase_at(k["ts"])] += g
        by_kernel[k["name"][:90]] += g
        count[k["name"][:90]] += 1
    lines.append(
        f"step {i}: wall {s['dur'] / 1e3:.1f} ms, GPU busy {busy / 1e3:.1f} ms, idle {idle / 1e3:.1f} ms "
        f"in {len(gaps)} gaps, kernels {len(ks)}"
    )
    lines.append(
        "  idle by phase of the late kernel: " + ", ".join(f"{p} {v / 1e3:.2f} ms" for p, v in by_phase.most_common())
    )
    if i == 1:
        lines.append("  idle by the kernel that ended it (top 25):")
        for n, v in by_kernel.most_common(25):
            lines.append(f"    {v / 1e3:7.2f} ms  {count[n]:4d}x  {n}")
        big = sorted(gaps, key=lambda g: -g[0])[:15]
        lines.append(
            "  largest gaps: "
            + "; ".join(f"{g / 1e3:.2f} ms before {k['name'][:50]} ({phase_at(k['ts'])})" for g, k in big)
        )
text = "\n".join(lines)
print(text)
(out / f"gaps_{name.replace(':', '_')}.txt").write_text(text + "\n")

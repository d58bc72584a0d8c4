"""Host time before a compiled step's first op on the GPU host, 1B shape: Dynamo's guards and the wrappers."""

import json
import statistics as st
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.rows import Settings, parse_row, set_up

name = sys.argv[1]
s = Settings.for_shape("llama-1b", device="cuda")
t = set_up(parse_row(name), s, torch.device("cuda"))


def step():
    with torch.profiler.record_function("STEP"):
        loss = t.step_net(input_ids=t.tokens, labels=t.tokens, use_cache=False).loss
    loss.backward()
    if t.optimizer is not None:
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()


for _ in range(5):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(6):
        step()
path = "/tmp/trace.json"
prof.export_chrome_trace(path)
ev = [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X"]
steps = sorted([e for e in ev if e["name"] == "STEP"], key=lambda e: e["ts"])[1:]
rows = {}
for stp in steps:
    inside = [e for e in ev if stp["ts"] <= e["ts"] < stp["ts"] + stp["dur"]]
    first = min((e for e in inside if e["name"].startswith("aten::")), key=lambda e: e["ts"])
    rows.setdefault("to first aten op", []).append((first["ts"] - stp["ts"]) / 1e3)
    for key in ("TorchDynamo Cache Lookup", "Pregraph bytecode", "AOTDispatcher Runtime Wrapper Prologue"):
        rows.setdefault(key, []).append(
            sum(e["dur"] for e in inside if e["name"] == key and e["ts"] < first["ts"]) / 1e3
        )
print(name, {k: round(st.median(v), 3) for k, v in rows.items()}, "ms (median of", len(steps), "steps)")

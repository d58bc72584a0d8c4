"""Per compiled step on CPU (tiny widths, 16 layers): total Dynamo cache lookup time (guards), pregraph bytecode."""

import dataclasses
import json
import statistics as st
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.rows import Settings, parse_row, set_up

torch.set_num_threads(1)
name = sys.argv[1]
s = Settings.for_shape("tiny", device="cpu", dtype="fp32", batch_size=1, seq_len=8, warmup=3)
s = dataclasses.replace(
    s, model={**s.model, "num_hidden_layers": 16, "hidden_size": 64, "intermediate_size": 256, "vocab_size": 256}
)
t = set_up(parse_row(name), s, torch.device("cpu"))


def step():
    with torch.profiler.record_function("STEP"):
        loss = t.step_net(input_ids=t.tokens, labels=t.tokens, use_cache=False).loss
        loss.backward()
        if t.optimizer is not None:
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)


for _ in range(5):
    step()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(8):
        step()
prof.export_chrome_trace("/tmp/lookup-trace.json")
ev = [e for e in json.loads(Path("/tmp/lookup-trace.json").read_text())["traceEvents"] if e.get("ph") == "X"]
out = {}
for stp in sorted([e for e in ev if e["name"] == "STEP"], key=lambda e: e["ts"])[1:]:
    inside = [e for e in ev if stp["ts"] <= e["ts"] < stp["ts"] + stp["dur"]]
    for key in ("TorchDynamo Cache Lookup", "Pregraph bytecode"):
        out.setdefault(key, []).append(sum(e["dur"] for e in inside if e["name"] == key) / 1e3)
    out.setdefault("frames", []).append(sum(1 for e in inside if e["name"] == "TorchDynamo Cache Lookup"))
print(name, {k: round(st.median(v), 3) for k, v in out.items()})

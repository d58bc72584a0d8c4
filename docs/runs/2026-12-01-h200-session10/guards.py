"""Dynamo's guards of a compiled row on CPU (tiny widths; layers from argv[2]): run with TORCH_LOGS=guards."""

import dataclasses
import sys

import torch

from benchmarks.rows import Settings, parse_row, set_up

name = sys.argv[1]
s = Settings.for_shape("tiny", device="cpu", dtype="fp32", batch_size=1, seq_len=8, warmup=1)
s = dataclasses.replace(
    s,
    model={
        **s.model,
        "num_hidden_layers": int(sys.argv[2]) if len(sys.argv) > 2 else 1,
        "hidden_size": 64,
        "intermediate_size": 256,
        "vocab_size": 256,
    },
)
t = set_up(parse_row(name), s, torch.device("cpu"))
for _ in range(2):
    t.step_net(input_ids=t.tokens, labels=t.tokens, use_cache=False).loss.backward()

"""200 steps of the SmolLM2-135M shape (vocab cut to 4096), fp32 on CPU, one thread: the fused paths against the
per-layer path.

Usage, from the repository root:
PYTHONPATH=$PWD python docs/runs/2026-11-30-cpu-tracking/track.py fused|plain 0.0 OUT.json"""

import json
import sys
import time

import torch
import transformers

from lora_lightning import LoRAConfig, adapter_parameters, inject_lora, install_fused_paths

torch.set_num_threads(1)
shape = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=4096,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
g = torch.Generator().manual_seed(3)
start = torch.randint(0, 4096, (64, 1), generator=g)
stream = (start + 7 * torch.arange(64)) % 4096
fused = sys.argv[1] == "fused"
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).train()
inject_lora(model, LoRAConfig(r=16, alpha=32, dropout=float(sys.argv[2])))
if fused:
    install_fused_paths(model)
opt = torch.optim.AdamW(adapter_parameters(model), lr=1e-3)
losses = []
t = time.time()
for step in range(200):
    torch.manual_seed(100 + step)
    batch = stream[(4 * step) % 64 :][:4]
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(loss.item())
record = {"fused": fused, "dropout": float(sys.argv[2]), "losses": losses, "s": time.time() - t}
with open(sys.argv[3], "w") as out:
    json.dump(record, out)

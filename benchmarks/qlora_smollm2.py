"""QLoRA on CPU: SmolLM2-135M (the packaged GGUF) with a frozen 4-bit NF4 base and LoRA adapters on top.

Loads the model the way ``experiment=smollm2_lm`` does, quantizes every linear layer but the (tied) output
head to NF4 (``--kind bnb-nf4`` or ``torchao-nf4``), measures the held-out loss, trains ``--steps`` steps of
LoRA (all-linear, r=16) through a Lightning ``Trainer`` with `LoRAFinetuneCallback` on the movie-review LM data
of ``experiment=smollm2_lm``, measures the held-out loss again, then merges (dequantizing the 4-bit bases in
fp32) and checks that the merged model gives the same loss. Prints the losses, the weights' storage before and
after quantizing, the training's peak memory and the wall times.

The rest of the model (embeddings, norms) runs in ``--compute-dtype`` too, so that activations, 4-bit
layers and adapters share one dtype::

    python scripts/qlora_smollm2.py                        # bitsandbytes NF4, bf16 compute, 40 steps
    python scripts/qlora_smollm2.py --kind torchao-nf4 --steps 60
    python -m benchmarks.qlora_smollm2 --steps 2                 # the same module, from the repository root
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import os
import time
import warnings
from itertools import islice

os.environ.setdefault("WANDB_MODE", "disabled")

import lightning.pytorch as pl
import torch

from benchmarks.memory import peak_rss_bytes, reset_peak_rss, rss_bytes
from lora_lightning import LoRAConfig, LoRAFinetuneCallback, merge_lora, param_summary, quant, quantize_linears
from lora_lightning.app.data import CausalLMDataModule
from lora_lightning.app.models import CausalLM, packaged_smollm2

MB = 2**20


def mib(value: int | None) -> float | None:
    """Bytes in MiB (None stays None)."""
    return None if value is None else value / MB


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    """Mean next-token loss over ``batches`` in eval mode (token-weighted)."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for batch in batches:
        count = int((batch["labels"][:, 1:] != -100).sum())
        total += model(**batch).loss.item() * count
        tokens += count
    model.train(was_training)
    return total / tokens


class TrainLosses(pl.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=quant.KINDS, default="bnb-nf4")
    parser.add_argument("--compute-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--val-batches", type=int, default=4, help="held-out batches of 8 blocks each")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    dtype = getattr(torch, args.compute_dtype)
    started = time.perf_counter()

    backbone = packaged_smollm2(dtype=args.compute_dtype)
    model = backbone.model
    full_bytes = quant.storage_bytes(model)
    quantize_started = time.perf_counter()
    names = quantize_linears(model, args.kind, compute_dtype=dtype)
    quantize_s = time.perf_counter() - quantize_started
    gc.collect()
    quant_bytes = quant.storage_bytes(model)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads")
    described = quant.describe(model.get_submodule(names[0]))
    print(f"quantized {len(names)} linear layers in {quantize_s:.1f} s: {described}")
    print(
        f"weights: {full_bytes / MB:.0f} MiB in {args.compute_dtype} -> {quant_bytes / MB:.0f} MiB "
        f"(embeddings/head and norms stay in {args.compute_dtype}); RSS now {mib(rss_bytes()):.0f} MiB"
    )

    data = CausalLMDataModule(
        backbone.tokenizer, dataset="vader_movies", block_size=args.block_size, batch_size=args.batch_size,
        eval_batch_size=8, train_size=2000, val_size=500, seed=args.seed,
    )  # fmt: skip
    data.setup("fit")
    val_batches = list(islice(data.val_dataloader(), args.val_batches))
    module = CausalLM(backbone, lr=args.lr)
    eval_started = time.perf_counter()
    loss_before = held_out_loss(model, val_batches)  # an eval pass before training, as Lightning's sanity check
    eval_s = time.perf_counter() - eval_started

    config = LoRAConfig(r=args.r, alpha=args.alpha, target_modules="all-linear")
    losses = TrainLosses()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[LoRAFinetuneCallback(config, optimizer=functools.partial(torch.optim.AdamW, lr=args.lr)), losses],
    )  # fmt: skip
    reset_peak_rss()
    rss_before_fit = mib(rss_bytes())
    fit_started = time.perf_counter()
    trainer.fit(module, datamodule=data)
    fit_s = time.perf_counter() - fit_started
    peak_mb = mib(peak_rss_bytes())
    adapters = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA r={args.r} alpha={args.alpha:g} all-linear: {param_summary(model)}; adapter dtype {adapters[0].dtype}")

    loss_after = held_out_loss(model, val_batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge_lora(model)
    merged = [m for m in model.modules() if type(m) is torch.nn.Linear and m is not model.get_output_embeddings()]
    loss_merged = held_out_loss(model, val_batches)

    window = min(5, len(losses.losses))
    first, last = losses.losses[:window], losses.losses[-window:]
    tokens = args.steps * args.batch_size * args.block_size
    print(f"train loss, mean of the first {window} steps: {sum(first) / window:.3f}; of the last {window}: "
          f"{sum(last) / window:.3f}")  # fmt: skip
    print(
        f"held-out loss ({len(val_batches)} batches of 8 x {args.block_size} tokens): {loss_before:.3f} before "
        f"(ppl {math.exp(loss_before):.1f}) -> {loss_after:.3f} after (ppl {math.exp(loss_after):.1f})"
    )
    print(
        f"training: {args.steps} steps of {args.batch_size} x {args.block_size} tokens in {fit_s:.0f} s "
        f"({fit_s / args.steps:.2f} s/step, {tokens / fit_s:.0f} tokens/s); held-out pass {eval_s:.1f} s"
    )
    if peak_mb and rss_before_fit:
        print(
            f"peak RSS during training: {peak_mb:.0f} MiB for the whole process, {peak_mb - rss_before_fit:.0f} MiB "
            f"over its {rss_before_fit:.0f} MiB before training (loading the GGUF leaves most of that behind)"
        )
    for warning in caught:
        print(f"merge: {warning.message}")
    dtypes = sorted({str(m.weight.dtype) for m in merged})
    print(
        f"merged: {len(merged)} plain nn.Linear ({', '.join(dtypes)}), "
        f"{sum(quant.is_quantized(m) for m in model.modules())} quantized layers left; held-out loss "
        f"{loss_merged:.3f} (adapters on 4-bit: {loss_after:.3f}; merged weights are the dequantized 4-bit "
        f"ones plus the fp32 delta, cast to {args.compute_dtype})"
    )
    print(f"total wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

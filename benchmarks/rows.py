"""What a benchmark row is: an implementation (ours, PEFT, frozen base, full fine-tuning) under a mode, with its
settings, and how a model is set up and optimised for it. Shared by the benchmark, the profile and multi-GPU."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from benchmarks.shapes import SHAPES, TARGET_MODULES, build_model

IMPLS = ("frozen", "ours", "ours-layer", "peft", "peft-bf16", "full")
LORA_IMPLS = frozenset({"ours", "ours-layer", "peft", "peft-bf16"})
MODES = ("eager", "compile")
# Rows with Liger-Kernel applied to the model first (eager only): the Liger floor, ours and PEFT on top of it.
KERNEL_IMPLS = ("frozen", "ours", "peft")
LORA_DROPOUT = 0.05
LEARNING_RATE = 1e-4


@dataclass(frozen=True)
class RowSpec:
    """One benchmark row: an implementation under one mode, checkpointing, dropout and kernels setting."""

    impl: str
    mode: str
    checkpointing: bool = False
    dropout: float = 0.0
    kernels: str = "none"

    @property
    def name(self) -> str:
        parts = [self.impl, self.mode] + (["gc"] if self.checkpointing else [])
        parts += [f"drop{self.dropout:g}"] if self.dropout else []
        return ":".join(parts + ([self.kernels] if self.kernels != "none" else []))

    @property
    def floor(self) -> RowSpec:
        """The frozen-base row this row is compared with (with the same kernels)."""
        return RowSpec("frozen", self.mode, self.checkpointing, kernels=self.kernels)

    @property
    def is_lora(self) -> bool:
        return self.impl in LORA_IMPLS


def all_rows() -> list[RowSpec]:
    """Every row, in table order: by mode, then checkpointing, then implementation, then dropout; the Liger rows
    (eager) last."""
    rows = []
    for mode in MODES:
        for checkpointing in (False, True):
            for impl in IMPLS:
                for dropout in (0.0, LORA_DROPOUT) if impl in LORA_IMPLS else (0.0,):
                    rows.append(RowSpec(impl, mode, checkpointing, dropout))
    for checkpointing in (False, True):
        rows += [RowSpec(impl, "eager", checkpointing, kernels="liger") for impl in KERNEL_IMPLS]
    return rows


def select_rows(patterns: Sequence[str]) -> list[RowSpec]:
    """Rows whose names match any of ``patterns`` (exact names or shell-style globs, comma lists allowed)."""
    wanted = [p.strip() for entry in patterns for p in entry.split(",") if p.strip()]
    if not wanted or "all" in wanted:
        return all_rows()
    rows = all_rows()
    unmatched = [p for p in wanted if not any(fnmatch.fnmatchcase(r.name, p) for r in rows)]
    if unmatched:
        raise ValueError(f"--configs {unmatched} match no row; rows are: {', '.join(r.name for r in rows)}")
    return [r for r in rows if any(fnmatch.fnmatchcase(r.name, p) for p in wanted)]


def parse_row(name: str) -> RowSpec:
    """The row called ``name``."""
    for row in all_rows():
        if row.name == name:
            return row
    raise ValueError(f"unknown row {name!r}")


@dataclass(frozen=True)
class Settings:
    """Everything a row needs besides its `RowSpec`; the same for every row of one run."""

    shape: str
    steps: int
    warmup: int
    device: str
    dtype: str
    batch_size: int
    seq_len: int
    r: int = 16
    alpha: float = 32.0
    lr: float = LEARNING_RATE
    seed: int = 0
    isolation: str = "process"
    profile_dir: str | None = None
    threads: int | None = None
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_shape(cls, shape: str, **given: Any) -> Settings:
        """Settings for the named shape: fields not ``given`` (or given as None) take the shape's value
        (device: cuda if available, else cpu)."""
        defaults = SHAPES[shape]
        chosen = {key: value for key, value in given.items() if value is not None}
        return cls(
            shape=shape,
            steps=chosen.pop("steps", defaults.steps),
            warmup=chosen.pop("warmup", defaults.warmup),
            device=chosen.pop("device", "cuda" if torch.cuda.is_available() else "cpu"),
            dtype=chosen.pop("dtype", defaults.dtype),
            batch_size=chosen.pop("batch_size", defaults.batch_size),
            seq_len=chosen.pop("seq_len", defaults.seq_len),
            model=defaults.model,
            **chosen,
        )

    def cli_args(self) -> list[str]:
        """The command-line arguments that rebuild these settings in a row process."""
        args = [
            f"--shape={self.shape}",
            f"--steps={self.steps}",
            f"--warmup={self.warmup}",
            f"--device={self.device}",
            f"--dtype={self.dtype}",
            f"--batch-size={self.batch_size}",
            f"--seq-len={self.seq_len}",
            f"--rank={self.r}",
            f"--alpha={self.alpha}",
            f"--lr={self.lr}",
            f"--seed={self.seed}",
        ]
        if self.profile_dir:
            args.append(f"--profile={self.profile_dir}")
        if self.threads:
            args.append(f"--threads={self.threads}")
        return args

    def build_model(self, device: torch.device) -> nn.Module:
        """The shape's model, random init from the seed, on ``device``."""
        return build_model(self.model, seq_len=self.seq_len, dtype=self.dtype, device=device, seed=self.seed)

    def tokens(self, device: torch.device) -> torch.Tensor:
        """The one batch every row trains on: random token ids, the same for every row of a seed."""
        generator = torch.Generator().manual_seed(self.seed + 1)
        shape = (self.batch_size, self.seq_len)
        return torch.randint(0, self.model["vocab_size"], shape, generator=generator).to(device)


def enable_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of every decoder layer. Transformers then hooks the input
    embeddings so their output requires grad, for every row alike."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns there
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def attach(row: RowSpec, model: nn.Module, settings: Settings) -> tuple[nn.Module, Callable[[Path], Path] | None]:
    """Set ``model`` up for ``row``; returns the module to train and a function saving its adapter to a
    folder (returning the weights file), or None for rows without one. ``ours`` is what `LoRAFinetuneCallback` does
    (kernels, injection, the fused paths); ``ours-layer`` leaves the fused paths out (every layer its own node)."""
    if row.kernels != "none":
        from lora_lightning import apply_kernels

        apply_kernels(model, row.kernels)
    if row.impl == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
        return model, None
    if row.impl == "full":
        return model, None
    if row.impl in ("ours", "ours-layer"):
        from lora_lightning import LoRAConfig, fold_gated_mlps, inject_lora, install_fused_paths, save_adapter

        config = LoRAConfig(
            r=settings.r, alpha=settings.alpha, dropout=row.dropout, target_modules=list(TARGET_MODULES)
        )
        inject_lora(model, config)
        if row.impl == "ours":
            install_fused_paths(model)
            fold_gated_mlps(model)  # as the callback does when fit starts: a compiled MLP's op folds no copies
        return model, lambda folder: save_adapter(model, folder) / "adapter_model.safetensors"

    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=row.dropout,
        target_modules=list(TARGET_MODULES),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=row.impl == "peft")

    def save(folder: Path) -> Path:
        peft_model.save_pretrained(folder)
        return folder / "adapter_model.safetensors"

    return peft_model, save


class Training(NamedTuple):
    """A row set up to train: the model built, the module to train (a wrapper of it for PEFT), its optimizer (None
    with nothing to train), what runs a step's forward (the module, compiled for a compile row), the batch, and
    the adapter saver of `attach`."""

    model: nn.Module
    net: nn.Module
    optimizer: torch.optim.Optimizer | None
    optimizer_name: str
    step_net: nn.Module
    tokens: torch.Tensor
    save_adapter_to: Callable[[Path], Path] | None


def set_up(row: RowSpec, settings: Settings, device: torch.device) -> Training:
    """The shape's model on ``device``, checkpointed and set up for ``row`` (`attach`), with its optimizer."""
    model = settings.build_model(device)
    if row.checkpointing:
        enable_checkpointing(model)
    net, save_adapter_to = attach(row, model, settings)
    optimizer, optimizer_name = make_optimizer([p for p in net.parameters() if p.requires_grad], settings.lr)
    step_net = torch.compile(net) if row.mode == "compile" else net
    return Training(model, net, optimizer, optimizer_name, step_net, settings.tokens(device), save_adapter_to)


def make_optimizer(params: list[nn.Parameter], lr: float) -> tuple[torch.optim.Optimizer | None, str]:
    """Fused AdamW over ``params`` (foreach where the fused kernel does not cover them), and its name; no
    optimizer when there is nothing to train."""
    if not params:
        return None, "none"
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True), "AdamW(fused)"
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(params, lr=lr, foreach=True), "AdamW(foreach)"

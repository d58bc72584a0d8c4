"""Tiny models shared by the tests: an MLP LightningModule and a Hugging Face Llama built from a config."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


class MLPModule(pl.LightningModule):
    """A classifier whose ``configure_optimizers`` hands every parameter to AdamW, as many modules do."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__()
        self.net = make_mlp(seed)
        self.lr = lr
        self.losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def classification_data(n: int = 64, seed: int = 1) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=generator)
    y = (x[:, :4].argmax(dim=1)).long()
    return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)


def make_trainer(tmp_path, **kwargs) -> pl.Trainer:
    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def tiny_llama_config(**overrides):
    """A two-layer Llama small enough for CPU tests; ``overrides`` change or add config fields."""
    transformers = pytest.importorskip("transformers")
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaConfig(**{**fields, **overrides})


def make_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    config = tiny_llama_config()
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face Llama's RMSNorm, op for op."""
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class _InputKeepingRMSNorm(torch.autograd.Function):
    """RMSNorm as one autograd node that keeps its input (as Liger-Kernel's does) and recomputes the rest."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, noise: bool) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        out = _rms_norm(x, weight, eps)
        return out + 1e-3 * torch.rand_like(out) if noise else out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(_rms_norm(leaf, weight, ctx.eps), leaf, grad)
        return grad_x, None, None, None


class InputKeepingRMSNorm(nn.Module):
    """A frozen RMSNorm whose backward keeps its input, standing in for Liger's on the CPU; ``noise`` adds a random
    draw per call (a producer that does not give the same bits twice)."""

    def __init__(self, weight: torch.Tensor, eps: float, noise: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.eps, self.noise = eps, noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _InputKeepingRMSNorm.apply(x, self.weight, self.eps, self.noise)


def keep_norm_inputs(model: nn.Module, noise: bool = False) -> nn.Module:
    """``model`` with every Llama RMSNorm replaced by an `InputKeepingRMSNorm` of the same weight."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ == "LlamaRMSNorm":
                setattr(parent, name, InputKeepingRMSNorm(child.weight, child.variance_epsilon, noise))
    return model


class LlamaModule(pl.LightningModule):
    """Causal-LM fine-tune of a tiny Llama through Lightning."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.model = make_llama(seed)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return self.model(input_ids=tokens, labels=tokens).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def token_data(n: int = 16, length: int = 12, seed: int = 2) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 128, (n, length), generator=generator)
    return DataLoader(TensorDataset(tokens), batch_size=4, shuffle=False)

"""What every module holding adapters shares: it stands for the module it wraps, holds its adapters by name, runs one
of them, none, or one per sample of the batch."""

from __future__ import annotations

import torch
from torch import nn

BASE_ADAPTER = "__base__"  # in a batch with one adapter per sample, the samples that run without any (PEFT's name)


class AdapterModule(nn.Module):
    """A module that stands for another (``wrapped``) and adds per-adapter state to it: a LoRA layer, the
    copies of a ``modules_to_save`` module, trainable token rows.

    It runs its ``active_adapter`` (``None``: the wrapped module alone), the wrapped module alone while ``disabled``,
    and, while ``sample_adapters`` holds one adapter name per sample (set by `mixed_batch.per_sample_adapters`),
    each sample of the batch (dimension 0) with its own adapter, ``"__base__"`` or an adapter this module does not
    hold meaning none.
    """

    def __init__(self) -> None:
        super().__init__()
        self.active_adapter: str | None = None
        self.disabled = False
        self.sample_adapters: list[str] | None = None

    @property
    def wrapped(self) -> nn.Module:
        """The module this one stands for."""
        raise NotImplementedError

    @property
    def adapter_names(self) -> list[str]:
        raise NotImplementedError

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors keyed by their name in a PEFT file, relative to this module."""
        raise NotImplementedError

    def state_key(self, name: str, file_key: str) -> str:
        """The ``state_dict`` key (relative to this module) of adapter ``name``'s tensor ``file_key``."""
        raise NotImplementedError

    def delete_adapter(self, name: str) -> None:
        raise NotImplementedError

    def fold(self, name: str | None) -> nn.Module:
        """Fold adapter ``name`` into the wrapped module (``None``: drop the adapters) and return the module that
        takes this one's place."""
        raise NotImplementedError

    def fold_problem(self, name: str) -> str | None:
        """Why adapter ``name`` cannot be folded in (``None`` if it can)."""
        return None

    def sample_problem(self, names: set[str]) -> str | None:
        """Why this module cannot run a batch whose samples name the adapters ``names`` (``None`` if it can)."""
        return None


def innermost(module: nn.Module) -> nn.Module:
    """The module that ``module`` stands for, through any number of adapter modules."""
    while isinstance(module, AdapterModule):
        module = module.wrapped
    return module


def sample_rows(names: list[str], batch: int) -> dict[str, torch.Tensor]:
    """The batch rows of each adapter that ``names`` (one per sample) gives, in order of first use."""
    if len(names) != batch:
        raise ValueError(
            f"per-sample adapters: {len(names)} adapter names for a batch of {batch} samples; give one name per sample"
        )
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    return {name: torch.tensor(indices) for name, indices in rows.items()}

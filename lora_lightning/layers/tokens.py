"""`TrainableTokens`: chosen rows of an embedding trained in full (``trainable_token_indices``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from lora_lightning.layers.base import AdapterModule, sample_rows
from lora_lightning.peft_format import TOKENS_KEY


class TrainableTokens(AdapterModule):
    """Rows of an embedding table trained in full, PEFT's way: the table stays frozen, and adapter ``a`` holds the
    trained rows ``trainable_tokens_delta[a]`` (despite PEFT's name, the rows themselves, starting as copies of the
    base rows) for the token ids ``token_indices[a]``. The wrapped module runs with ``W' = W`` whose rows
    ``token_indices[a]`` are replaced by them.

    A module whose weight is the same tensor (an output head tied to the embeddings) is wrapped ``tied_to`` the
    embedding's wrapper: it runs with the same ``W'`` and saves nothing of its own.
    """

    def __init__(self, base_layer: nn.Module, tied_to: TrainableTokens | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trainable_tokens_delta = nn.ParameterDict()
        self.token_indices: dict[str, list[int]] = {}
        object.__setattr__(self, "tied_to", tied_to)
        self.train(base_layer.training)  # not a submodule: the embedding's wrapper holds the rows

    @property
    def wrapped(self) -> nn.Module:
        return self.base_layer

    @property
    def adapter_names(self) -> list[str]:
        return list(self.token_indices)

    @torch.no_grad()
    def add_adapter(self, name: str, indices: list[int]) -> None:
        """Train rows ``indices`` as adapter ``name`` (starting from the base rows) and make it the active one."""
        if self.tied_to is None:
            weight = self.base_layer.weight
            self.trainable_tokens_delta[name] = nn.Parameter(weight[torch.tensor(indices, device=weight.device)])
        self.token_indices[name] = list(indices)
        self.active_adapter = name

    def weight_with(self, name: str) -> torch.Tensor:
        """``W`` with adapter ``name``'s rows in place."""
        weight = self.base_layer.weight
        rows = torch.tensor(self.token_indices[name], device=weight.device)
        source = self.tied_to if self.tied_to is not None else self
        return weight.index_copy(0, rows, source.trainable_tokens_delta[name].to(weight.dtype))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.sample_adapters is not None and not self.disabled:
            return self._per_sample_forward(x, *args, **kwargs)
        if self.disabled or self.active_adapter not in self.adapter_names:
            return self.base_layer(x, *args, **kwargs)
        return self._run(self.active_adapter, x, *args, **kwargs)

    def _run(self, name: str, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return functional_call(self.base_layer, {"weight": self.weight_with(name)}, (x, *args), kwargs)

    def _per_sample_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in sample_rows(self.sample_adapters, len(x)).items():
            if name in self.adapter_names:
                rows = rows.to(x.device)
                out = out.index_copy(0, rows, self._run(name, x[rows], *args, **kwargs))
        return out

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return {} if self.tied_to is not None else {TOKENS_KEY: self.trainable_tokens_delta[name]}

    def state_key(self, name: str, file_key: str) -> str:
        return f"trainable_tokens_delta.{name}"

    def delete_adapter(self, name: str) -> None:
        if self.tied_to is None:
            del self.trainable_tokens_delta[name]
        del self.token_indices[name]
        if self.active_adapter == name:
            self.active_adapter = None

    @torch.no_grad()
    def fold(self, name: str | None) -> nn.Module:
        if name in self.adapter_names:
            self.base_layer.weight.copy_(self.weight_with(name))
        return self.base_layer

    def extra_repr(self) -> str:
        tied = ", tied to the embedding's rows" if self.tied_to is not None else ""
        counts = {name: len(indices) for name, indices in self.token_indices.items()}
        return f"rows={counts}, active={self.active_adapter!r}{tied}"

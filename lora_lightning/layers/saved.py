"""`ModulesToSave`: a module trained in full beside the adapters (``modules_to_save``), one copy per adapter."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from lora_lightning.layers.base import AdapterModule, sample_rows

# The module types whose copies run in a batch with one adapter per sample (PEFT's list).
PER_SAMPLE_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_OWN = frozenset({"original_module", "modules_to_save", "active_adapter", "disabled", "sample_adapters"})


class ModulesToSave(AdapterModule):
    """A module trained in full, PEFT's way: ``original_module`` stays frozen and unchanged, and each adapter trains
    its own copy, ``modules_to_save[<adapter>]``. The active adapter's copy runs; with adapters disabled, or an
    active adapter that has no copy here, the original does. Attributes the wrapper lacks (``weight``,
    ``out_features``, ...) are those of the module that runs. A copy's tensors are saved under the module's own keys
    (``classifier.weight``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.train(module.training)

    @property
    def wrapped(self) -> nn.Module:
        return self.original_module

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def add_adapter(self, name: str, copied: nn.Module) -> None:
        """Give adapter ``name`` its copy (made by `copies_of`) and make it the active one."""
        self.modules_to_save[name] = copied
        self.active_adapter = name

    def running(self) -> nn.Module:
        """The module that runs now: the active adapter's copy, or the original."""
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.sample_adapters is not None and not self.disabled:
            return self._per_sample_forward(*args, **kwargs)
        return self.running()(*args, **kwargs)

    def _per_sample_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Each sample through its adapter's copy (the original for ``"__base__"`` and adapters without one)."""
        out = self.original_module(x, *args, **kwargs)
        for name, rows in sample_rows(self.sample_adapters, len(x)).items():
            if name in self.modules_to_save:
                rows = rows.to(x.device)
                out = out.index_copy(0, rows, self.modules_to_save[name](x[rows], *args, **kwargs))
        return out

    def sample_problem(self, names: set[str]) -> str | None:
        if not isinstance(self.original_module, PER_SAMPLE_TYPES):
            return (
                f"a modules_to_save {type(self.original_module).__name__}: per-sample adapters run the copies of "
                "nn.Linear, nn.Embedding and nn.Conv1d/2d/3d modules only (as in PEFT)"
            )
        return None

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        return dict(self.modules_to_save[name].state_dict(keep_vars=True))

    def state_key(self, name: str, file_key: str) -> str:
        return f"modules_to_save.{name}.{file_key}"

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def fold(self, name: str | None) -> nn.Module:
        return self.modules_to_save[name] if name is not None and name in self.modules_to_save else self.original_module

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_") or name in _OWN:
                raise
            return getattr(self.running(), name)

    def extra_repr(self) -> str:
        return f"active={self.active_adapter!r}"


def copies_of(modules: list[nn.Module]) -> list[nn.Module]:
    """Deep copies of ``modules`` (an original inside a `ModulesToSave` is copied, not the wrapper), made together:
    a tensor shared among ``modules`` (tied weights) is shared among the copies."""
    return copy.deepcopy([m.original_module if isinstance(m, ModulesToSave) else m for m in modules])

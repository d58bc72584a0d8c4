"""A checkpoint records, per adapter, the `LoRAConfig` that injects it again (`checkpoint_io.REBUILD_KEY`), so that
`inject_from_checkpoint` rebuilds every layer type and option of PEFT's table (``lora_bias``, ``target_parameters``,
MHA, token rows, each adapter's own ``modules_to_save`` copies) and the checkpoint's tensors then load strictly with
the trained outputs. A checkpoint written before that record existed still loads from its per-layer record."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch

from lora_lightning import LoRAConfig, inject_from_checkpoint, inject_lora, set_active_adapter
from lora_lightning.checkpoint_io import REBUILD_KEY, prune_to_adapters
from lora_lightning.params import lora_layers
from tests.helpers.adapters import perturb_adapters_
from tests.helpers.peft_models import X, make


class Wrapped(pl.LightningModule):
    def __init__(self, model_id: str) -> None:
        super().__init__()
        self.model = make(model_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


CASES = {
    "lora_bias": ("MLP", [{"target_modules": ["lin0", "lin1"], "lora_bias": True}]),
    "parameter": ("MlpUsingParameters", [{"target_modules": None, "target_parameters": ["lin0.weight"]}]),
    "mha": ("MHA", [{"target_modules": ["mha", "lin0"]}]),
    "conv3d": ("Conv3d", [{"target_modules": ["conv3d"]}]),
    "tokens": ("EmbConv1D", [{"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}]),
    "two heads": (
        "MLP",
        [
            {"target_modules": ["lin0"], "modules_to_save": ["lin1"]},
            {"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2},
        ],
    ),
}


def trained(model_id: str, configs: list[dict]) -> tuple[Wrapped, dict]:
    """A module with the adapters ``configs`` (named a0, a1, ...), moved off their initial values, and its
    adapter-only checkpoint."""
    module = Wrapped(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r above a layer's side
        for i, kwargs in enumerate(configs):
            inject_lora(module, LoRAConfig(**{"r": 4, "alpha": 8, **kwargs}), f"a{i}")
    perturb_adapters_(module, scale=0.3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if ".modules_to_save." in name or "trainable_tokens" in name:
                param.add_(0.3)  # copies and rows start as the base's
    checkpoint = {"state_dict": module.state_dict()}
    prune_to_adapters(checkpoint, module, None)
    return module.eval(), checkpoint


def reloaded(model_id: str, checkpoint: dict, active: str) -> Wrapped:
    fresh = Wrapped(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inject_from_checkpoint(fresh, checkpoint)
    set_active_adapter(fresh, active)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: only the base weights may be absent
    return fresh.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_every_option_comes_back_from_the_checkpoint(case):
    model_id, configs = CASES[case]
    module, checkpoint = trained(model_id, configs)
    assert set(checkpoint[REBUILD_KEY]) == {f"a{i}" for i in range(len(configs))}
    for i in range(len(configs)):
        set_active_adapter(module, f"a{i}")
        with torch.no_grad():
            torch.testing.assert_close(reloaded(model_id, checkpoint, f"a{i}")(X), module(X), rtol=0, atol=0)


def test_a_checkpoint_without_the_record_loads_from_its_layers():
    """Checkpoints written before `REBUILD_KEY` existed: LoRA layers with their ``r``/``alpha``, as before."""
    module, checkpoint = trained("MLP", [{"target_modules": ["lin0", "lin1"], "rank_pattern": {"lin1": 2}}])
    del checkpoint[REBUILD_KEY]
    with torch.no_grad():
        torch.testing.assert_close(reloaded("MLP", checkpoint, "a0")(X), module(X), rtol=0, atol=0)


def test_a_record_this_version_cannot_read_is_refused_before_the_module_changes():
    _, checkpoint = trained("MLP", [{"target_modules": ["lin0"]}])
    checkpoint[REBUILD_KEY]["a0"]["future_field"] = 1
    fresh = Wrapped("MLP")
    with pytest.raises(ValueError, match=r"'lora_adapter_configs' for adapter 'a0' cannot be read by this version"):
        inject_from_checkpoint(fresh, checkpoint)
    assert not list(lora_layers(fresh))

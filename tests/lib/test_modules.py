"""Wrapper segments in module names (FSDP1, activation checkpointing, torch.compile) and adapter-only
checkpoints: the pruning and the strict load compare canonical names."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, adapter_state_dict, inject_lora
from lora_lightning.checkpoint_io import make_checkpoints_adapter_only
from lora_lightning.modules import canonical_name
from tests.helpers.models import LlamaModule, make_trainer, token_data

CONFIG = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"),
        ("_fsdp_wrapped_module.model.layers.0._fsdp_wrapped_module.mlp", "model.layers.0.mlp"),
        (
            "layers.1._fsdp_wrapped_module._checkpoint_wrapped_module.q_proj.lora_A.weight",
            "layers.1.q_proj.lora_A.weight",
        ),
        ("_orig_mod.net.0.weight", "net.0.weight"),
        ("net._orig_mod_x.weight", "net._orig_mod_x.weight"),  # whole segments only
        ("", ""),
    ],
)
def test_canonical_name(name, expected):
    assert canonical_name(name) == expected


class CheckpointedLlama(LlamaModule):
    """Every decoder layer under torch's checkpoint_wrapper, as Lightning's FSDP activation checkpointing does:
    module names gain ``_checkpoint_wrapped_module``, state-dict keys do not."""

    def __init__(self) -> None:
        super().__init__()
        layers = self.model.model.layers
        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, checkpoint_impl=CheckpointImpl.NO_REENTRANT)


def clean_adapter_keys() -> set[str]:
    module = LlamaModule()
    inject_lora(module, CONFIG)
    return set(adapter_state_dict(module))


def test_checkpoints_of_wrapped_blocks_keep_the_adapters_and_resume_strictly(tmp_path):
    module = CheckpointedLlama()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(
        tmp_path, max_epochs=2, enable_checkpointing=True, callbacks=[LoRAFinetuneCallback(CONFIG), checkpoints]
    )
    trainer.fit(module, token_data())
    assert any("_checkpoint_wrapped_module" in name for name in adapter_state_dict(module))
    state = torch.load(checkpoints.last_model_path, weights_only=True)["state_dict"]
    assert set(state) == clean_adapter_keys()  # not empty: every adapter tensor found under its clean key

    resumed = CheckpointedLlama()
    trainer = make_trainer(tmp_path, max_epochs=3, enable_checkpointing=False, callbacks=[LoRAFinetuneCallback(CONFIG)])
    trainer.fit(resumed, token_data(), ckpt_path=checkpoints.last_model_path)  # strict for adapters, base tolerated
    assert trainer.global_step == 3 * 4

    fresh = CheckpointedLlama()
    inject_lora(fresh, CONFIG)
    make_checkpoints_adapter_only(fresh, CONFIG)
    assert fresh.load_state_dict(state).missing_keys == []
    dropped = sorted(state)[0]
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if k != dropped})


def test_fsdp1_missing_keys_with_wrapper_segments_are_matched():
    module = LlamaModule()
    inject_lora(module, CONFIG)
    make_checkpoints_adapter_only(module, CONFIG)
    adapter_key = sorted(adapter_state_dict(module))[0]
    wrapped = "_fsdp_wrapped_module." + adapter_key.replace(".self_attn.", "._fsdp_wrapped_module.self_attn.")
    incompatible = SimpleNamespace(missing_keys=[wrapped, "_fsdp_wrapped_module.model.model.norm.weight"])
    for hook in module._load_state_dict_post_hooks.values():
        hook(module, incompatible)
    assert incompatible.missing_keys == [wrapped]  # the adapter tensor still fails a strict load; the base is fine


@pytest.mark.parametrize(
    "strategy",
    [
        lambda: FSDPStrategy(state_dict_type="sharded"),
        lambda: ModelParallelStrategy(save_distributed_checkpoint=True),
    ],
    ids=["fsdp-sharded", "fsdp2-distributed"],
)
def test_sharded_checkpoints_are_refused(strategy):
    module = LlamaModule()
    inject_lora(module, CONFIG)
    module._trainer = SimpleNamespace(strategy=strategy())
    with pytest.raises(ValueError, match="save_distributed_checkpoint=False"):
        make_checkpoints_adapter_only(module, CONFIG)


def test_fsdp2_full_checkpoints_load_without_strictness_for_base_keys():
    module = LlamaModule()
    inject_lora(module, CONFIG)
    module._trainer = SimpleNamespace(strategy=ModelParallelStrategy(save_distributed_checkpoint=False))
    make_checkpoints_adapter_only(module, CONFIG)
    assert module.strict_loading is False

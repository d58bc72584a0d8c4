"""The callback with a real Lightning `Trainer` on CPU."""

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lora_lightning import LoRAConfig, LoRAFinetuneCallback, LoRALinear, adapter_state_dict, load_adapter, save_adapter
from tests.helpers.models import LlamaModule, MLPModule, classification_data, make_mlp, make_trainer, token_data

CONFIG = LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"])


def fit(module, tmp_path, config=CONFIG, epochs=3, ckpt_path=None, **trainer_kwargs):
    callback = trainer_kwargs.pop("lora", None) or LoRAFinetuneCallback(config)
    trainer = make_trainer(
        tmp_path, max_epochs=epochs, callbacks=[callback, *trainer_kwargs.pop("callbacks", [])], **trainer_kwargs
    )
    trainer.fit(module, classification_data(), ckpt_path=ckpt_path)
    return trainer


def optimizer_params(trainer: pl.Trainer) -> list[nn.Parameter]:
    return [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]


def test_fit_trains_only_adapters_and_modules_to_save(tmp_path):
    module = MLPModule()
    base_before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fit(module, tmp_path)
    assert module.losses[-1] < module.losses[0]
    assert isinstance(module.net[0], LoRALinear) and isinstance(module.net[2], LoRALinear)
    held = {id(p) for p in optimizer_params(trainer)}
    named = dict(module.named_parameters())
    trainable = {n for n, p in named.items() if id(p) in held}
    assert trainable == {
        "net.0.lora_A.default.weight",
        "net.0.lora_B.default.weight",
        "net.2.lora_A.default.weight",
        "net.2.lora_B.default.weight",
        "net.4.weight",
        "net.4.bias",
    }
    state = module.state_dict()
    for key in ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"):
        adapted = key.replace("net.0.", "net.0.base_layer.").replace("net.2.", "net.2.base_layer.")
        assert torch.equal(state[adapted], base_before[key])  # frozen base never moved
    assert not torch.equal(state["net.4.weight"], base_before["net.4.weight"])  # the head trained in full
    assert torch.count_nonzero(state["net.0.lora_B.default.weight"]) > 0


class ScheduledModule(MLPModule):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)}


def test_lr_schedulers_keep_working_on_the_filtered_optimizer(tmp_path):
    trainer = fit(ScheduledModule(), tmp_path, epochs=3)
    (optimizer,) = trainer.optimizers
    assert len(optimizer_params(trainer)) == 6
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_optimizer_factory_replaces_the_modules_optimizer(tmp_path):
    callback = LoRAFinetuneCallback(
        CONFIG,
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.1),
    )
    module = MLPModule()
    trainer = fit(module, tmp_path, epochs=2, lora=callback)
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.1**2)
    assert {id(p) for p in optimizer_params(trainer)} == {id(p) for p in module.parameters() if p.requires_grad}
    assert "configure_optimizers" not in vars(module)  # the shadowing is undone at teardown


class FrozenOnlyOptimizerModule(MLPModule):
    def configure_optimizers(self):
        return torch.optim.AdamW([self.net[0].base_layer.weight], lr=0.1)


def test_an_optimizer_without_lora_parameters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="holds none of the LoRA parameters"):
        fit(FrozenOnlyOptimizerModule(), tmp_path, epochs=1)


def test_invalid_callback_arguments():
    with pytest.raises(TypeError, match="must be a LoRAConfig"):
        LoRAFinetuneCallback({"r": 8})
    with pytest.raises(ValueError, match="needs optimizer"):
        LoRAFinetuneCallback(CONFIG, lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1))


def tensor_bytes(tree) -> int:
    if isinstance(tree, torch.Tensor):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


class WideModule(MLPModule):
    """Wide enough that tensors, not bookkeeping, dominate a full checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))


@pytest.mark.parametrize("weights_only", [False, True])
def test_checkpoints_hold_adapters_only(tmp_path, weights_only):
    checkpoint_callback = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=weights_only)
    module = WideModule()
    trainer = fit(module, tmp_path, epochs=1, callbacks=[checkpoint_callback], enable_checkpointing=True)
    trainer.save_checkpoint(tmp_path / "manual.ckpt", weights_only=weights_only)
    expected_keys = set(adapter_state_dict(module))
    for path in [Path(checkpoint_callback.best_model_path), tmp_path / "manual.ckpt"]:
        checkpoint = torch.load(path, weights_only=True)
        assert set(checkpoint["state_dict"]) == expected_keys
        assert checkpoint["lora_config"] == CONFIG.to_dict()
        raw = tensor_bytes(checkpoint["state_dict"]) + tensor_bytes(checkpoint.get("optimizer_states", []))
        full_model_bytes = tensor_bytes(dict(module.state_dict()))
        assert raw < full_model_bytes / 4
        assert 0 <= path.stat().st_size - raw < 16 * 1024, (path.stat().st_size, raw)
        assert ("optimizer_states" in checkpoint) != weights_only


def test_resume_is_exact(tmp_path):
    straight = MLPModule()
    fit(straight, tmp_path / "straight", epochs=4)

    first = MLPModule()
    fit(first, tmp_path / "first", epochs=2, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "first").rglob("*.ckpt")
    resumed = MLPModule()
    fit(resumed, tmp_path / "resumed", epochs=4, ckpt_path=ckpt)

    assert first.losses + resumed.losses == straight.losses
    expected, actual = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert expected.keys() == actual.keys()
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


@pytest.fixture
def r4_checkpoint(tmp_path):
    fit(MLPModule(), tmp_path / "r4", epochs=1, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "r4").rglob("*.ckpt")
    return ckpt


def test_resume_with_another_rank_fails_clearly(tmp_path, r4_checkpoint):
    with pytest.raises(RuntimeError, match=r"size mismatch for net.0.lora_A.default.weight.*\[4, 16\].*\[8, 16\]"):
        fit(MLPModule(), tmp_path, config=LoRAConfig(r=8, alpha=8, modules_to_save=["net.4"]), ckpt_path=r4_checkpoint)


def test_resume_with_another_alpha_fails_clearly(tmp_path, r4_checkpoint):
    with pytest.raises(ValueError, match="resume with the same LoRAConfig"):
        fit(MLPModule(), tmp_path, config=LoRAConfig(r=4, alpha=32, modules_to_save=["net.4"]), ckpt_path=r4_checkpoint)


def test_resume_with_other_targets_fails_clearly(tmp_path, r4_checkpoint):
    config = LoRAConfig(r=4, alpha=8, target_modules=["net.0"], modules_to_save=["net.4"])
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: \"net.2.lora_A.default.weight\""):
        fit(MLPModule(), tmp_path, config=config, ckpt_path=r4_checkpoint)


def test_a_checkpoint_without_lora_fails_clearly(tmp_path):
    plain = MLPModule()
    trainer = make_trainer(tmp_path / "plain", max_epochs=1)
    trainer.fit(plain, classification_data())
    trainer.save_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"net.0.lora_A.default.weight\""):
        fit(MLPModule(), tmp_path, ckpt_path=tmp_path / "plain.ckpt")


class LateModule(MLPModule):
    """Builds its layers in `configure_model`, as large-model code does."""

    def __init__(self) -> None:
        super().__init__()
        del self.net
        self.net = None

    def configure_model(self) -> None:
        if self.net is None:
            self.net = make_mlp()


def test_modules_built_in_configure_model_are_injected_after_it(tmp_path):
    module = LateModule()
    fit(module, tmp_path, epochs=2)
    assert isinstance(module.net[0], LoRALinear)
    assert module.losses[-1] < module.losses[0]
    assert "configure_model" not in vars(module)


def test_fit_twice_and_validate_reuse_the_adapters(tmp_path):
    module = MLPModule()
    callback = LoRAFinetuneCallback(CONFIG)
    fit(module, tmp_path, epochs=1, lora=callback)
    adapter = module.net[0]
    fit(module, tmp_path, epochs=1, lora=callback)
    assert module.net[0] is adapter


def test_config_none_trains_adapters_loaded_from_disk(tmp_path):
    trained = MLPModule()
    fit(trained, tmp_path / "a", epochs=1)
    save_adapter(trained.net, tmp_path / "adapter")
    module = MLPModule()
    load_adapter(module.net, tmp_path / "adapter")  # frozen: the callback makes them trainable again
    before = module.net[0].lora_B["default"].weight.clone()
    fit(module, tmp_path / "b", epochs=1, lora=LoRAFinetuneCallback(None))
    assert not torch.equal(module.net[0].lora_B["default"].weight, before)
    with pytest.raises(ValueError, match="already has adapter 'default'"):
        fit(MLPModule(), tmp_path / "c", epochs=1, lora=LoRAFinetuneCallback(None))


def test_tiny_llama_fine_tune(tmp_path):
    module = LlamaModule()
    losses = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = make_trainer(tmp_path, max_epochs=4, callbacks=[LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8)), Record()])
    trainer.fit(module, token_data())
    assert sum(isinstance(m, LoRALinear) for m in module.modules()) == 14  # 7 projections x 2 layers
    assert losses[-1] < losses[0]


def test_a_second_lora_callback_in_one_trainer_is_refused_before_any_change(tmp_path):
    """Two callbacks would patch the same hooks and train one adapter silently; the first one's setup refuses."""
    module = MLPModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    first, second = LoRAFinetuneCallback(CONFIG), LoRAFinetuneCallback(CONFIG, adapter_name="other")
    with pytest.raises(RuntimeError, match=r"2 LoRAFinetuneCallbacks \(adapters \['default', 'other'\]\).*one"):
        fit(module, tmp_path, callbacks=[second], lora=first)
    assert not any(isinstance(m, LoRALinear) for m in module.modules()), "an adapter was injected"
    assert module.state_dict().keys() == before.keys()


def test_one_summary_line_per_fit_naming_the_layers_and_the_parameter_counts(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lightning.pytorch.utilities.rank_zero"):
        fit(MLPModule(), tmp_path, LoRAConfig(r=4, alpha=8, target_modules=["net.0"]), epochs=1)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("LoRAFinetuneCallback:")]
    assert len(lines) == 1, lines
    assert "on 1 layer;" in lines[0] and lines[0].count("trainable params: ") == 1, lines

"""Lightning's own journeys with an adapter-only checkpoint, for inference: ``MyModule.load_from_checkpoint(best)``
(`LoRACheckpointMixin`), ``trainer.validate/test/predict(ckpt_path=...)`` with and without the callback, and
`inject_from_checkpoint` for a module class that cannot change. Each gives the trained module's outputs."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lora_lightning import (
    LoRACheckpointMixin,
    LoRAConfig,
    LoRAFinetuneCallback,
    SafeCheckpointIO,
    active_adapter,
    adapter_names,
    adapter_state_dict,
    inject_from_checkpoint,
    inject_lora,
    set_active_adapter,
)
from lora_lightning.checkpoint_io import ADAPTERS_KEY
from lora_lightning.params import lora_layers
from tests.helpers.models import MLPModule, classification_data, make_trainer

CONFIG = LoRAConfig(
    r=4, alpha=8, target_modules=["net.0", "net.2"], rank_pattern={r"net\.2": 2}, modules_to_save=["net.4"]
)
X = classification_data().dataset.tensors[0]


class Classifier(MLPModule):
    """`MLPModule` with validation, test and predict steps; its init arguments are saved in checkpoints."""

    def __init__(self, seed: int = 0, lr: float = 1e-2) -> None:
        super().__init__(seed, lr)
        self.save_hyperparameters()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.log("test_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0])


class ReloadableClassifier(LoRACheckpointMixin, Classifier):
    pass


def train(tmp_path: Path, module: Classifier, config: LoRAConfig | None = CONFIG, **callback) -> Path:
    """Fit ``module`` for two epochs with the callback; the path of its best checkpoint (that of its final state)."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss")
    trainer = make_trainer(
        tmp_path,
        max_epochs=2,
        enable_checkpointing=True,
        callbacks=[LoRAFinetuneCallback(config, **callback), checkpoints],
    )
    trainer.fit(module, classification_data(), classification_data())
    module.eval()
    assert Path(checkpoints.best_model_path).name == "epoch=1-step=8.ckpt"  # the last epoch is the best
    return Path(checkpoints.best_model_path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Classifier, Path]:
    module = ReloadableClassifier(seed=3)
    return module, train(tmp_path_factory.mktemp("trained"), module)


def specs(module: nn.Module) -> dict[str, dict]:
    return {n: {a: layer.spec(a) for a in layer.adapter_names} for n, layer in lora_layers(module)}


def test_load_from_checkpoint_injects_the_recorded_adapters_and_gives_the_trained_outputs(trained):
    module, best = trained
    loaded = ReloadableClassifier.load_from_checkpoint(best).eval()
    assert loaded.hparams.seed == 3  # Lightning's own restore of the init arguments still runs
    assert specs(loaded) == specs(module) and specs(loaded)["net.2"]["default"].r == 2
    assert active_adapter(loaded) == "default"
    assert adapter_state_dict(loaded).keys() == adapter_state_dict(module).keys()  # net.4 is in modules_to_save again
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), module(X), rtol=0, atol=0)


@pytest.mark.parametrize("with_callback", [True, False], ids=["callback", "mixin-alone"])
@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_trainer_stages_with_ckpt_path_give_the_trained_outputs(trained, tmp_path, stage, with_callback):
    module, best = trained
    fresh = ReloadableClassifier(seed=3) if not with_callback else Classifier(seed=3)
    trainer = make_trainer(tmp_path, callbacks=[LoRAFinetuneCallback(CONFIG)] if with_callback else [])
    result = getattr(trainer, stage)(fresh, classification_data(), ckpt_path=best)
    with torch.no_grad():
        expected = [module(x) for x, _ in classification_data()]
    if stage == "predict":
        torch.testing.assert_close(result, expected, rtol=0, atol=0)
    else:
        losses = [
            nn.functional.cross_entropy(out, y) for out, (_, y) in zip(expected, classification_data(), strict=True)
        ]
        assert result[0][f"{'val' if stage == 'validate' else 'test'}_loss"] == pytest.approx(
            torch.stack(losses).mean().item(), abs=1e-6
        )


def test_load_from_checkpoint_is_refused_on_an_instance_as_lightnings_is(trained):
    module, best = trained
    with pytest.raises(TypeError, match="cannot be called on an instance"):
        module.load_from_checkpoint(best)


def test_inject_from_checkpoint_serves_a_module_class_that_cannot_change(trained):
    module, best = trained
    checkpoint = SafeCheckpointIO().load_checkpoint(best)  # weights-only, with clear errors for bad files
    plain = Classifier(seed=3)
    assert inject_from_checkpoint(plain, checkpoint) == ["default"]
    plain.load_state_dict(checkpoint["state_dict"])  # strict: only the base weights may be absent
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(X), module(X), rtol=0, atol=0)
    assert inject_from_checkpoint(plain, checkpoint) == []  # it has them now: nothing more goes in


def test_every_recorded_adapter_comes_back_and_the_last_one_is_active(tmp_path):
    module = ReloadableClassifier()
    inject_lora(module, LoRAConfig(r=2, alpha=2, target_modules=["net.0"]), "frozen")
    with torch.no_grad():
        module.net[0].factors("frozen")[1].normal_()
    best = train(tmp_path, module, LoRAConfig(r=4, alpha=8, target_modules=["net.0", "net.2"]), adapter_name="mine")
    assert adapter_names(module) == ["frozen", "mine"]

    loaded = ReloadableClassifier.load_from_checkpoint(best).eval()
    assert specs(loaded) == specs(module) and active_adapter(loaded) == "mine"
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), module(X), rtol=0, atol=0)
        set_active_adapter(loaded, "frozen")
        set_active_adapter(module, "frozen")
        torch.testing.assert_close(loaded(X), module(X), rtol=0, atol=0)


def test_a_checkpoint_missing_an_adapter_tensor_still_fails_the_strict_load(trained, tmp_path):
    _, best = trained
    checkpoint = torch.load(best, weights_only=True)
    del checkpoint["state_dict"]["net.2.lora_B.default.weight"]
    torch.save(checkpoint, tmp_path / "cut.ckpt")
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"net.2.lora_B.default.weight\""):
        ReloadableClassifier.load_from_checkpoint(tmp_path / "cut.ckpt")


class Narrow(Classifier):
    """A module without the layer ``net.2`` that the checkpoint's adapter is on."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(OrderedDict([("0", nn.Linear(16, 32)), ("1", nn.ReLU()), ("4", nn.Linear(32, 4))]))


def test_a_checkpoint_of_another_module_is_refused_before_the_module_changes(trained):
    _, best = trained
    checkpoint = SafeCheckpointIO().load_checkpoint(best)
    other = Narrow()
    with pytest.raises(ValueError, match=r"adapter 'default' is on 1 layer\(s\) that this Narrow does not have"):
        inject_from_checkpoint(other, checkpoint)
    assert not list(lora_layers(other))


def test_a_checkpoint_with_other_recorded_hyperparameters_than_the_modules_adapter_is_refused(trained):
    _, best = trained
    checkpoint = SafeCheckpointIO().load_checkpoint(best)
    checkpoint[ADAPTERS_KEY]["default"]["net.0"]["alpha"] = 99.0
    module = Classifier(seed=3)
    inject_lora(module, CONFIG)
    with pytest.raises(ValueError, match="trained with other hyperparameters on 1 layer"):
        inject_from_checkpoint(module, checkpoint)


class Payload:
    """Not a tensor: a weights-only load refuses to rebuild it."""


def test_load_from_checkpoint_is_weights_only_even_when_the_environment_says_otherwise(trained, tmp_path, monkeypatch):
    _, best = trained
    checkpoint = torch.load(best, weights_only=True)
    checkpoint["payload"] = Payload()
    torch.save(checkpoint, tmp_path / "pickled.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # Lightning's own default would now unpickle
    with pytest.raises(pickle.UnpicklingError, match="Payload"):
        ReloadableClassifier.load_from_checkpoint(tmp_path / "pickled.ckpt")
    loaded = ReloadableClassifier.load_from_checkpoint(tmp_path / "pickled.ckpt", weights_only=False)  # trusted
    assert adapter_names(loaded) == ["default"]


def test_a_full_checkpoint_loads_as_before(tmp_path):
    module = ReloadableClassifier(seed=4)
    trainer = make_trainer(tmp_path, max_epochs=1)
    trainer.fit(module, classification_data())
    trainer.save_checkpoint(tmp_path / "full.ckpt")
    loaded = ReloadableClassifier.load_from_checkpoint(tmp_path / "full.ckpt").eval()
    assert not list(lora_layers(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), module.eval()(X), rtol=0, atol=0)

"""Several named adapters on one base model (issue 5, item 4): PEFT-format adapters loaded side by side,
switched, disabled, trained one at a time, saved one by one, deleted and checkpointed; LoRA+ param groups.

PEFT 0.21 is the oracle: its adapters, with different targets, ranks and scalings, are made by PEFT itself,
and each must give PEFT's output (single-adapter ``PeftModel.from_pretrained`` and PEFT's own multi-adapter
``load_adapter``/``set_adapter``) when active in our model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_lightning import (
    AdapterFormatError,
    LoRAConfig,
    LoRAEmbedding,
    LoRAFinetuneCallback,
    TargetError,
    active_adapter,
    adapter_names,
    adapter_parameters,
    adapter_state_dict,
    delete_adapter,
    disable_adapters,
    inject_lora,
    load_adapter,
    mark_only_adapters_trainable,
    save_adapter,
    set_active_adapter,
)
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import assert_unchanged, perturb_peft_adapter, snapshot
from tests.helpers.models import LlamaModule, MLPModule, classification_data, make_llama, make_trainer, token_data

peft = pytest.importorskip("peft")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
NAMES = ("a", "b", "c")
# Three adapters of one tiny Llama that overlap on some layers (q_proj holds "a" and "c") and differ in rank,
# alpha, rsLoRA, per-layer patterns and layer type (an embedding in "c").
PEFT_CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "b": dict(r=2, lora_alpha=4, target_modules=["k_proj", "o_proj", "gate_proj"], use_rslora=True),
    "c": dict(
        r=8,
        lora_alpha=8,
        target_modules=["embed_tokens", "q_proj", "down_proj"],
        rank_pattern={"down_proj": 3},
        alpha_pattern={"q_proj": 32},
    ),
    # trains lm_head in full: shared by every adapter, so it may only live alone in a model
    "head": dict(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
}


# ---------------------------------------------------------------------------------------------- helpers


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


@dataclass(frozen=True)
class Adapters:
    paths: dict[str, Path]  # PEFT folders, written by PEFT
    expected: dict[str, torch.Tensor]  # PEFT's logits with that adapter alone
    base: torch.Tensor  # the base model's logits


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Adapters:
    root = tmp_path_factory.mktemp("peft")
    paths, expected = {}, {}
    for seed, (name, config) in enumerate(PEFT_CONFIGS.items()):
        theirs = peft.get_peft_model(make_llama(0), peft.LoraConfig(**config))
        perturb_peft_adapter(theirs, seed=10 + seed)
        # By default PEFT also writes the whole embedding table under a LoRA-adapted embedding, a base tensor
        # that load_adapter does not take (yet); the adapter itself is the same without it.
        theirs.save_pretrained(root / name, save_embedding_layers=False)
        paths[name] = root / name
        expected[name] = logits(peft.PeftModel.from_pretrained(make_llama(0), root / name).eval())
    base = logits(make_llama(0))
    for name, out in expected.items():  # each adapter changes the output, and differently
        assert (out - base).abs().max() > 1e-2, name
        assert all((out - other).abs().max() > 1e-2 for n, other in expected.items() if n != name)
    return Adapters(paths, expected, base)


def serving(adapters: Adapters, names: tuple[str, ...] = NAMES, model: nn.Module | None = None) -> nn.Module:
    """The tiny Llama (or ``model``) with the PEFT adapters ``names`` loaded, in that order."""
    model = make_llama(0) if model is None else model
    for name in names:
        load_adapter(model, adapters.paths[name], adapter_name=name)
    return model


def serving_module(adapters: Adapters, names: tuple[str, ...] = NAMES) -> LlamaModule:
    module = LlamaModule(seed=0)
    serving(adapters, names, module.model)
    return module.train()


def adapter_keys(model: nn.Module, name: str) -> set[str]:
    return set(adapter_state_dict(model, name))


def optimizer_params(trainer: pl.Trainer) -> list[nn.Parameter]:
    return [p for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]]


def fit(module: pl.LightningModule, root: Path, callback: LoRAFinetuneCallback, **kwargs) -> pl.Trainer:
    ckpt_path = kwargs.pop("ckpt_path", None)
    trainer = make_trainer(root, callbacks=[callback, *kwargs.pop("callbacks", [])], **{"max_epochs": 1, **kwargs})
    trainer.fit(module, token_data(), ckpt_path=ckpt_path)
    return trainer


# ------------------------------------------------------------------------------------ loading, switching


def test_each_adapter_gives_its_peft_output_when_active(adapters):
    model = serving(adapters)
    assert sorted(adapter_names(model)) == list(NAMES)
    assert active_adapter(model) == "c"  # the newest is active
    assert not any(p.requires_grad for p in model.parameters())  # loaded for serving: all frozen

    attn = model.model.layers[0].self_attn
    assert attn.q_proj.adapter_names == ["a", "c"] and attn.k_proj.adapter_names == ["b"]
    assert (attn.q_proj.spec("a").r, attn.q_proj.spec("a").alpha) == (4, 8)
    assert (attn.q_proj.spec("c").r, attn.q_proj.spec("c").alpha) == (8, 32)  # alpha_pattern
    assert model.model.layers[0].mlp.down_proj.spec("c").r == 3  # rank_pattern
    assert attn.k_proj.spec("b").use_rslora and attn.k_proj.spec("b").scaling == pytest.approx(4 / 2**0.5)
    assert isinstance(model.model.embed_tokens, LoRAEmbedding)

    # PEFT's own multi-adapter model, for the same switching
    theirs = peft.PeftModel.from_pretrained(make_llama(0), adapters.paths["a"], adapter_name="a")
    for name in NAMES[1:]:
        theirs.load_adapter(adapters.paths[name], adapter_name=name)
    theirs.eval()

    for name in ("b", "a", "c", "a", "b"):
        set_active_adapter(model, name)
        theirs.set_adapter(name)
        assert active_adapter(model) == name
        ours = logits(model)
        close(ours, adapters.expected[name])
        close(ours, logits(theirs))


def test_layers_without_the_active_adapter_run_their_base_layer(adapters):
    model = serving(adapters)
    set_active_adapter(model, "b")
    x = torch.randn(3, 32)
    q_proj = model.model.layers[0].self_attn.q_proj  # holds "a" and "c", not "b"
    assert q_proj.active_adapter == "b"
    assert torch.equal(q_proj(x), q_proj.base_layer(x))


def test_loading_trainable_or_marking_trains_exactly_one_adapter(adapters):
    model = serving(adapters, ("a", "b"))
    load_adapter(model, adapters.paths["c"], adapter_name="c", trainable=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model, "c")}

    mark_only_adapters_trainable(model, "a")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(model, "a")}
    assert active_adapter(model) == "c"  # marking trainable does not switch


def test_disable_adapters_runs_the_base_and_restores_afterwards(adapters):
    model = serving(adapters)
    set_active_adapter(model, "a")
    with disable_adapters(model) as same:
        assert same is model
        assert torch.equal(logits(model), adapters.base)
        with disable_adapters(model):  # nested: the inner exit keeps the outer block's state
            assert torch.equal(logits(model), adapters.base)
        assert torch.equal(logits(model), adapters.base)
        set_active_adapter(model, "b")  # switching inside takes effect after the block
        assert torch.equal(logits(model), adapters.base)
    assert not any(layer.disabled for _, layer in lora_layers(model))
    close(logits(model), adapters.expected["b"])

    with pytest.raises(ZeroDivisionError), disable_adapters(model):
        assert torch.equal(logits(model), adapters.base)
        _ = 1 / 0
    assert not any(layer.disabled for _, layer in lora_layers(model))
    assert active_adapter(model) == "b"
    close(logits(model), adapters.expected["b"])


# ------------------------------------------------------------------------------------ training one adapter


def test_training_one_adapter_leaves_the_others_and_the_base_bit_identical(adapters, tmp_path):
    module = serving_module(adapters)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    b_keys = adapter_keys(module, "b")

    trainer = fit(module, tmp_path, LoRAFinetuneCallback(None, adapter_name="b"), max_epochs=2)

    assert active_adapter(module) == "b"
    held = {id(p) for p in optimizer_params(trainer)}
    assert held == {id(p) for p in adapter_parameters(module, "b")}
    assert {n for n, p in module.named_parameters() if p.requires_grad} == {k for k in b_keys}
    after = module.state_dict()
    assert after.keys() == before.keys()
    changed = {key for key in before if not torch.equal(after[key], before[key])}
    assert changed == b_keys  # every tensor of "b" trained; nothing else (other adapters, base) moved

    model = module.model.eval()
    trained = logits(model)
    assert (trained - adapters.expected["b"]).abs().max() > 1e-3
    for name in ("a", "c"):  # the other tasks are served exactly as before
        set_active_adapter(model, name)
        close(logits(model), adapters.expected[name])
    with disable_adapters(model):
        assert torch.equal(logits(model), adapters.base)

    # the trained adapter, alone in its own folder, is what PEFT and a fresh base see
    path = save_adapter(model, tmp_path / "b", adapter_name="b")
    close(logits(serving(Adapters({"b": path}, {}, adapters.base), ("b",))), trained)
    close(logits(peft.PeftModel.from_pretrained(make_llama(0), path).eval()), trained)


def test_a_checkpoint_of_several_adapters_resumes_exactly(adapters, tmp_path):
    def callback():
        return LoRAFinetuneCallback(None, adapter_name="b")

    straight = serving_module(adapters)
    fit(straight, tmp_path / "straight", callback(), max_epochs=2)

    first = serving_module(adapters)
    fit(first, tmp_path / "first", callback(), max_epochs=1, enable_checkpointing=True)
    (ckpt,) = (tmp_path / "first").rglob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert set(checkpoint["state_dict"]) == set(adapter_state_dict(first))  # all three adapters, no base
    assert {k for k in checkpoint["state_dict"] if ".a." in k} == adapter_keys(first, "a")
    assert "lora_config" not in checkpoint  # config=None: nothing to compare on resume

    resumed = serving_module(adapters)
    fit(resumed, tmp_path / "resumed", callback(), max_epochs=2, ckpt_path=ckpt)
    expected, actual = adapter_state_dict(straight), adapter_state_dict(resumed)
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key

    # a module missing one of the checkpoint's adapters cannot take it
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\) in state_dict: .*lora_\w+\.c\b"):
        fit(serving_module(adapters, ("a", "b")), tmp_path / "lacking", callback(), max_epochs=2, ckpt_path=ckpt)


# ------------------------------------------------------------------------------------------ saving, deleting


def test_each_adapter_saves_on_its_own_and_reloads_into_a_fresh_base(adapters, tmp_path):
    model = serving(adapters)
    for name in NAMES:
        path = save_adapter(model, tmp_path / name, adapter_name=name)
        ours, theirs = load_file(path / WEIGHTS_NAME), load_file(adapters.paths[name] / WEIGHTS_NAME)
        assert ours.keys() == theirs.keys()  # this adapter's tensors only
        for key in theirs:
            assert torch.equal(ours[key], theirs[key]), key

        fresh = make_llama(0)
        load_adapter(fresh, path, adapter_name=name)
        assert adapter_names(fresh) == [name]
        close(logits(fresh), adapters.expected[name])
        close(logits(peft.PeftModel.from_pretrained(make_llama(0), path).eval()), adapters.expected[name])

    set_active_adapter(model, "b")  # without adapter_name, the active adapter is saved
    default = save_adapter(model, tmp_path / "active")
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        assert (default / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_delete_adapter(adapters):
    model = serving(adapters)
    set_active_adapter(model, "c")
    delete_adapter(model, "c")  # the active one: none is active afterwards, the model runs its base
    assert sorted(adapter_names(model)) == ["a", "b"]
    assert active_adapter(model) is None
    assert torch.equal(logits(model), adapters.base)
    assert type(model.model.embed_tokens) is nn.Embedding  # held only "c": the base layer again
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert model.model.layers[0].self_attn.q_proj.adapter_names == ["a"]
    with pytest.raises(KeyError, match="'c'"):
        set_active_adapter(model, "c")

    set_active_adapter(model, "a")
    close(logits(model), adapters.expected["a"])
    delete_adapter(model, "b")  # not the active one: "a" stays active
    assert active_adapter(model) == "a"
    close(logits(model), adapters.expected["a"])

    load_adapter(model, adapters.paths["c"], adapter_name="c")  # the name is free again
    close(logits(model), adapters.expected["c"])
    delete_adapter(model, "c")
    delete_adapter(model, "a")
    assert not list(lora_layers(model))
    plain = make_llama(0)
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in plain.named_modules()]
    assert model.state_dict().keys() == plain.state_dict().keys()
    assert torch.equal(logits(model), adapters.base)


# ------------------------------------------------------------------------------------------------ errors


def _duplicate_inject(model, adapters):
    inject_lora(model, LoRAConfig(r=2, target_modules=["up_proj"]), "a")


def _disable(model, adapters):
    disable_adapters(model).__enter__()


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda m, ad: set_active_adapter(m, "zzz"), KeyError, "no adapter 'zzz'; it has ['a', 'b']"),
        (lambda m, ad: delete_adapter(m, "zzz"), KeyError, "no adapter 'zzz'; it has ['a', 'b']"),
        (lambda m, ad: save_adapter(m, ad.paths["a"].parent / "z", adapter_name="zzz"), AdapterFormatError, "'zzz'"),
        (_duplicate_inject, TargetError, "already has adapter 'a'"),
        (lambda m, ad: load_adapter(m, ad.paths["c"], adapter_name="a"), AdapterFormatError, "adapter 'a'"),
        (lambda m, ad: load_adapter(m, ad.paths["c"], adapter_name="x.y"), AdapterFormatError, "'x.y'"),
    ],
    ids=[
        "switch_unknown",
        "delete_unknown",
        "save_unknown",
        "inject_duplicate",
        "load_other_modules_under_existing_name",
        "load_bad_name",
    ],
)
def test_errors_name_the_value_and_leave_the_model_untouched(adapters, call, error, fragment):
    model = serving(adapters, ("a", "b"))
    set_active_adapter(model, "a")
    before = snapshot(model)
    with pytest.raises(error) as err:
        call(model, adapters)
    assert fragment in str(err.value), str(err.value)
    assert_unchanged(model, before)
    assert not (adapters.paths["a"].parent / "z").exists()


def test_each_adapter_has_its_own_copy_of_modules_to_save(adapters, tmp_path):
    """modules_to_save as PEFT does it: the original head stays as it was and each adapter trains its own copy,
    switched with the active adapter; an adapter without a copy ("a") and disabled adapters run the original.
    PEFT's own model with both heads loaded is the oracle, and each adapter saves back to the file PEFT wrote."""
    second = peft.get_peft_model(
        make_llama(0), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    )
    perturb_peft_adapter(second, seed=21)
    second.save_pretrained(tmp_path / "head2")
    theirs = peft.PeftModel.from_pretrained(make_llama(0), adapters.paths["head"], adapter_name="head").eval()
    theirs.load_adapter(tmp_path / "head2", adapter_name="head2")

    model = serving(adapters, ("head", "a"))
    load_adapter(model, tmp_path / "head2", adapter_name="head2")
    assert sorted(model.lm_head.modules_to_save) == ["head", "head2"]
    for name in ("head", "head2"):
        set_active_adapter(model, name)
        theirs.set_adapter(name)
        close(logits(model), logits(theirs))
    close(logits(model), logits(second.eval()))
    set_active_adapter(model, "a")
    close(logits(model), adapters.expected["a"])
    with disable_adapters(model):
        close(logits(model), adapters.base)
    for name, path in (("head", adapters.paths["head"]), ("head2", tmp_path / "head2")):
        ours = load_file(save_adapter(model, tmp_path / f"ours-{name}", adapter_name=name) / WEIGHTS_NAME)
        original = load_file(path / WEIGHTS_NAME)
        assert ours.keys() == original.keys()
        assert all(torch.equal(ours[k], original[k]) for k in ours), name


def _merged_model(adapters: Adapters) -> nn.Module:
    """Adapters "a" and "b"; "a" merged into its layers (q_proj, v_proj), "b"'s layers unmerged."""
    model = serving(adapters, ("a", "b"))
    set_active_adapter(model, "a")
    for _, layer in lora_layers(model, "a"):
        layer.merge("a")
    return model


@pytest.mark.parametrize(
    ("call", "error", "fragment"),
    [
        (lambda m, ad: set_active_adapter(m, "b"), RuntimeError, "adapters ['a'] are merged"),
        (_disable, RuntimeError, "adapter 'a' is merged"),
        (lambda m, ad: delete_adapter(m, "a"), RuntimeError, "adapter 'a' is merged"),
        (lambda m, ad: inject_lora(m, LoRAConfig(target_modules=["up_proj"]), "d"), TargetError, "merged"),
        (lambda m, ad: load_adapter(m, ad.paths["c"], adapter_name="c"), AdapterFormatError, "merged"),
        # replacing "b"'s tensors would make "b" active while "a" stays folded into the base
        (lambda m, ad: load_adapter(m, ad.paths["b"], adapter_name="b"), AdapterFormatError, "['a'] are merged"),
    ],
    ids=["switch", "disable", "delete", "inject", "load_new", "reload_unmerged"],
)
def test_merged_adapters_block_changes_and_leave_the_model_untouched(adapters, call, error, fragment):
    model = _merged_model(adapters)
    merged = logits(model)
    close(merged, adapters.expected["a"])
    before = snapshot(model)
    with pytest.raises(error) as err:
        call(model, adapters)
    assert fragment in str(err.value), str(err.value)
    assert_unchanged(model, before)
    for _, layer in lora_layers(model, "a"):
        layer.unmerge()
    set_active_adapter(model, "b")
    close(logits(model), adapters.expected["b"])


@pytest.mark.parametrize(
    ("callback", "fragment"),
    [
        (LoRAFinetuneCallback(None, adapter_name="zzz"), "already has adapter 'zzz'; it has ['a', 'b']"),
        (
            LoRAFinetuneCallback(LoRAConfig(r=8, target_modules=["q_proj", "v_proj"]), adapter_name="a"),
            "already has adapter 'a', with AdapterSpec(r=4",
        ),
    ],
    ids=["unknown", "config_disagrees"],
)
def test_the_callback_refuses_adapters_it_cannot_train(adapters, tmp_path, callback, fragment):
    module = serving_module(adapters, ("a", "b"))
    before = snapshot(module)
    with pytest.raises(ValueError) as err:
        fit(module, tmp_path, callback)
    assert fragment in str(err.value), str(err.value)
    assert_unchanged(module, before)


# --------------------------------------------------------------------------------------------------- LoRA+


class FirstStep(pl.Callback):
    """Each optimized tensor and its gradient right before the first optimizer step, and after it."""

    def __init__(self) -> None:
        self.before: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.after: dict[int, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if not self.before:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.before = {id(p): (p.detach().clone(), p.grad.clone()) for p in params}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not self.after:
            self.after = {id(p): p.detach().clone() for p in pl_module.parameters() if id(p) in self.before}


@pytest.mark.parametrize("scheduled", [False, True], ids=["constant", "step_lr"])
def test_loraplus_trains_the_b_matrices_at_ratio_times_the_lr(adapters, tmp_path, scheduled):
    module = serving_module(adapters)
    callback = LoRAFinetuneCallback(
        None,
        optimizer=partial(torch.optim.SGD, lr=0.1),
        lr_scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5) if scheduled else None,
        adapter_name="b",
        loraplus_lr_ratio=4.0,
    )
    step = FirstStep()
    trainer = fit(module, tmp_path, callback, max_epochs=2, callbacks=[step])

    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)
    a_group, b_group = optimizer.param_groups
    layers = list(lora_layers(module, "b"))
    assert {id(p) for p in a_group["params"]} == {id(layer.factors("b")[0]) for _, layer in layers}
    assert {id(p) for p in b_group["params"]} == {id(layer.factors("b")[1]) for _, layer in layers}
    decay = 0.5**2 if scheduled else 1.0  # two epochs of StepLR
    assert a_group["lr"] == pytest.approx(0.1 * decay) and b_group["lr"] == pytest.approx(0.4 * decay)
    if scheduled:
        (config,) = trainer.lr_scheduler_configs
        assert config.scheduler.base_lrs == pytest.approx([0.1, 0.4])

    # the first SGD step moved each tensor by -lr * grad, with lr * 4 for B
    b_ids = {id(p) for p in b_group["params"]}
    assert step.before.keys() == step.after.keys() == b_ids | {id(p) for p in a_group["params"]}
    for key, (value, grad) in step.before.items():
        lr = 0.4 if key in b_ids else 0.1
        torch.testing.assert_close(step.after[key], value - lr * grad, rtol=1e-6, atol=1e-7)


def test_loraplus_with_an_injected_adapter_leaves_modules_to_save_at_the_base_lr(tmp_path):
    module = MLPModule()
    callback = LoRAFinetuneCallback(
        LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"]),
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        loraplus_lr_ratio=16,
    )
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[callback])
    trainer.fit(module, classification_data())
    a_group, b_group = trainer.optimizers[0].param_groups
    named = {id(p): n for n, p in module.named_parameters()}
    assert sorted(named[id(p)] for p in b_group["params"]) == [
        "net.0.lora_B.default.weight",
        "net.2.lora_B.default.weight",
    ]
    assert sorted(named[id(p)] for p in a_group["params"]) == [
        "net.0.lora_A.default.weight",
        "net.2.lora_A.default.weight",
        "net.4.modules_to_save.default.bias",
        "net.4.modules_to_save.default.weight",
    ]
    assert a_group["lr"] == pytest.approx(1e-3) and b_group["lr"] == pytest.approx(16e-3)


@pytest.mark.parametrize("ratio", [0, -2.0, float("nan"), float("inf"), True, "16", 10**400])
def test_loraplus_ratio_must_be_a_positive_finite_number(ratio):
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=.* must be a positive number"):
        LoRAFinetuneCallback(LoRAConfig(), optimizer=partial(torch.optim.SGD, lr=0.1), loraplus_lr_ratio=ratio)


def test_loraplus_needs_an_optimizer_factory():
    with pytest.raises(ValueError, match=r"loraplus_lr_ratio=\.\.\.\) needs optimizer="):
        LoRAFinetuneCallback(LoRAConfig(), loraplus_lr_ratio=16)


@pytest.mark.parametrize("name", ["", "x.y", 3, None])
def test_the_callbacks_adapter_name_must_be_a_name_without_dots(name):
    with pytest.raises(ValueError, match=rf"adapter_name={name!r}\) must be a non-empty name without dots"):
        LoRAFinetuneCallback(LoRAConfig(), adapter_name=name)

"""``modules_to_save`` as PEFT does it: the original module kept and frozen, a trained copy per adapter switched with
the active adapter, the original under `disable_adapters`, PEFT's file keys, tied weights (SmolLM2-style tied
embedding and head) kept tied by ``ensure_weight_tying`` and re-tied on load, and Lightning checkpoints that hold the
copies, not the originals. PEFT 0.21 is the oracle."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from lora_lightning import (
    AdapterFormatError,
    LoRAConfig,
    LoRAFinetuneCallback,
    ModulesToSave,
    delete_adapter,
    disable_adapters,
    inject_lora,
    load_adapter,
    mark_only_adapters_trainable,
    merge_lora,
    save_adapter,
    set_active_adapter,
    unload_lora,
)
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.models import MLPModule, classification_data, make_trainer, tiny_llama_config
from tests.helpers.peft_models import X, make, peft_config

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
PREFIX = "base_model.model."


def tied_llama():
    """A tiny Llama whose output head is its input embedding (``tie_word_embeddings``, as SmolLM2)."""
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def trained(model) -> None:
    """Move ``model``'s copies (and adapters) off their initial values, as training would."""
    perturb_adapters_(model, scale=0.3)
    generator = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))


def test_the_original_stays_and_each_adapter_trains_its_own_copy():
    model = make("MLP")
    base = model(X)
    original = model.lin1
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"], modules_to_save=["lin1"]), "a")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"], modules_to_save=["lin1"]), "b")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"]), "c")
    wrapper = model.lin1
    assert isinstance(wrapper, ModulesToSave) and wrapper.original_module is original
    assert sorted(wrapper.modules_to_save) == ["a", "b"] and wrapper.modules_to_save["a"] is not original
    assert not any(p.requires_grad for m in (original, *wrapper.modules_to_save.values()) for p in m.parameters())
    mark_only_adapters_trainable(model, "b")  # what the callback does for the adapter it trains
    assert all(p.requires_grad for p in wrapper.modules_to_save["b"].parameters())
    assert not any(p.requires_grad for m in (original, wrapper.modules_to_save["a"]) for p in m.parameters())
    trained(model)
    outputs = {}
    for name in "abc":
        set_active_adapter(model, name)
        assert wrapper.running() is (wrapper.modules_to_save[name] if name != "c" else original)
        assert wrapper.weight is wrapper.running().weight  # attributes are the running module's
        outputs[name] = model(X)
    assert not torch.allclose(outputs["a"], outputs["b"])
    with disable_adapters(model):
        assert torch.equal(model(X), base)
        assert wrapper.running() is original
    delete_adapter(model, "a")
    assert sorted(wrapper.modules_to_save) == ["b"]
    set_active_adapter(model, "b")
    torch.testing.assert_close(merge_lora(model)(X), outputs["b"], rtol=1e-5, atol=1e-5)
    assert model.lin1 is not original and not isinstance(model.lin1, ModulesToSave)  # b's copy took its place


def test_unload_puts_the_original_back():
    model = make("MLP")
    original = model.lin1
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"], modules_to_save=["lin1"]))
    trained(model)
    assert unload_lora(model).lin1 is original


def test_two_adapters_with_heads_give_peft_s_outputs_both_ways(tmp_path):
    """PEFT's own model with two adapters, each with its lin1 copy (its multi-adapter modules_to_save tests)."""
    theirs = peft.get_peft_model(make("MLP"), peft_config({"target_modules": ["lin0"], "modules_to_save": ["lin1"]}))
    theirs.add_adapter("other", peft_config({"target_modules": ["lin0"], "modules_to_save": ["lin1"], "r": 2}))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator))
    theirs.eval().save_pretrained(tmp_path / "peft")  # "default" at the root, "other" in a subfolder
    ours = make("MLP")
    load_adapter(ours, tmp_path / "peft", adapter_name="default")
    load_adapter(ours, tmp_path / "peft" / "other", adapter_name="other")
    for name in ("default", "other"):
        theirs.set_adapter(name)
        set_active_adapter(ours, name)
        with torch.no_grad():
            torch.testing.assert_close(ours(X), theirs(X), rtol=1e-5, atol=1e-5)
        path = save_adapter(ours, tmp_path / f"ours-{name}", adapter_name=name)
        saved = load_file(path / WEIGHTS_NAME)
        assert {f"{PREFIX}lin1.weight", f"{PREFIX}lin1.bias"} <= saved.keys()  # PEFT's keys: the module's own
        back = peft.PeftModel.from_pretrained(make("MLP"), path).eval()
        with torch.no_grad():
            torch.testing.assert_close(back(X), ours(X), rtol=1e-5, atol=1e-5)


TIED = {
    # PEFT's recipe for new tokens on a tied model: both in modules_to_save, copies tied with ensure_weight_tying
    "both_tied": {"modules_to_save": ["embed_tokens", "lm_head"], "ensure_weight_tying": True},
    "embedding_tied": {"modules_to_save": ["embed_tokens"], "ensure_weight_tying": True},
    "both_untied": {"modules_to_save": ["embed_tokens", "lm_head"]},  # PEFT's default: two separate copies
    "embedding_only": {"modules_to_save": ["embed_tokens"]},  # the head keeps the base weight (a warning)
}


@pytest.mark.parametrize("case", list(TIED))
def test_tied_embedding_and_head_both_ways(case, tmp_path):
    kwargs = {"target_modules": ["q_proj"], **TIED[case]}
    theirs = peft.get_peft_model(tied_llama(), peft_config(kwargs))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if ".modules_to_save." in name:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = tied_llama()
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)

    ours = tied_llama()
    if case == "embedding_only":
        with pytest.warns(UserWarning, match=r"weights tied to \['lm_head'\], which keep the base weights"):
            inject_lora(ours, LoRAConfig(r=8, alpha=8, **kwargs))
    else:
        inject_lora(ours, LoRAConfig(r=8, alpha=8, **kwargs))
    copies = ours.model.embed_tokens.modules_to_save["default"], getattr(ours.lm_head, "modules_to_save", {})
    tied = TIED[case].get("ensure_weight_tying", False)
    assert (bool(copies[1]) and copies[1]["default"].weight is copies[0].weight) is tied
    trained(ours)
    expected = logits(ours)
    path = save_adapter(ours, tmp_path / "ours")  # used to fail: safetensors' "Some tensors share memory"
    assert json.loads((path / CONFIG_NAME).read_text())["ensure_weight_tying"] is tied
    back = peft.PeftModel.from_pretrained(tied_llama(), path).eval()
    torch.testing.assert_close(logits(back), expected, rtol=1e-5, atol=1e-5)
    again = tied_llama()
    load_adapter(again, path)
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)
    if tied:  # re-tied on load: one tensor again, which trains as one
        assert (
            again.lm_head.modules_to_save["default"].weight
            is again.model.embed_tokens.modules_to_save["default"].weight
        )


def test_a_file_whose_tied_copies_differ_is_refused(tmp_path):
    ours = tied_llama()
    inject_lora(ours, LoRAConfig(r=8, alpha=8, target_modules=["q_proj"], **TIED["both_tied"]))
    path = save_adapter(ours, tmp_path / "ours")
    tensors = load_file(path / WEIGHTS_NAME)
    tensors[f"{PREFIX}lm_head.weight"] = tensors[f"{PREFIX}lm_head.weight"] + 1.0
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    model = tied_llama()
    before = snapshot(model)
    with pytest.raises(
        AdapterFormatError, match=r"tied in the model \(ensure_weight_tying\), but the file's tensors differ"
    ):
        load_adapter(model, path)
    assert_unchanged(model, before)


def test_checkpoints_hold_the_copy_and_not_the_original(tmp_path):
    """The pruning keeps what trains (the copy) and drops the frozen original, which the fresh module has."""
    module = MLPModule()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    config = LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"])
    trainer = make_trainer(
        tmp_path, max_epochs=1, callbacks=[LoRAFinetuneCallback(config), checkpoints], enable_checkpointing=True
    )
    trainer.fit(module, classification_data())
    state = torch.load(checkpoints.last_model_path, weights_only=True)["state_dict"]
    assert {"net.4.modules_to_save.default.weight", "net.4.modules_to_save.default.bias"} <= state.keys()
    assert not any("original_module" in key or key.startswith("net.4.weight") for key in state)
    assert torch.equal(state["net.4.modules_to_save.default.weight"], module.net[4].modules_to_save["default"].weight)

    fresh = MLPModule()
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[LoRAFinetuneCallback(config)])
    trainer.fit(fresh, classification_data(), ckpt_path=checkpoints.last_model_path)  # restores, trains no step
    for key, tensor in state.items():
        assert torch.equal(fresh.state_dict()[key], tensor), key


def test_a_tied_pair_is_one_tensor_in_a_checkpoint(tmp_path):
    model = tied_llama()
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"], **TIED["both_tied"]))
    state = {k: v for k, v in model.state_dict().items() if ".modules_to_save." in k}
    torch.save(state, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    head, embedding = (loaded[f"{n}.modules_to_save.default.weight"] for n in ("lm_head", "model.embed_tokens"))
    assert head.untyped_storage().data_ptr() == embedding.untyped_storage().data_ptr()


def test_a_lora_layer_cannot_also_be_trained_in_full():
    model = make("MLP")
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0", "lin1"]), "a")
    before = snapshot(model)
    with warnings.catch_warnings(), pytest.raises(ValueError, match=r"'lin1' would take modules_to_save and LoRA"):
        warnings.simplefilter("ignore")
        inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["lin0"], modules_to_save=["lin1"]), "b")
    assert_unchanged(model, before)

"""save_adapter / load_adapter: round trips, the PEFT on-disk format, PEFT itself as the oracle, and errors."""

from __future__ import annotations

import ctypes
import json
import pickle
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora_lightning.config as lora_config
from lora_lightning import (
    AdapterFormatError,
    AdapterSpec,
    LoRAConfig,
    LoRAFinetuneCallback,
    LoRALinear,
    SafeCheckpointIO,
    adapter_state_dict,
    inject_lora,
    load_adapter,
    save_adapter,
)
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import (
    adapted_mlp,
    assert_unchanged,
    folder_bytes,
    leftovers,
    perturb_lora_b_,
    perturb_peft_adapter,
    snapshot,
)
from tests.helpers.models import LlamaModule, make_llama, make_mlp, make_trainer, tiny_llama_config, token_data

X = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
TOKENS = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
PREFIX = "base_model.model."


# ---------------------------------------------------------------------------------------------- helpers


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    file = path / WEIGHTS_NAME
    save_file(edit(load_file(file)), file, metadata={"format": "pt"})


def adapter_params(layer: LoRALinear) -> list[nn.Parameter]:
    return [layer.lora_A["default"].weight, layer.lora_B["default"].weight]


def llama_names(*leaves: str) -> list[str]:
    return [f"model.layers.{i}.self_attn.{leaf}" for i in range(2) for leaf in leaves]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A saved MLP adapter: LoRA on "0" and "2" (r=4, alpha=8) and the head "4" in modules_to_save."""
    return save_adapter(adapted_mlp(modules_to_save=["4"]), tmp_path / "adapter")


# ----------------------------------------------------------------------------------- round trips (MLP)


@pytest.mark.parametrize("modules_to_save", [None, ["4"]])
def test_round_trip_gives_the_same_outputs_in_a_fresh_base(tmp_path, modules_to_save):
    model = adapted_mlp(modules_to_save=modules_to_save)
    expected = outputs(model)
    assert not torch.allclose(expected, outputs(make_mlp(0)), atol=1e-3), "the adapter must change the outputs"

    path = save_adapter(model, tmp_path / "adapter")
    fresh = make_mlp(0).eval()
    report = load_adapter(fresh, path)

    torch.testing.assert_close(outputs(fresh), expected, rtol=0, atol=0)
    assert report.targets == ["0", "2"]
    assert report.modules_to_save == (modules_to_save or [])
    assert [name for name, _ in lora_layers(fresh)] == ["0", "2"]
    loaded, original = adapter_state_dict(fresh), adapter_state_dict(model)
    assert loaded.keys() == original.keys()
    for key in original:
        assert torch.equal(loaded[key], original[key]), key


@pytest.mark.parametrize("trainable", [False, True])
def test_load_freezes_the_base_and_makes_adapters_trainable_only_on_request(saved, trainable):
    model = make_mlp(0)
    assert all(p.requires_grad for p in model.parameters())
    report = load_adapter(model, saved, trainable=trainable) if trainable else load_adapter(model, saved)

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    adapters = {n for n in flags if ".lora_" in n}
    head = {"4.modules_to_save.default.weight", "4.modules_to_save.default.bias"}  # the copy; the original stays
    assert adapters == {f"{m}.lora_{ab}.default.weight" for m in ("0", "2") for ab in "AB"}
    assert all(flags[n] is trainable for n in adapters | head), flags
    assert not any(flags[n] for n in set(flags) - adapters - head), "the base must stay frozen"
    expected_trainable = sum(p.numel() for n, p in model.named_parameters() if n in adapters | head)
    assert report.params.trainable == (expected_trainable if trainable else 0)


@pytest.mark.parametrize("trainable", [False, True])
def test_load_into_matching_lora_layers_only_copies(saved, trainable):
    expected = outputs(adapted_mlp(modules_to_save=["4"]))
    model = make_mlp(0).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8, modules_to_save=["4"]))  # fresh A, zero B: base outputs
    layers = dict(lora_layers(model))
    assert not torch.allclose(outputs(model), expected, atol=1e-3)

    report = load_adapter(model, saved, trainable=trainable)

    assert dict(lora_layers(model)) == layers  # the very same LoRALinear objects: nothing re-injected
    assert all(not isinstance(layer.base_layer, LoRALinear) for layer in layers.values())
    torch.testing.assert_close(outputs(model), expected, rtol=0, atol=0)
    assert report.targets == ["0", "2"] and report.modules_to_save == ["4"]
    assert all(p.requires_grad is trainable for layer in layers.values() for p in adapter_params(layer))
    assert all(not p.requires_grad for layer in layers.values() for p in layer.base_layer.parameters())


def test_modules_to_save_are_adopted_when_loading_into_existing_lora_layers(saved, tmp_path):
    """The model has the adapter's LoRA layers but was not told about modules_to_save: loading must still
    treat the head as part of the adapter (trainable on request, and saved again), or a load -> save cycle
    silently drops the head."""
    model = make_mlp(0).eval()
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    report = load_adapter(model, saved, trainable=True)
    assert report.modules_to_save == ["4"]
    assert model[4].weight.requires_grad and model[4].bias.requires_grad
    resaved = load_file(save_adapter(model, tmp_path / "again") / WEIGHTS_NAME)
    assert resaved.keys() == load_file(saved / WEIGHTS_NAME).keys()


# ------------------------------------------------------------------------------------------ file format


def test_folder_holds_peft_config_and_safetensors_with_only_adapter_tensors(saved):
    model = adapted_mlp(modules_to_save=["4"])  # the same adapter as the fixture's
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]

    text = (saved / CONFIG_NAME).read_text()
    config = json.loads(text)
    assert list(config) == sorted(config), "keys must be sorted"
    required = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["0", "2"],
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "modules_to_save": ["4"],
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "base_model_name_or_path": None,
        "task_type": None,
    }
    assert {key: config.get(key, "<missing>") for key in required} == required

    with safe_open(saved / WEIGHTS_NAME, framework="pt") as file:
        assert file.metadata() == {"format": "pt"}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (safe_open is no dict)
    lora_keys = {f"{PREFIX}{m}.lora_{ab}.weight" for m in ("0", "2") for ab in "AB"}
    assert set(tensors) == lora_keys | {f"{PREFIX}4.weight", f"{PREFIX}4.bias"}
    assert tensors[f"{PREFIX}0.lora_A.weight"].shape == (4, 16)
    assert tensors[f"{PREFIX}0.lora_B.weight"].shape == (32, 4)
    assert tensors[f"{PREFIX}2.lora_A.weight"].shape == (4, 32)
    assert tensors[f"{PREFIX}2.lora_B.weight"].shape == (32, 4)
    assert not any("base_layer" in key for key in tensors), "base weights must not be saved"
    assert torch.equal(tensors[f"{PREFIX}0.lora_B.weight"], model[0].lora_B["default"].weight)
    assert torch.equal(tensors[f"{PREFIX}4.weight"], model[4].weight)


@pytest.mark.parametrize("given", ["org/base-model", Path("/models/base")], ids=["str", "path"])
def test_base_model_name_or_path_is_recorded(tmp_path, given):
    path = save_adapter(adapted_mlp(), tmp_path / "a", base_model_name_or_path=given)
    assert json.loads((path / CONFIG_NAME).read_text())["base_model_name_or_path"] == str(given)


class Holder(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_torch_compile_prefix_is_stripped_on_save_and_mapped_on_load(tmp_path):
    compiled = Holder(torch.compile(make_mlp(0)))  # never run: only the module names matter
    inject_lora(compiled, LoRAConfig(r=4, alpha=8, target_modules=["0", "2"]))
    perturb_lora_b_(compiled)
    assert [name for name, _ in lora_layers(compiled)] == ["body._orig_mod.0", "body._orig_mod.2"]
    path = save_adapter(compiled, tmp_path / "adapter")

    keys = set(load_file(path / WEIGHTS_NAME))
    assert keys == {f"{PREFIX}body.{m}.lora_{ab}.weight" for m in ("0", "2") for ab in "AB"}
    assert json.loads((path / CONFIG_NAME).read_text())["target_modules"] == ["body.0", "body.2"]

    expected = outputs(compiled.body._orig_mod.eval())
    plain = Holder(make_mlp(0)).eval()
    load_adapter(plain, path)
    torch.testing.assert_close(outputs(plain), expected, rtol=0, atol=0)

    recompiled = Holder(torch.compile(make_mlp(0)))
    load_adapter(recompiled, path)
    assert [name for name, _ in lora_layers(recompiled)] == ["body._orig_mod.0", "body._orig_mod.2"]
    torch.testing.assert_close(outputs(recompiled.body._orig_mod.eval()), expected, rtol=0, atol=0)


def test_module_names_merely_containing_orig_mod_are_kept(tmp_path):
    model = nn.Sequential()
    model.add_module("proj_orig_mod", nn.Linear(16, 8))
    model.add_module("head", nn.Linear(8, 4))
    inject_lora(model, LoRAConfig(r=2, alpha=4, target_modules=["proj_orig_mod"]))
    perturb_lora_b_(model)
    path = save_adapter(model, tmp_path / "adapter")
    assert set(load_file(path / WEIGHTS_NAME)) == {f"{PREFIX}proj_orig_mod.lora_{ab}.weight" for ab in "AB"}


# --------------------------------------------------------------------------------- PEFT as the oracle


def test_peft_loads_an_adapter_trained_through_lightning(tmp_path):
    peft = pytest.importorskip("peft")
    module = LlamaModule(seed=0).train()
    callback = LoRAFinetuneCallback(LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    make_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(module, token_data())
    ours = module.model.eval()
    expected = logits(ours)
    assert (expected - logits(make_llama(0))).abs().max() > 1e-3, "training must have changed the adapters"

    path = save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(make_llama(0), path).eval()

    torch.testing.assert_close(logits(theirs), expected, rtol=1e-5, atol=1e-5)
    their_state = peft.get_peft_model_state_dict(theirs)
    our_file = load_file(path / WEIGHTS_NAME)
    assert their_state.keys() == our_file.keys()
    assert len(our_file) == 2 * 2 * 7  # A and B on 7 linears in each of 2 blocks; lm_head left alone
    for key, tensor in our_file.items():
        assert torch.equal(their_state[key], tensor), key


def test_task_type_tells_peft_which_task_model_to_build(tmp_path):
    peft = pytest.importorskip("peft")
    ours = perturb_lora_b_(inject_llama(make_llama(0))).eval()
    path = save_adapter(ours, tmp_path / "adapter", task_type="CAUSAL_LM")
    assert json.loads((path / CONFIG_NAME).read_text())["task_type"] == "CAUSAL_LM"
    theirs = peft.PeftModel.from_pretrained(make_llama(0), path).eval()
    assert isinstance(theirs, peft.PeftModelForCausalLM)
    torch.testing.assert_close(logits(theirs), logits(ours), rtol=1e-5, atol=1e-5)


def test_an_unknown_task_type_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(AdapterFormatError, match=r"task_type='causal'.*'CAUSAL_LM'"):
        save_adapter(inject_llama(make_llama(0)), tmp_path / "adapter", task_type="causal")
    assert not (tmp_path / "adapter").exists()


def inject_llama(model: nn.Module) -> nn.Module:
    inject_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    return model


@pytest.mark.parametrize(
    "extra",
    [{}, {"use_rslora": True}, {"modules_to_save": ["lm_head"]}],
    ids=["plain", "rslora", "modules_to_save"],
)
def test_load_adapter_reproduces_a_peft_adapter(tmp_path, extra):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **extra)
    theirs = peft.get_peft_model(make_llama(0), config)
    perturb_peft_adapter(theirs, 6)
    theirs.eval()
    expected = logits(theirs)
    assert (expected - logits(make_llama(0))).abs().max() > 1e-3
    theirs.save_pretrained(tmp_path / "peft")

    ours = make_llama(0)
    report = load_adapter(ours, tmp_path / "peft")

    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)
    assert report.targets == llama_names("q_proj", "v_proj")
    assert report.modules_to_save == extra.get("modules_to_save", [])
    scaling = 8 / 2 if extra.get("use_rslora") else 8 / 4
    assert {layer.scaling for _, layer in lora_layers(ours)} == {scaling}

    # and back: what we save from the loaded model is again PEFT's adapter
    path = save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(make_llama(0), path).eval()
    torch.testing.assert_close(logits(again), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_reproduces_a_peft_adapter_whose_rank_exceeds_its_layers(tmp_path):
    """PEFT takes r=48 on 32-wide layers; so do we, with a warning that names them."""
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(make_llama(0), peft.LoraConfig(r=48, lora_alpha=96, target_modules=["q_proj"]))
    perturb_peft_adapter(theirs, 6)
    expected = logits(theirs.eval())
    theirs.save_pretrained(tmp_path / "peft")
    ours = make_llama(0)
    warning = r"r exceeds the smaller side of 2 layer.*'model.layers.0.self_attn.q_proj' r=48 \(32 -> 32\)"
    with pytest.warns(UserWarning, match=warning):
        load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


def test_load_adapter_accepts_peft_sequence_classification_adapters(tmp_path):
    """PEFT's SEQ_CLS task lists modules_to_save=["classifier", "score"]; a Llama classifier has only
    ``score``. PEFT loads such adapters, so must we."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")

    def classifier():
        config = tiny_llama_config(num_labels=3, pad_token_id=0)
        torch.manual_seed(0)
        return transformers.LlamaForSequenceClassification(config).eval()

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")
    theirs = peft.get_peft_model(classifier(), config)
    perturb_peft_adapter(theirs, 6)
    theirs.eval()
    expected = logits(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "score"]

    ours = classifier()
    report = load_adapter(ours, tmp_path / "peft")
    assert report.modules_to_save == ["score"]
    torch.testing.assert_close(logits(ours), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- save errors


def test_save_refuses_a_model_without_lora(tmp_path):
    path = tmp_path / "adapter"
    with pytest.raises(AdapterFormatError, match="save_adapter: the model has no LoRA layers"):
        save_adapter(make_mlp(0), path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_an_existing_folder_without_overwrite(saved):
    before = folder_bytes(saved)
    with pytest.raises(FileExistsError) as err:
        save_adapter(adapted_mlp(noise_seed=9), saved)
    assert str(saved) in str(err.value) and "overwrite=True" in str(err.value)
    assert folder_bytes(saved) == before
    assert leftovers(saved.parent) == []


def test_save_refuses_to_replace_a_file(tmp_path):
    path = tmp_path / "adapter"
    path.write_text("not a folder")
    with pytest.raises(FileExistsError, match="is a file"):
        save_adapter(adapted_mlp(), path, overwrite=True)
    assert path.read_text() == "not a folder"
    assert leftovers(tmp_path) == []


def test_save_refuses_layers_with_different_dropout(tmp_path):
    model = make_mlp(0)
    inject_lora(model, LoRAConfig(r=4, alpha=8))
    model[2] = LoRALinear(model[2].base_layer, AdapterSpec(r=4, alpha=8, dropout=0.1))
    with pytest.raises(NotImplementedError, match="different dropout"):
        save_adapter(model, tmp_path / "adapter")
    assert list(tmp_path.iterdir()) == []


def test_overwrite_replaces_the_folder_and_leaves_no_temporary_folders(saved):
    newer = adapted_mlp(noise_seed=9, modules_to_save=["4"])
    assert save_adapter(newer, saved, overwrite=True) == saved
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert leftovers(saved.parent) == []
    fresh = make_mlp(0).eval()
    load_adapter(fresh, saved)
    torch.testing.assert_close(outputs(fresh), outputs(newer), rtol=0, atol=0)


def test_overwrite_works_without_renameat2(saved, monkeypatch):
    """Where the atomic exchange is unavailable the fallback renames must land in the same place."""

    def no_libc(*args, **kwargs):
        raise OSError("no renameat2 here")

    monkeypatch.setattr(ctypes, "CDLL", no_libc)
    newer = adapted_mlp(noise_seed=9, modules_to_save=["4"])
    save_adapter(newer, saved, overwrite=True)
    assert leftovers(saved.parent) == []
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    fresh = make_mlp(0).eval()
    load_adapter(fresh, saved)
    torch.testing.assert_close(outputs(fresh), outputs(newer), rtol=0, atol=0)


def test_saved_folders_and_files_have_the_permissions_of_any_new_ones(tmp_path):
    """A 0700 folder (what tempfile.mkdtemp makes) or a 0600 tensors file (what safetensors' own writer makes)
    would hide the adapter from other users and services; checkpoints the same."""
    path = save_adapter(adapted_mlp(), tmp_path / "adapter")
    SafeCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "last.ckpt")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain.txt").write_text("")
    mode = {p.name: p.stat().st_mode & 0o777 for p in (*tmp_path.iterdir(), *path.iterdir())}
    assert mode["adapter"] == mode["plain"]
    assert mode[WEIGHTS_NAME] == mode[CONFIG_NAME] == mode["last.ckpt"] == mode["plain.txt"]


def test_overwrite_keeps_a_model_card_the_user_wrote(saved):
    (saved / "README.md").write_text("# my adapter\n")
    newer = adapted_mlp(noise_seed=9)
    save_adapter(newer, saved, overwrite=True)
    assert (saved / "README.md").read_text() == "# my adapter\n"
    fresh = make_mlp(0).eval()
    load_adapter(fresh, saved)
    torch.testing.assert_close(outputs(fresh), outputs(newer), rtol=0, atol=0)


def test_overwrite_through_a_symlink_replaces_its_target_and_keeps_the_link(saved, tmp_path):
    """It used to swap the link itself for the new folder, report "cannot write" and leave a staging link."""
    link = tmp_path / "latest"
    link.symlink_to(saved, target_is_directory=True)
    newer = adapted_mlp(noise_seed=9)
    assert save_adapter(newer, link, overwrite=True) == link
    assert link.is_symlink() and link.resolve() == saved.resolve()
    fresh = make_mlp(0).eval()
    load_adapter(fresh, link)
    torch.testing.assert_close(outputs(fresh), outputs(newer), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "latest"]


def test_atomicity_smoke_two_overwrites_leave_one_clean_folder(tmp_path):
    path = tmp_path / "run" / "adapter"  # missing parents are created
    first, second = adapted_mlp(noise_seed=7), adapted_mlp(noise_seed=8)
    save_adapter(first, path, overwrite=True)
    save_adapter(second, path, overwrite=True)
    assert [p.name for p in path.parent.iterdir()] == ["adapter"]
    assert leftovers(path.parent) == []
    fresh = make_mlp(0).eval()
    load_adapter(fresh, path)
    torch.testing.assert_close(outputs(fresh), outputs(second), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- load errors


def _rename_module(tensors: dict, old: str, new: str) -> dict:
    return {key.replace(f"{PREFIX}{old}.", f"{PREFIX}{new}."): t for key, t in tensors.items()}


def _truncate(path: Path) -> None:
    file = path / WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _huge_header(path: Path) -> None:
    file = path / WEIGHTS_NAME
    data = file.read_bytes()
    file.write_bytes((10**12).to_bytes(8, "little") + data[8:])


def _flip_header(path: Path) -> None:
    file = path / WEIGHTS_NAME
    data = bytearray(file.read_bytes())
    data[8:24] = b"\xff" * 16
    file.write_bytes(bytes(data))


# Each case breaks the saved folder (and may return another path to load); the message must contain every fragment.
LOAD_ERRORS = {
    "missing_folder": (lambda p: p.parent / "no-such-adapter", ["no-such-adapter", "is not a folder"]),
    "missing_config": (lambda p: (p / CONFIG_NAME).unlink(), ["lacks", CONFIG_NAME]),
    "missing_weights": (lambda p: (p / WEIGHTS_NAME).unlink(), ["lacks", WEIGHTS_NAME]),
    "invalid_json": (lambda p: (p / CONFIG_NAME).write_text('{"r": 4,'), [CONFIG_NAME, "not valid JSON"]),
    "json_not_object": (lambda p: (p / CONFIG_NAME).write_text("[4, 8]"), [CONFIG_NAME, "JSON object"]),
    "wrong_peft_type": (lambda p: edit_config(p, peft_type="IA3"), [CONFIG_NAME, "peft_type='IA3'"]),
    "bad_r": (lambda p: edit_config(p, r=0), [CONFIG_NAME, "r=0"]),
    "dora_without_magnitudes": (
        lambda p: edit_config(p, use_dora=True),
        [WEIGHTS_NAME, "0: only lora_A.weight, lora_B.weight present", "lora_magnitude_vector"],
    ),
    "rank_pattern_disagrees_with_tensors": (
        lambda p: edit_config(p, rank_pattern={"0": 2}),
        [WEIGHTS_NAME, "0.lora_A.weight: shape (4, 16) in the file, the model needs (2, 16)"],
    ),
    "r_disagrees_with_tensors": (
        lambda p: edit_config(p, r=8),
        [WEIGHTS_NAME, "0.lora_A.weight: shape (4, 16) in the file, the model needs (8, 16)"],
    ),
    "truncated": (_truncate, [WEIGHTS_NAME, "not a readable safetensors file"]),
    "huge_header": (_huge_header, [WEIGHTS_NAME, "not a readable safetensors file"]),
    "corrupt_header": (_flip_header, [WEIGHTS_NAME, "not a readable safetensors file"]),
    "not_safetensors": (
        lambda p: (p / WEIGHTS_NAME).write_bytes(b"PK\x03\x04 a zip, say"),
        [WEIGHTS_NAME, "not a readable safetensors file"],
    ),
    "unknown_module": (
        lambda p: edit_tensors(p, lambda t: _rename_module(t, "2", "9")),
        [WEIGHTS_NAME, "9: no such module in the model"],
    ),
    "not_a_linear": (
        lambda p: edit_tensors(p, lambda t: _rename_module(t, "2", "1")),
        [WEIGHTS_NAME, "1: a ReLU, which takes no LoRA"],
    ),
    "key_without_prefix": (
        lambda p: edit_tensors(p, lambda t: {k.removeprefix(PREFIX): v for k, v in t.items()}),
        [WEIGHTS_NAME, "does not start with 'base_model.model.'"],
    ),
    "lora_A_without_B": (
        lambda p: edit_tensors(p, lambda t: {k: v for k, v in t.items() if k != f"{PREFIX}2.lora_B.weight"}),
        [WEIGHTS_NAME, "2: only lora_A.weight present"],
    ),
    "no_lora_tensors": (
        lambda p: edit_tensors(p, lambda t: {k: v for k, v in t.items() if "lora_" not in k}),
        [WEIGHTS_NAME, "holds no lora_A/lora_B tensors"],
    ),
    "base_weight_in_file": (
        lambda p: edit_tensors(p, lambda t: {**t, f"{PREFIX}0.weight": torch.zeros(32, 16)}),
        [WEIGHTS_NAME, "0.weight: neither a LoRA tensor"],
    ),
    "modules_to_save_shape": (
        lambda p: edit_tensors(p, lambda t: {**t, f"{PREFIX}4.weight": torch.zeros(5, 32)}),
        [WEIGHTS_NAME, "4.weight: shape (5, 32) in the file, the model has (4, 32)"],
    ),
    "modules_to_save_missing_from_model": (
        lambda p: (
            edit_config(p, modules_to_save=["classifier"]),
            edit_tensors(p, lambda t: _rename_module(t, "4", "classifier")),
        ),
        [WEIGHTS_NAME, "classifier.weight"],
    ),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_refuses_broken_adapters_and_leaves_the_model_untouched(saved, case):
    breaker, fragments = LOAD_ERRORS[case]
    path = breaker(saved)
    path = path if isinstance(path, Path) else saved
    model = make_mlp(0)
    before = snapshot(model)

    with pytest.raises(AdapterFormatError) as err:
        load_adapter(model, path)

    message = str(err.value)
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert_unchanged(model, before)


class _Payload:
    """Unpickling this creates ``marker``: proof that a loader unpickled the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_load_refuses_pickled_bin_adapters_without_unpickling(saved, tmp_path):
    marker = tmp_path / "unpickled"
    (saved / WEIGHTS_NAME).unlink()
    (saved / "adapter_model.bin").write_bytes(pickle.dumps({"payload": _Payload(marker)}))
    model = make_mlp(0)
    before = snapshot(model)

    with pytest.raises(AdapterFormatError) as err:
        load_adapter(model, saved)

    message = str(err.value)
    assert str(saved) in message and WEIGHTS_NAME in message and ".bin" in message and "refused" in message
    assert not marker.exists(), "the .bin file was unpickled"
    assert_unchanged(model, before)


def test_load_matches_the_files_patterns_against_the_models_module_names_only(saved, monkeypatch):
    """A name from the tensor file that the model lacks is reported, never run through rank_pattern/alpha_pattern
    (a hostile pattern plus a long bogus name used to hang the loader)."""
    edit_config(saved, rank_pattern={"^0$": 4}, alpha_pattern={"2": 8})
    bogus = f"{PREFIX}{'a' * 50}"
    edit_tensors(
        saved, lambda t: {**t, f"{bogus}.lora_A.weight": torch.ones(4, 2), f"{bogus}.lora_B.weight": torch.ones(2, 4)}
    )
    matched = []
    real = lora_config._pattern_value
    monkeypatch.setattr(lora_config, "_pattern_value", lambda p, name, d: matched.append(name) or real(p, name, d))
    model = make_mlp(0)
    with pytest.raises(AdapterFormatError, match=f"{'a' * 50}: no such module in the model"):
        load_adapter(model, saved)
    assert matched and set(matched) <= {name for name, _ in model.named_modules()}


def test_load_refuses_an_adapter_for_another_base(saved):
    wider = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 4))
    before = snapshot(wider)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(wider, saved)
    message = str(err.value)
    assert str(saved / WEIGHTS_NAME) in message and "does not fit this model" in message
    assert "0.lora_B.weight: shape (32, 4) in the file, the model needs (48, 4)" in message
    assert "2.lora_A.weight: shape (4, 32) in the file, the model needs (4, 48)" in message  # all mismatches at once
    assert not list(lora_layers(wider))
    assert_unchanged(wider, before)


@pytest.mark.parametrize(
    ("existing", "fragment"),
    [
        ({"target_modules": ["0"]}, "already has adapter 'default' on 1 modules"),
        ({"r": 2}, "the model's adapter 'default' has AdapterSpec(r=2"),
        ({"alpha": 4}, "alpha=4"),
        ({"use_rslora": True}, "rslora"),
    ],
    ids=["other_targets", "other_r", "other_alpha", "other_rslora"],
)
def test_load_refuses_existing_lora_layers_that_differ(saved, existing, fragment):
    model = adapted_mlp(**{"r": 4, "alpha": 8, **existing})
    before = snapshot(model)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(model, saved)
    assert str(saved) in str(err.value) and fragment in str(err.value), str(err.value)
    assert_unchanged(model, before)


def test_load_refuses_merged_lora_layers(saved):
    """Copying new A/B into a merged layer would leave the old update folded into the base weight."""
    model = adapted_mlp(modules_to_save=["4"], noise_seed=9)
    for _, layer in lora_layers(model):
        layer.merge()
    before = snapshot(model)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(model, saved)
    assert str(saved) in str(err.value) and "merged" in str(err.value), str(err.value)
    assert_unchanged(model, before)


def test_overwrite_refuses_a_folder_with_other_files(tmp_path):
    model = make_mlp()
    inject_lora(model, LoRAConfig(r=2))
    project = tmp_path / "project"
    project.mkdir()
    (project / "train.py").write_text("print('mine')\n")
    with pytest.raises(FileExistsError, match=r"holds other files \['train.py'\]"):
        save_adapter(model, project, overwrite=True)
    assert sorted(p.name for p in project.iterdir()) == ["train.py"]


def test_save_takes_tensors_from_a_gathered_state_dict(tmp_path):
    """What an FSDP strategy gathers on rank 0 (full tensors, wrapper-free keys) is what gets written, while the
    model's own (sharded) tensors only give the structure; a state dict lacking an adapter tensor is refused."""
    model = adapted_mlp(modules_to_save=["4"])
    gathered = {f"_fsdp_wrapped_module.{k}": v + 1.0 for k, v in model.state_dict().items()}
    save_adapter(model, tmp_path / "gathered", state_dict=gathered)
    tensors = load_file(tmp_path / "gathered" / WEIGHTS_NAME)
    assert torch.equal(tensors[f"{PREFIX}0.lora_B.weight"], model[0].lora_B["default"].weight.detach() + 1.0)
    assert torch.equal(tensors[f"{PREFIX}4.bias"], model[4].bias.detach() + 1.0)
    del gathered["_fsdp_wrapped_module.2.lora_A.default.weight"]
    with pytest.raises(AdapterFormatError, match=r"state_dict lacks 1 adapter tensors, e.g. \['2.lora_A.default"):
        save_adapter(model, tmp_path / "partial", state_dict=gathered)
    assert not (tmp_path / "partial").exists()

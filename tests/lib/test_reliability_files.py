"""Untrusted files: adapters load through JSON + safetensors only, checkpoints through the weights-only unpickler,
a pickle payload disguised as either is refused without running, and a fuzzed adapter loader gives only clean
errors. (``.bin`` adapters: tests/lib/test_io.py::test_load_refuses_pickled_bin_adapters_without_unpickling.)
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import struct
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_lightning import (
    AdapterFormatError,
    LoRAConfig,
    LoRAFinetuneCallback,
    SafeCheckpointIO,
    load_adapter,
    save_adapter,
)
from lora_lightning.params import lora_layers
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import adapted_mlp, assert_unchanged, snapshot
from tests.helpers.models import MLPModule, classification_data, make_mlp, make_trainer
from tests.helpers.timeouts import time_limit

CONFIG = LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"])


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def torch_pickle(obj, path: Path) -> Path:
    torch.save(obj, path)  # pickling the payload runs nothing; unpickling would
    return path


def test_the_payload_is_live(tmp_path):
    """Positive control: loading these files the unsafe way does create the marker."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()
    marker.unlink()
    torch.load(torch_pickle({"state_dict": {}, "x": Payload(marker)}, tmp_path / "evil.ckpt"), weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------------- disguised adapters


def raw_pickle(file: Path, marker: Path) -> None:
    file.write_bytes(pickle.dumps({"base_model.model.0.lora_A.weight": Payload(marker)}))


def zip_pickle(file: Path, marker: Path) -> None:
    torch_pickle({"base_model.model.0.lora_A.weight": Payload(marker)}, file)


@pytest.mark.parametrize(
    ("file_name", "disguise", "fragment"),
    [
        (WEIGHTS_NAME, raw_pickle, "not a readable safetensors file"),
        (WEIGHTS_NAME, zip_pickle, "not a readable safetensors file"),
        (CONFIG_NAME, raw_pickle, "not valid JSON"),
    ],
    ids=["pickle_as_safetensors", "torch_zip_as_safetensors", "pickle_as_config"],
)
def test_a_pickle_disguised_as_an_adapter_is_refused_without_running(tmp_path, file_name, disguise, fragment):
    path = save_adapter(adapted_mlp(), tmp_path / "adapter")
    marker = tmp_path / "ran"
    disguise(path / file_name, marker)
    model = make_mlp(0)
    before = snapshot(model)
    with pytest.raises(AdapterFormatError) as err:
        load_adapter(model, path)
    assert str(path / file_name) in str(err.value) and fragment in str(err.value), str(err.value)
    assert not marker.exists(), "the payload ran"
    assert_unchanged(model, before)


# --------------------------------------------------------------------------------- disguised checkpoints


def good_checkpoint(tmp_path: Path) -> Path:
    module = MLPModule()
    trainer = make_trainer(tmp_path / "good", max_epochs=1, callbacks=[LoRAFinetuneCallback(CONFIG)])
    trainer.fit(module, classification_data())
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    return tmp_path / "good.ckpt"


def resume(module: pl.LightningModule, tmp_path: Path, ckpt_path: Path, callbacks=None, **fit_kwargs) -> pl.Trainer:
    callbacks = [LoRAFinetuneCallback(CONFIG)] if callbacks is None else callbacks
    trainer = make_trainer(tmp_path / "resume", max_epochs=2, callbacks=callbacks)
    trainer.fit(module, classification_data(), ckpt_path=ckpt_path, **fit_kwargs)
    return trainer


def base_tensors(module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The module's base parameters under their original names, whether or not LoRA (or modules_to_save) wraps them."""
    return {
        k.replace(".base_layer", "").replace(".original_module", ""): v.clone()
        for k, v in module.state_dict().items()
        if ".lora_" not in k and ".modules_to_save." not in k
    }


@pytest.mark.parametrize("force_unsafe_default", [False, True], ids=["torch_default", "TORCH_FORCE_NO_WEIGHTS_ONLY"])
def test_a_pickle_disguised_as_a_checkpoint_is_refused_without_running(tmp_path, monkeypatch, force_unsafe_default):
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns torch's default (and so Lightning's) back to unpickling
    anything, as on torch < 2.6; the callback's checkpoint IO asks for weights_only=True explicitly."""
    if force_unsafe_default:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    good = good_checkpoint(tmp_path)
    marker = tmp_path / "ran"
    evil = torch_pickle({**torch.load(good, weights_only=True), "extra": Payload(marker)}, tmp_path / "evil.ckpt")
    module = MLPModule()
    before = base_tensors(module)

    with pytest.raises(pickle.UnpicklingError) as err:
        resume(module, tmp_path, evil)

    message = str(err.value)
    assert (
        str(evil) in message and "weights_only=False" in message and "pickled io.open, which could run code" in message
    ), message
    assert not marker.exists(), "the payload ran"
    assert base_tensors(module).keys() == before.keys()
    assert all(torch.equal(base_tensors(module)[k], v) for k, v in before.items())
    assert not (tmp_path / "resume").exists() or not any((tmp_path / "resume").rglob("*.ckpt"))
    # nothing lost: the same module resumes from a good checkpoint afterwards
    assert resume(module, tmp_path, good).global_step == 8


def test_without_the_callback_the_forced_unsafe_default_would_run_the_payload(tmp_path, monkeypatch):
    """The gap the callback closes: plain Lightning under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 unpickles."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    good = good_checkpoint(tmp_path)
    evil = torch_pickle({**torch.load(good, weights_only=True), "extra": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(Exception):  # noqa: B017 (whatever fails after the payload ran)
        resume(MLPModule(), tmp_path, evil, callbacks=[])
    assert marker.exists()


class HParamsModule(MLPModule):
    """Pickles a LoRAConfig object into the checkpoint's hyper_parameters: a trusted but not weights-only file."""

    def __init__(self, lora: LoRAConfig | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()


def test_an_explicit_weights_only_false_is_honoured_for_trusted_files(tmp_path):
    module = HParamsModule(CONFIG)
    trainer = make_trainer(tmp_path / "first", max_epochs=1, callbacks=[LoRAFinetuneCallback(CONFIG)])
    trainer.fit(module, classification_data())
    trainer.save_checkpoint(tmp_path / "hparams.ckpt")
    with pytest.raises(pickle.UnpicklingError, match=r"lora_lightning\.config\.LoRAConfig"):
        resume(HParamsModule(CONFIG), tmp_path, tmp_path / "hparams.ckpt")
    assert resume(HParamsModule(CONFIG), tmp_path, tmp_path / "hparams.ckpt", weights_only=False).global_step == 8


def test_checkpoint_io_stages_next_to_the_target_and_replaces_in_one_step(tmp_path, monkeypatch):
    """Lightning's own save stages in the system temp folder and, across file systems, copies over the
    target in place; ours never writes the target's name until the file is complete."""
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((Path(a), Path(b))), real_replace(a, b)))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    target = tmp_path / "ckpt" / "last.ckpt"
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}}, target)
    SafeCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    assert [(a.parent, b) for a, b in replaced] == [(target.parent, target)] * 2
    assert all(a.name.startswith(".last.ckpt.tmp-") for a, _ in replaced)
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
    assert torch.equal(SafeCheckpointIO().load_checkpoint(target)["state_dict"]["w"], torch.zeros(3))


def test_the_callback_installs_the_safe_io_only_over_lightnings_default(tmp_path):
    class Custom(SafeCheckpointIO):
        pass

    for plugins, expected in (([], SafeCheckpointIO), ([Custom()], Custom)):
        trainer = make_trainer(tmp_path, max_steps=1, plugins=plugins, callbacks=[LoRAFinetuneCallback(CONFIG)])
        trainer.fit(MLPModule(), classification_data())
        assert type(trainer.strategy.checkpoint_io) is expected


# ----------------------------------------------------------------------------------------------- fuzzing


def _template() -> dict[str, bytes]:
    """The two files of a valid adapter (LoRA on "0" and "2", head "4" in modules_to_save): what is mutated."""
    with tempfile.TemporaryDirectory() as folder:
        path = save_adapter(adapted_mlp(modules_to_save=["4"]), Path(folder) / "adapter")
        return {name: (path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}


_BYTES = _template()


def load_mutated(files: dict[str, bytes]) -> None:
    """Write the folder, load it into a fresh base: success, or an AdapterFormatError naming the folder with
    the model untouched. Anything else (another exception, a crash, a hang) fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "adapter"
        path.mkdir()
        for name, data in files.items():
            (path / name).write_bytes(data)
        model = make_mlp(0)
        before = snapshot(model)
        with time_limit(20):
            try:
                report = load_adapter(model, path)
            except AdapterFormatError as err:
                assert str(path) in str(err)
                assert_unchanged(model, before)
                return
        assert report.targets and len(list(lora_layers(model))) == len(report.targets)


FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], database=None
)


@st.composite
def byte_mutations(draw) -> dict[str, bytes]:
    """Truncate, overwrite, insert or delete bytes of one of the two files."""
    name = draw(st.sampled_from(sorted(_BYTES)))
    data = bytearray(_BYTES[name])
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "truncate":
            del data[at:]
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[at : at + draw(st.integers(1, 16))]
    return {**_BYTES, name: bytes(data)}


_KEYS = {  # first the six tensors of the template adapter, then keys that fit nothing
    "base_model.model.0.lora_A.weight": [4, 16],
    "base_model.model.0.lora_B.weight": [32, 4],
    "base_model.model.2.lora_A.weight": [4, 32],
    "base_model.model.2.lora_B.weight": [32, 4],
    "base_model.model.4.weight": [4, 32],
    "base_model.model.4.bias": [4],
    "base_model.model.1.lora_A.weight": [4, 16],
    "base_model.model.1.lora_B.weight": [32, 4],
    "base_model.model.9.lora_A.weight": [4, 8],
    "base_model.model.9.lora_B.weight": [8, 4],
    "base_model.model.0.weight": [32, 16],
    "base_model.model.0.lora_A.weight.x": [4, 16],
    "lora_A.weight": [4, 16],
    "": [1],
}
_ANY_SHAPE = st.lists(st.integers(0, 40), max_size=3)
_SHAPES = [[4, 16], [32, 4], [4, 32], [4], [4, 32, 1], [8, 16], [32, 8]]
_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "C64": 8}


@st.composite
def forged_headers(draw) -> dict[str, bytes]:
    """A safetensors file written by hand: any keys, dtypes and shapes (often the real ones), honest offsets and
    length most of the time, and now and then one forged offset or a wrong length."""
    header: dict[str, object] = {}
    end = 0
    real = list(_KEYS)[:6]  # what the template adapter holds: the model's LoRA pairs and its head
    keys = draw(st.sampled_from([real, real[:4]]) | st.lists(st.sampled_from(list(_KEYS)), min_size=1, max_size=6))
    if draw(st.booleans()):  # complete the A/B pairs, to get past the pairing check
        keys += [k.replace("lora_A", "lora_B") for k in keys if k.endswith(".lora_A.weight")]
    for key in dict.fromkeys(keys):
        dtype = "F32" if draw(st.integers(0, 3)) else draw(st.sampled_from(sorted(_DTYPES)))
        shape = _KEYS[key] if draw(st.integers(0, 3)) else draw(st.sampled_from(_SHAPES) | _ANY_SHAPE)
        size = _DTYPES[dtype] * math.prod(shape)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [end, end + size]}
        end += size
    if draw(st.booleans()):
        header["__metadata__"] = {"format": draw(st.sampled_from(["pt", "np", "x"]))}
    length = end
    forgery = draw(st.sampled_from([None, None, None, "offset", "length"]))
    if forgery == "offset":
        entry = header[draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))]
        entry["data_offsets"][draw(st.integers(0, 1))] = draw(st.integers(-2, 2 * end + 8))
    elif forgery == "length":
        length = draw(st.integers(0, 2 * end + 8))
    text = json.dumps(header).encode()
    body = random.Random(draw(st.integers(0, 2**32))).randbytes(length)
    return {**_BYTES, WEIGHTS_NAME: struct.pack("<Q", len(text)) + text + body}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**400), 10**400) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
_PLAUSIBLE = [0, 1, 2, 4, 8, 64, -1, 0.5, 1.0, 10**400, "LORA", True, False, None, ["4"], ["0"], ["0", "4"], {}, "0"]
_FIELDS = ["peft_type", "r", "lora_alpha", "lora_dropout", "use_rslora", "modules_to_save", "target_modules"]
_FIELDS += ["bias", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern"]


@st.composite
def config_edits(draw) -> dict[str, bytes]:
    """The saved adapter_config.json with some fields replaced by arbitrary JSON values (or removed)."""
    config = json.loads(_BYTES[CONFIG_NAME])
    for field in draw(st.lists(st.sampled_from(_FIELDS), min_size=1, max_size=4, unique=True)):
        if draw(st.integers(0, 5)) == 0:
            config.pop(field, None)
        else:
            config[field] = draw(st.sampled_from(_PLAUSIBLE) | _JSON)
    return {**_BYTES, CONFIG_NAME: json.dumps(config).encode()}


@FUZZ
@given(byte_mutations())
def test_fuzz_byte_mutations_give_clean_errors(files):
    load_mutated(files)


@FUZZ
@given(forged_headers())
def test_fuzz_forged_safetensors_headers_give_clean_errors(files):
    load_mutated(files)


@FUZZ
@given(config_edits())
def test_fuzz_config_fields_give_clean_errors(files):
    load_mutated(files)


@FUZZ
@given(forged_headers(), config_edits())
def test_fuzz_forged_tensors_with_edited_config_give_clean_errors(tensors, config):
    load_mutated({WEIGHTS_NAME: tensors[WEIGHTS_NAME], CONFIG_NAME: config[CONFIG_NAME]})

"""The LoRA rows of PEFT's own custom-model table (``tests/test_custom_models.py`` of huggingface/peft), with PEFT
0.21 as the oracle: each row's adapter, made by PEFT with random A and B as PEFT's tests make it, loads into our
model with PEFT's outputs, gradients, merged outputs and base outputs when disabled; ours, saved, loads into PEFT
with our outputs and PEFT's keys. Rows we refuse are refused by name before anything changes.

PEFT 0.21.2 adds the output projection's update of an ``nn.MultiheadAttention`` twice (open upstream fix,
huggingface/peft#3774); the MHA rows compare with that factor's ``B`` at zero, and `test_mha_adds_each_update_once`
checks our math against the formula. It cannot merge a ``Conv3d`` with a 1x1x1 kernel (fixed upstream): those
rows compare our merge with our unmerged outputs.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_lightning import (
    AdapterFormatError,
    TargetError,
    disable_adapters,
    inject_lora,
    load_adapter,
    merge_lora,
    save_adapter,
)
from lora_lightning.params import named_adapter_tensors
from lora_lightning.peft_format import WEIGHTS_NAME
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.peft_models import REFUSED_DORA, RESEARCH, ROWS, X, make, our_config, peft_config

peft = pytest.importorskip("peft")

PEFT_CANNOT_MERGE = {"Conv3d1x1"}  # PEFT 0.21.2 raises on a 1x1x1 Conv3d merge (fixed upstream)
GROUPED = {"Conv2dGroups", "Conv2dGroups2"}  # nobody can merge these: the update reads across the groups


def run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def theirs_for(row: str) -> nn.Module:
    """PEFT's model of ``row``, random A and B (an MHA's output projection with B = 0, see the module's doc)."""
    model_id, kwargs = ROWS[row]
    theirs = peft.get_peft_model(make(model_id), peft_config(kwargs)).eval()
    if model_id == "MHA":
        with torch.no_grad():
            theirs.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    return theirs


def ours_for(row: str) -> nn.Module:
    """Our model of ``row`` with its adapter injected from our `LoRAConfig`, moved off its initial values."""
    model_id, kwargs = ROWS[row]
    ours = make(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r above a layer's side (rows 3 and "Conv1d")
        inject_lora(ours, our_config(kwargs))
    perturb_adapters_(ours, scale=0.3)
    if model_id == "MHA":
        with torch.no_grad():
            ours.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    with torch.no_grad():
        for key, _, tensor in named_adapter_tensors(ours):
            if "modules_to_save" in key or "trainable_tokens" in key:
                tensor.add_(0.3)  # the copies and rows start as the base's
    return ours.eval()


def grads_by_file_key(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The gradient of every adapter tensor, keyed by its key in a PEFT file (``tensors`` share the parameters'
    storage)."""
    by_storage = {t.data_ptr(): key for key, t in tensors.items()}
    return {by_storage[p.data_ptr()]: p.grad for p in model.parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-table")
    folders = {}
    for index, row in enumerate(ROWS):
        folders[row] = root / f"row{index}"
        theirs_for(row).save_pretrained(folders[row])
    return folders


@pytest.mark.parametrize("row", list(ROWS))
def test_peft_adapter_gives_peft_outputs_gradients_merge_and_base(row, peft_folders):
    model_id, _ = ROWS[row]
    theirs = theirs_for(row)
    expected = run(theirs)
    assert (expected - run(make(model_id))).abs().max() > 1e-3, "the adapter must change the output"

    ours = make(model_id)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        load_adapter(ours, peft_folders[row], trainable=True)
    close(run(ours), expected)

    their_model = peft.PeftModel.from_pretrained(make(model_id), peft_folders[row], is_trainable=True).eval()
    ours(X).sum().backward()
    their_model(X).sum().backward()
    mine = grads_by_file_key(ours, {k: t for _, k, t in named_adapter_tensors(ours)})
    their_tensors = {
        k.removeprefix("base_model.model."): t for k, t in peft.get_peft_model_state_dict(their_model).items()
    }
    theirs_grads = grads_by_file_key(their_model, their_tensors)
    assert mine.keys() == theirs_grads.keys() and mine
    for key, grad in mine.items():
        close(grad, theirs_grads[key])

    with disable_adapters(ours):
        assert torch.equal(run(ours), run(make(model_id)))

    if model_id in GROUPED:
        before = snapshot(ours)
        with pytest.raises(RuntimeError, match=r"groups=\d+: its adapter reads across the groups"):
            merge_lora(ours)
        assert_unchanged(ours, before)
        with pytest.raises(NotImplementedError):
            theirs.merge_and_unload()
        return
    merged = run(merge_lora(copy.deepcopy(ours)))
    close(merged, expected)
    if model_id not in PEFT_CANNOT_MERGE:
        close(merged, run(theirs.merge_and_unload()))


@pytest.mark.parametrize("row", list(ROWS))
def test_our_adapter_loads_in_peft_with_our_outputs_and_peft_s_keys(row, tmp_path):
    model_id, _ = ROWS[row]
    ours = ours_for(row)
    expected = run(ours)
    assert (expected - run(make(model_id))).abs().max() > 1e-3
    path = save_adapter(ours, tmp_path / "ours")

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(missing adapter keys|Unexpected keyword).*")
        theirs = peft.PeftModel.from_pretrained(make(model_id), path).eval()
    close(run(theirs), expected)
    our_file = load_file(path / WEIGHTS_NAME)
    their_state = peft.get_peft_model_state_dict(theirs)
    assert our_file.keys() == their_state.keys()
    assert all(torch.equal(their_state[key], tensor) for key, tensor in our_file.items())
    if model_id not in GROUPED | PEFT_CANNOT_MERGE:
        close(run(merge_lora(ours)), run(theirs.merge_and_unload()))


def test_a_rank_above_a_layer_s_side_warns_naming_the_layer():
    model_id, kwargs = ROWS["Vanilla MLP 3 LoRA"]  # lin1 is 20 -> 2, r = 8
    with pytest.warns(UserWarning, match=r"r exceeds the smaller side of 1 layer.*'lin1' r=8 \(20 -> 2\)"):
        inject_lora(make(model_id), our_config(kwargs))


@pytest.mark.parametrize("row", list(REFUSED_DORA))
def test_dora_on_a_grouped_convolution_is_refused_by_name(row, tmp_path):
    """PEFT normalizes ``B.view(-1, r) @ A.view(r, -1)`` reshaped to the weight's shape there, which is no weight
    of the layer: we refuse, from our config and from PEFT's file, before anything changes."""
    model_id, kwargs = REFUSED_DORA[row]
    model = make(model_id)
    before = snapshot(model)
    with pytest.raises(TargetError, match=r"layer 'conv2d': DoRA on a Conv2d with groups=\d"):
        inject_lora(model, our_config(kwargs))
    peft.get_peft_model(make(model_id), peft_config(kwargs)).save_pretrained(tmp_path / "peft")
    with pytest.raises(AdapterFormatError, match=r"DoRA on a Conv2d with groups=\d"):
        load_adapter(model, tmp_path / "peft")
    assert_unchanged(model, before)


@pytest.mark.parametrize("row", list(RESEARCH))
def test_research_variants_are_refused_by_their_field(row, tmp_path):
    targets, kwargs, fragment = RESEARCH[row]
    built = {k: getattr(peft, v[0])(**v[1]) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    peft.get_peft_model(make("MLP"), peft_config({"target_modules": targets, **built})).save_pretrained(tmp_path)
    model = make("MLP")
    before = snapshot(model)
    with pytest.raises(AdapterFormatError, match=re.escape(fragment)) as error:
        load_adapter(model, tmp_path)
    assert "not implemented" in str(error.value)
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_id", ["MLP", "Conv2d"])
def test_the_table_s_adalora_rows_are_refused_by_their_peft_type(model_id, tmp_path):
    """AdaLoRA is another PEFT method (``peft_type="ADALORA"``), not a LoRA file with extra fields."""
    target = "lin0" if model_id == "MLP" else "conv2d"
    config = peft.AdaLoraConfig(target_modules=[target], total_step=1)
    peft.get_peft_model(make(model_id), config).save_pretrained(tmp_path)
    model = make(model_id)
    before = snapshot(model)
    with pytest.raises(AdapterFormatError, match=r"peft_type='ADALORA': only 'LORA' adapters load"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_mha_adds_each_update_once():
    """Our ``nn.MultiheadAttention`` adapter is ``W_in + s B A`` and ``W_out + s B_o A_o``: the module with those
    weights gives our outputs, merged or not. PEFT 0.21.2 adds ``2 s B_o A_o`` (checked too, so that a fixed PEFT
    shows up here)."""
    ours = make("MHA")
    inject_lora(ours, our_config({"target_modules": ["mha"]}))
    perturb_adapters_(ours, scale=0.3)
    layer, out_proj = ours.mha, ours.mha.base_layer.out_proj
    reference = make("MHA")
    with torch.no_grad():
        reference.mha.in_proj_weight += layer.delta_weight()
        reference.mha.out_proj.weight += out_proj.delta_weight()
    expected = run(reference)
    close(run(ours), expected)
    close(run(merge_lora(copy.deepcopy(ours))), expected)

    theirs = peft.get_peft_model(make("MHA"), peft_config({"target_modules": ["mha"]})).eval()
    mha = theirs.base_model.model.mha
    reference = make("MHA")
    with torch.no_grad():
        reference.mha.in_proj_weight += mha.get_delta_weight("default")
        reference.mha.out_proj.weight += 2 * mha.base_layer.out_proj.get_delta_weight("default")
    if peft.__version__ == "0.21.2":
        close(run(theirs), run(reference))

"""``target_parameters``: LoRA on bare parameters, 2-D and 3-D (fused mixture-of-experts weights, both layouts), two
parameters of one module nested in PEFT's order, per-parameter ranks; PEFT 0.21 as the oracle both ways. What PEFT
refuses with them (dropout, DoRA, lora_bias, a module also in target_modules) is refused before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from lora_lightning import LoRAConfig, LoRAParameter, TargetError, inject_lora, load_adapter, merge_lora, save_adapter
from lora_lightning.peft_format import WEIGHTS_NAME
from tests.helpers.adapters import assert_unchanged, perturb_adapters_, snapshot
from tests.helpers.peft_models import X, make, our_config, peft_config

peft = pytest.importorskip("peft")

PREFIX = "base_model.model."
CASES = {
    "two_experts_parameters": {"target_parameters": ["experts.gate_up", "experts.down"]},
    "with_a_layer_and_a_rank_pattern": {
        "target_modules": ["lin0"],
        "target_parameters": ["down"],
        "r": 2,
        "lora_alpha": 4,
        "rank_pattern": {"experts.down": 3},
    },
}


def moe(transposed: bool = False):
    model = make("MoE")
    model.experts.is_transposed = transposed
    return model


def run(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("transposed", [False, True], ids=["experts_in_out", "transposed"])
@pytest.mark.parametrize("case", list(CASES))
def test_peft_s_expert_adapters_both_ways(case, transposed, tmp_path):
    theirs = peft.get_peft_model(moe(transposed), peft_config(CASES[case])).eval()
    expected = run(theirs)
    assert (expected - run(moe(transposed))).abs().max() > 1e-2
    theirs.save_pretrained(tmp_path / "peft")
    ours = moe(transposed)
    load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        run(merge_lora(copy.deepcopy(ours))), run(theirs.merge_and_unload()), rtol=1e-5, atol=1e-5
    )

    ours = moe(transposed)
    inject_lora(ours, our_config(CASES[case]))
    perturb_adapters_(ours, scale=0.3)
    path = save_adapter(ours, tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(moe(transposed), path).eval()
    torch.testing.assert_close(run(back), run(ours), rtol=1e-5, atol=1e-5)
    assert load_file(path / WEIGHTS_NAME).keys() == peft.get_peft_model_state_dict(back).keys()


def test_two_parameters_of_one_module_nest_in_the_order_the_module_registers_them():
    model = moe()
    report = inject_lora(model, our_config({"target_parameters": ["experts.down", "experts.gate_up"]}))
    assert report.parameters == ["experts.gate_up", "experts.down"] and report.targets == []
    outer, inner = model.experts, model.experts.base_layer
    assert isinstance(outer, LoRAParameter) and isinstance(inner, LoRAParameter)
    assert (inner.parameter_name, outer.parameter_name) == ("gate_up", "down")  # gate_up is registered first
    experts, rank = 3, 8
    assert inner.lora_A["default"].weight.shape == (rank * experts, 12)  # gate_up [E, 10, 12]: in = 12
    assert inner.lora_B["default"].weight.shape == (10, rank * experts)


def test_a_3d_parameter_gets_one_update_per_expert_with_b_s_columns_interleaved():
    """``ΔP[e] = s B[:, e::E] A[e r:(e + 1) r]`` (PEFT's layout), checked expert by expert."""
    model = moe()
    inject_lora(model, our_config({"target_parameters": ["experts.down"], "r": 2, "lora_alpha": 4}))
    perturb_adapters_(model, scale=0.3)
    layer = model.experts
    a, b = (w.detach() for w in layer.factors("default"))
    delta = layer.delta_weight()
    for expert in range(3):
        expected = 2.0 * b[:, expert::3] @ a[2 * expert : 2 * expert + 2]
        torch.testing.assert_close(delta[expert], expected, rtol=1e-6, atol=1e-6)
    base = make("MoE")
    with torch.no_grad():
        base.experts.down += delta
    torch.testing.assert_close(run(model), run(base), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"target_parameters": ["experts.down"], "dropout": 0.1}, "target_parameters with dropout=0.1"),
        ({"target_parameters": ["experts.down"], "use_dora": True}, "target_parameters with use_dora=True"),
        ({"target_parameters": ["experts.down"], "lora_bias": True}, "target_parameters with lora_bias=True"),
        ({"target_parameters": "experts.down"}, "no regex, as in PEFT"),
    ],
)
def test_what_peft_refuses_with_parameters_is_refused_by_the_config(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        LoRAConfig(target_modules=None, **config)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"target_modules": ["lin1"], "target_parameters": ["lin1.weight"]}, "adapted by target_modules too"),
        ({"target_modules": None, "target_parameters": ["experts.nothing"]}, "match no parameter"),
        ({"target_modules": None, "target_parameters": ["experts.down"], "init": "pissa"}, "linear layers only"),
    ],
)
def test_parameters_that_cannot_take_an_adapter_are_refused_before_any_change(config, fragment):
    model = moe()
    before = snapshot(model)
    with pytest.raises(TargetError, match=fragment):
        inject_lora(model, LoRAConfig(**config))
    assert_unchanged(model, before)


def test_a_second_adapter_joins_the_same_wrappers():
    model = moe()
    config = our_config({"target_parameters": ["experts.gate_up", "experts.down"]})
    inject_lora(model, config, "a")
    inject_lora(model, config, "b")
    assert sorted(model.experts.adapter_names) == ["a", "b"] == sorted(model.experts.base_layer.adapter_names)
    assert not isinstance(model.experts.base_layer.base_layer, LoRAParameter)

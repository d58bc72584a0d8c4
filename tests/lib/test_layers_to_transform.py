"""``layers_to_transform``/``layers_pattern`` select the same layers as PEFT 0.21, whose rules we keep: only
``target_modules`` entries matched as a dotted suffix are filtered (a name listed whole is not), the index is the
first number after the ``layers_pattern`` list, or after at least two segments without one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lightning import LoRAConfig, find_targets, inject_lora, load_adapter

peft = pytest.importorskip("peft")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 4)
        self.lin1 = nn.Linear(4, 4)


class Deep(nn.Module):
    """Numbered layers at three depths: ``model.layers.<i>``, top-level ``layers.<i>`` and ``h.<i>``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([Block() for _ in range(3)])
        self.layers = nn.ModuleList([Block() for _ in range(3)])
        self.h = nn.ModuleList([Block() for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in (*self.model.layers, *self.layers, *self.h):
            x = block.lin1(torch.relu(block.lin0(x)))
        return x


CASES = [
    {"target_modules": ["lin0"], "layers_to_transform": [1]},
    {"target_modules": ["lin0", "layers.0.lin1"], "layers_to_transform": 1},
    {"target_modules": ["lin0"], "layers_to_transform": [0], "layers_pattern": "h"},
    {"target_modules": ["lin0", "lin1"], "layers_to_transform": [0, 2], "layers_pattern": ["layers", "h"]},
    {"target_modules": ["lin1"], "layers_to_transform": [2], "layers_pattern": "lay.rs"},
]


def deep() -> Deep:
    torch.manual_seed(0)
    return Deep()


@pytest.mark.parametrize("kwargs", CASES, ids=range(len(CASES)))
def test_the_selection_is_peft_s(kwargs, tmp_path):
    theirs = peft.get_peft_model(deep(), peft.LoraConfig(**kwargs))
    targeted = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    )
    assert sorted(find_targets(deep(), LoRAConfig(**kwargs))) == targeted
    theirs.save_pretrained(tmp_path)  # the file's keys say which layers: loading keeps the selection
    assert sorted(load_adapter(deep(), tmp_path).targets) == targeted


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"target_modules": "lin0", "layers_to_transform": [0]}, "works with a list of target_modules only"),
        ({"target_modules": ["lin0"], "layers_pattern": "layers"}, "needs layers_to_transform"),
        ({"target_modules": ["lin0"], "layers_to_transform": [-1]}, "must be a layer index or a list of them"),
        ({"target_modules": ["lin0"], "layers_to_transform": [0], "layers_pattern": "(a+)+"}, "repeats a repetition"),
    ],
)
def test_what_peft_refuses_is_refused_by_the_config(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace("+", r"\+")):
        LoRAConfig(**kwargs)


def test_a_selection_that_keeps_nothing_is_refused():
    with pytest.raises(
        ValueError, match=r"layers_to_transform=\[0\] \(layers_pattern='model'\) keeps none of the 8 layers"
    ):
        inject_lora(deep(), LoRAConfig(target_modules=["lin0"], layers_to_transform=[0], layers_pattern="model"))

import math
import re

import pytest

from lora_lightning import LoRAConfig
from lora_lightning.modules import regex_problem


def test_defaults_and_scaling():
    config = LoRAConfig()
    assert (config.r, config.alpha, config.target_modules) == (8, 16.0, "all-linear")
    assert config.scaling == 2.0
    assert LoRAConfig(r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / math.sqrt(16))


def test_sequences_become_lists_and_round_trip():
    config = LoRAConfig(target_modules=("q_proj", "v_proj"), modules_to_save=("classifier",))
    assert config.target_modules == ["q_proj", "v_proj"]
    assert LoRAConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"r": 0}, "r=0"),
        ({"r": -4}, "r=-4"),
        ({"r": 4.0}, "r=4.0"),
        ({"r": True}, "r=True"),
        ({"alpha": 0}, "alpha=0"),
        ({"alpha": float("inf")}, "alpha=inf"),
        ({"alpha": "16"}, "alpha='16'"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"dropout": -0.1}, "dropout=-0.1"),
        ({"target_modules": []}, "target_modules=[]"),
        ({"target_modules": ""}, "target_modules=''"),
        ({"target_modules": None}, "target_modules=None"),
        ({"target_modules": ["q_proj", ""]}, "target_modules=['q_proj', '']"),
        ({"target_modules": "q_proj(("}, "not a valid regular expression"),
        ({"exclude_modules": "all-linear"}, "exclude_modules='all-linear'"),
        ({"modules_to_save": "classifier"}, "modules_to_save='classifier'"),
        ({"use_rslora": "yes"}, "use_rslora='yes'"),
    ],
)
def test_invalid_fields_are_named(kwargs, named):
    with pytest.raises(ValueError, match="invalid LoRAConfig") as error:
        LoRAConfig(**kwargs)
    assert named in str(error.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError) as error:
        LoRAConfig(r=0, alpha=-1, dropout=2.0)
    message = str(error.value)
    assert "r=0" in message and "alpha=-1" in message and "dropout=2.0" in message


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown LoRAConfig field\(s\) \['rank'\]"):
        LoRAConfig.from_dict({"rank": 8})


@pytest.mark.parametrize(
    "pattern",
    [
        r"q_proj",
        r".*\.(q|k)_proj",
        r"model\.layers\.\d+\.mlp\..*_proj",
        r"^model\.layers\.0\.q_proj",
        "(?:ab){2,}",
        "[024]",
    ],
)
def test_module_regexes_that_match_in_bounded_time_are_accepted(pattern):
    assert regex_problem(pattern) is None
    assert LoRAConfig(target_modules=pattern, rank_pattern={pattern: 2}).rank_pattern == {pattern: 2}


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("(a+)+$", "repeats a repetition"),
        (r"(\d+\.)*q_proj", "repeats a repetition"),
        ("(a|aa)*b", "repeats an alternation"),
        (r"(q)\1", "uses a backreference"),
        ("(?P<x>q)(?(x)a|b)", "conditional group"),
        (r"\w*\w*\w*\w*!", "has 4 variable-length repetitions"),
        ("(?<=a+)b", "is not a valid regular expression"),
        ("a{99999999999}", "is not a valid regular expression"),
    ],
)
def test_regexes_that_could_hang_a_match_are_refused_everywhere_a_pattern_is_read(pattern, reason):
    """(Nesting deep enough to exhaust the parser's recursion is refused too: "is not a valid regular expression".)"""
    assert reason in regex_problem(pattern)
    for field in ({"target_modules": pattern}, {"exclude_modules": pattern}, {"rank_pattern": {pattern: 2}}):
        with pytest.raises(ValueError, match=re.escape(reason)):
            LoRAConfig(**field)
    assert regex_problem("(" * 5000 + ")" * 5000).startswith("is not a valid regular expression")

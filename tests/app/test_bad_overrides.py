"""Bad values on the command line of the training app: one clear error, and nothing written.

Misspelled keys and mistyped values of the composed config: tests/app/test_conf.py. Here: values of the right type
that `LoRAConfig` refuses, and Hydra's own composition errors, reaching ``train(cfg)`` as
``python scripts/train.py <override>`` would. The library's bad-input table: tests/lib/test_reliability_inputs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from lora_lightning.app.train import train
from tests.helpers.app import compose_train

CASES = {
    "rank_zero": ("lora.r=0", ValueError, ["invalid LoRAConfig", "r=0: the rank must be a positive int, e.g. r=8"]),
    "dropout_out_of_range": (
        "lora.dropout=1.5",
        ValueError,
        ["invalid LoRAConfig", "dropout=1.5: must be a number in [0, 1)"],
    ),
    "exclude_everything": (
        "lora.exclude_modules=all-linear",
        ValueError,
        ["exclude_modules='all-linear' would exclude every layer", "list the layers to skip"],
    ),
    # Hydra's own error at compose time (its cause names lora.modules_to_save): write [classifier]
    "modules_to_save_not_a_list": (
        "lora.modules_to_save=classifier",
        ConfigCompositionException,
        ["lora.modules_to_save=classifier", "str is not a ListConfig, list or tuple"],
    ),
    "unknown_model_option": (
        "model=llama",
        MissingConfigException,
        ["Could not find 'model/llama'", "Available options in 'model'", "tiny_classifier"],
    ),
}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_override_gives_one_clear_error_and_writes_nothing(name, tmp_path):
    override, error, fragments = CASES[name]
    files_before = tree(tmp_path)
    with pytest.raises(error) as err:
        train(compose_train([override], output_dir=tmp_path / "run"))
    message = f"{err.value}\n{err.value.__cause__ or ''}"  # Hydra puts the detail into the cause
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert tree(tmp_path) == files_before, "files changed"

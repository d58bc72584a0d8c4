"""The bad-input table: every mistake gets one clear error that names the argument or file and says what would
work, and leaves the model and the files on disk as they were. docs/reliability.md lists these cases with
the ones tested elsewhere (tests/lib/test_config.py, test_inject.py, test_io.py, test_callback.py).

Each case builds its situation in ``tmp_path`` and returns ``(model, action)``; the harness snapshots the
model and every file under ``tmp_path``, runs ``action``, checks the error's type and message fragments
(``{tmp}`` stands for ``tmp_path``) and compares both snapshots afterwards.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file
from torch import nn

from lora_lightning import (
    AdapterFormatError,
    LoRAConfig,
    LoRAFinetuneCallback,
    TargetError,
    inject_lora,
    load_adapter,
    save_adapter,
)
from lora_lightning.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tests.helpers.adapters import adapted_mlp, assert_unchanged, snapshot
from tests.helpers.models import MLPModule, classification_data, make_llama, make_mlp, make_trainer
from tests.helpers.timeouts import time_limit

CONFIG = LoRAConfig(r=4, alpha=8, modules_to_save=["net.4"])
PREFIX = "base_model.model."


@dataclass(frozen=True)
class Case:
    build: Callable[[Path, pytest.MonkeyPatch], tuple[nn.Module | None, Callable[[], Any]]]
    error: type[BaseException]
    fragments: tuple[str, ...]  # what the message must contain; ``{tmp}`` stands for the test's folder
    # "exact": module tree, tensors and requires_grad unchanged. "base": the callback had injected its adapters
    # at setup before the error (Lightning restores checkpoints after setup); the base weights are unchanged
    # and the same module trains on once the mistake is fixed (see test_the_same_module_trains_after_a_failed_fit).
    model_check: str = "exact"


CASES: dict[str, Case] = {}


def case(error: type[BaseException], *fragments: str, model_check: str = "exact"):
    def register(build):
        CASES[build.__name__] = Case(build, error, fragments, model_check)
        return build

    return register


# -------------------------------------------------------------------------------------- LoRAConfig fields


@case(ValueError, "r='8'", "must be a positive int", "e.g. r=8")
def config_r_is_a_string(tmp, mp):
    return None, lambda: LoRAConfig(r="8")


@case(ValueError, "r=None", "must be a positive int")
def config_r_is_none(tmp, mp):
    return None, lambda: LoRAConfig(r=None)


@case(ValueError, "alpha=nan", "positive finite number", "e.g. alpha=16")
def config_alpha_is_nan(tmp, mp):
    return None, lambda: LoRAConfig(alpha=math.nan)


@case(ValueError, "alpha=1000000", "positive finite number")
def config_alpha_overflows_a_float(tmp, mp):
    return None, lambda: LoRAConfig(alpha=10**400)


@case(ValueError, "dropout='0.1'", "a number in [0, 1)")
def config_dropout_is_a_string(tmp, mp):
    return None, lambda: LoRAConfig(dropout="0.1")


@case(ValueError, "dropout=nan", "a number in [0, 1)")
def config_dropout_is_nan(tmp, mp):
    return None, lambda: LoRAConfig(dropout=math.nan)


@case(ValueError, "target_modules=5", "non-empty list of module names", "regex")
def config_target_modules_is_a_number(tmp, mp):
    return None, lambda: LoRAConfig(target_modules=5)


@case(ValueError, "exclude_modules=[]", "non-empty list")
def config_exclude_modules_is_empty(tmp, mp):
    return None, lambda: LoRAConfig(exclude_modules=[])


@case(
    ValueError, "['lora_alpha', 'lora_dropout']", "did you mean 'alpha' for 'lora_alpha', 'dropout' for 'lora_dropout'"
)
def config_dict_with_peft_key_names(tmp, mp):
    return None, lambda: LoRAConfig.from_dict({"r": 8, "lora_alpha": 16, "lora_dropout": 0.1})


@case(ValueError, "['target_module']", "did you mean 'target_modules' for 'target_module'", "known fields")
def config_dict_with_a_mistyped_key(tmp, mp):
    return None, lambda: LoRAConfig.from_dict({"target_module": ["q_proj"]})


@case(TypeError, "LoRAConfig.from_dict expects a mapping", "['r', 8]")
def config_dict_that_is_a_list(tmp, mp):
    return None, lambda: LoRAConfig.from_dict(["r", 8])


@case(ValueError, "alpha=<int of 16,610 bits>", "positive finite number")
def config_alpha_with_thousands_of_digits(tmp, mp):
    """Python refuses to print an int of more than 4,300 digits: the message used to fail while being built."""
    return None, lambda: LoRAConfig(alpha=10**5000)


@case(ValueError, "init='pissa_niter_1000000000'", "pissa_niter_<k> (k <= 64)")
def config_pissa_with_a_billion_iterations(tmp, mp):
    """Used to pass, then run the randomised SVD that many times on every layer."""
    return None, lambda: LoRAConfig(init="pissa_niter_1000000000")


@case(ValueError, "rank_pattern: key '(a|aa)+$' repeats an alternation", "exponential time")
def config_rank_pattern_that_backtracks(tmp, mp):
    return None, lambda: LoRAConfig(rank_pattern={"(a|aa)+$": 2})


@case(ValueError, "target_modules=", "q_proj' repeats a repetition (like (a+)+)")
def config_target_regex_that_backtracks(tmp, mp):
    return None, lambda: LoRAConfig(target_modules=r"(.*\.)*q_proj")


@case(ValueError, "alpha_pattern: key '(q)", "uses a backreference")
def config_alpha_pattern_with_a_backreference(tmp, mp):
    return None, lambda: LoRAConfig(alpha_pattern={r"(q)\1": 4})


@case(ValueError, "rank_pattern: key '.*a.*b.*c.*d' has 4 variable-length repetitions; at most 3")
def config_rank_pattern_with_four_wildcards(tmp, mp):
    """Polynomial, not exponential, but n^5 on a long module name is still minutes."""
    return None, lambda: LoRAConfig(rank_pattern={".*a.*b.*c.*d": 2})


@case(ValueError, "rank_pattern has 5,000 entries; at most 4,096")
def config_rank_pattern_with_too_many_entries(tmp, mp):
    return None, lambda: LoRAConfig(rank_pattern={f"layer{i}": 2 for i in range(5000)})


# ----------------------------------------------------------------------------------------------- inject_lora


@case(TypeError, "config must be a LoRAConfig, got dict", "LoRAConfig.from_dict(values)")
def inject_with_a_dict_config(tmp, mp):
    model = make_mlp()
    return model, lambda: inject_lora(model, {"r": 8, "alpha": 16})


@case(TypeError, "model must be a torch.nn.Module, got str", "pass the model object itself")
def inject_into_a_string(tmp, mp):
    return None, lambda: inject_lora("meta-llama/Llama-3.2-1B", LoRAConfig())


@case(TargetError, "target_modules: ['proj'] match no module", "adaptable layers: q_proj (x2)")
def inject_with_a_substring_target(tmp, mp):
    """Entries match whole names or dotted suffixes, not substrings: 'proj' is not 'q_proj'."""
    model = make_llama()
    return model, lambda: inject_lora(model, LoRAConfig(target_modules=["proj"]))


@case(TargetError, "unsupported types: ['norm (LayerNorm)']", "supported: nn.Linear", "adaptable layers: head")
def inject_into_a_norm_layer(tmp, mp):
    model = nn.Sequential()
    model.add_module("norm", nn.LayerNorm(8))
    model.add_module("head", nn.Linear(8, 2))
    return model, lambda: inject_lora(model, LoRAConfig(r=2, target_modules=["norm"]))


@case(TargetError, "layer 'conv'", "groups=1, dilation=1 and padding_mode='zeros' only", "'groups': 2")
def inject_into_a_grouped_conv(tmp, mp):
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(4, 8, 3, groups=2))
    model.add_module("head", nn.Linear(8, 2))
    return model, lambda: inject_lora(model, LoRAConfig(r=2, target_modules=["conv"]))


@case(TargetError, "leaves no layer to adapt", "none (the model has no layer of a supported type")
def inject_all_linear_into_a_model_without_adaptable_layers(tmp, mp):
    model = nn.Sequential(nn.LayerNorm(4), nn.ReLU())
    return model, lambda: inject_lora(model, LoRAConfig(r=2))


@case(TargetError, "target_modules='all-linear' leaves no layer to adapt", "adaptable layers: 0, 1")
def inject_all_linear_into_a_model_of_embeddings_and_convs(tmp, mp):
    model = nn.Sequential(nn.Embedding(10, 4), nn.Conv1d(4, 4, 1))
    return model, lambda: inject_lora(model, LoRAConfig(r=2))


@case(TargetError, "the adapters need 448.0 TB on cpu", "'2' r=1000000000000 (256.0 TB)", "lower r (or rank_pattern)")
def inject_a_rank_that_cannot_be_allocated(tmp, mp):
    """A rank above a layer's side only warns, as in PEFT; one whose adapters do not fit in memory is refused."""
    model = make_mlp()
    return model, lambda: inject_lora(model, LoRAConfig(r=10**12))


@case(TargetError, "the adapters need 80.0 TB on cpu", "'emb' r=1000000000000 (80.0 TB)")
def inject_a_huge_pattern_rank_on_an_embedding(tmp, mp):
    """Used to wrap the linear layer, then fail in the allocator on the embedding: a half-changed model."""
    model = nn.Sequential()
    model.add_module("head", nn.Linear(4, 4))
    model.add_module("emb", nn.Embedding(10, 10))
    config = LoRAConfig(r=2, target_modules=["head", "emb"], rank_pattern={"emb": 10**12})
    return model, lambda: inject_lora(model, config)


@case(TargetError, "'conv' r=1000000000000", "TB on cpu")
def inject_a_huge_pattern_rank_on_a_conv(tmp, mp):
    model = nn.Sequential()
    model.add_module("head", nn.Linear(4, 4))
    model.add_module("conv", nn.Conv2d(3, 8, 3))
    config = LoRAConfig(r=2, target_modules=["head", "conv"], rank_pattern={"conv": 10**12})
    return model, lambda: inject_lora(model, config)


@case(TargetError, "layer 'emb': an adapter with r=4611686018427387904 cannot be built")
def inject_a_rank_no_tensor_can_hold(tmp, mp):
    model = nn.Sequential()
    model.add_module("emb", nn.Embedding(10, 4))
    return model, lambda: inject_lora(model, LoRAConfig(r=2**62, target_modules=["emb"]))


@case(TargetError, "layer '0': init='pissa' takes the top r=20 singular directions of a 16 -> 32 weight")
def inject_pissa_with_a_rank_above_the_layer(tmp, mp):
    model = make_mlp()
    return model, lambda: inject_lora(model, LoRAConfig(r=20, init="pissa"))


@case(TargetError, "leaves no layer to adapt", "modules_to_save=['0'] holds ['0']", "trained in full instead")
def inject_targets_that_are_all_in_modules_to_save(tmp, mp):
    model = make_mlp()
    return model, lambda: inject_lora(model, LoRAConfig(target_modules=["0"], modules_to_save=["0"]))


@case(TargetError, "exclude_modules: ['decoder\\\\..*'] match no module")
def inject_with_an_exclude_regex_that_matches_nothing(tmp, mp):
    model = make_mlp()
    return model, lambda: inject_lora(model, LoRAConfig(exclude_modules=r"decoder\..*"))


# ---------------------------------------------------------------------------------------------- load_adapter


def saved_adapter(tmp: Path) -> Path:
    """LoRA on "0" and "2" (r=4, alpha=8), head "4" in modules_to_save."""
    return save_adapter(adapted_mlp(modules_to_save=["4"]), tmp / "adapter")


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    save_file(edit(load_file(path / WEIGHTS_NAME)), path / WEIGHTS_NAME, metadata={"format": "pt"})


def load_into_mlp(tmp: Path, breaker: Callable[[Path], Any]):
    path = saved_adapter(tmp)
    breaker(path)
    model = make_mlp(0)
    return model, lambda: load_adapter(model, path)


@case(AdapterFormatError, "'{tmp}/adapter/adapter_config.json' is not a folder", "expected a PEFT adapter folder")
def load_a_file_instead_of_a_folder(tmp, mp):
    path = saved_adapter(tmp)
    model = make_mlp(0)
    return model, lambda: load_adapter(model, path / CONFIG_NAME)


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "lora_alpha='16': must be a positive finite number")
def load_config_alpha_is_a_string(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, lora_alpha="16"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "r='4': the rank must be a positive int")
def load_config_r_is_a_string(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, r="4"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "lora_dropout=1.5: must be a number in [0, 1)")
def load_config_dropout_out_of_range(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, lora_dropout=1.5))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "use_rslora='false': must be true or false")
def load_config_use_rslora_is_a_string(tmp, mp):
    """bool('false') is True: this used to switch on rank-stabilised scaling silently."""
    return load_into_mlp(tmp, lambda p: edit_config(p, use_rslora="false"))


@case(
    AdapterFormatError,
    "{tmp}/adapter/adapter_config.json",
    "init_lora_weights='loftq': must be one of kaiming, gaussian, pissa, pissa_niter_<k> (k <= 64), olora",
)
def load_config_init_we_do_not_implement(tmp, mp):
    """The file's init is checked by LoRAConfig's own rule (one list of inits), and named by PEFT's key."""
    return load_into_mlp(tmp, lambda p: edit_config(p, init_lora_weights="loftq"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "lora_alpha=nan")
def load_config_alpha_is_nan(tmp, mp):
    return load_into_mlp(
        tmp,
        lambda p: (p / CONFIG_NAME).write_text(
            (p / CONFIG_NAME).read_text().replace('"lora_alpha": 8', '"lora_alpha": NaN')
        ),
    )


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "lora_alpha=1000000", "positive finite number")
def load_config_alpha_overflows_a_float(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, lora_alpha=10**400))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "peft_type=None: only 'LORA' adapters load")
def load_config_without_peft_type(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, peft_type=None))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "peft_type=None", "r=None", "lora_alpha=None")
def load_config_that_is_an_empty_object(tmp, mp):
    return load_into_mlp(tmp, lambda p: (p / CONFIG_NAME).write_text("{}"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "is not valid JSON")
def load_config_that_is_not_text(tmp, mp):
    return load_into_mlp(tmp, lambda p: (p / CONFIG_NAME).write_bytes(b"\xff\xfe\x00\x01"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "is not valid JSON")
def load_config_nested_too_deep(tmp, mp):
    return load_into_mlp(tmp, lambda p: (p / CONFIG_NAME).write_text("[" * 100_000))


@case(AdapterFormatError, "'{tmp}/adapter' lacks ['adapter_config.json']")
def load_config_that_is_a_folder(tmp, mp):
    return load_into_mlp(tmp, lambda p: ((p / CONFIG_NAME).unlink(), (p / CONFIG_NAME).mkdir()))


@case(AdapterFormatError, "{tmp}/adapter/adapter_model.safetensors", "is not a readable safetensors file")
def load_weights_file_empty(tmp, mp):
    return load_into_mlp(tmp, lambda p: (p / WEIGHTS_NAME).write_bytes(b""))


@case(
    AdapterFormatError,
    "{tmp}/adapter/adapter_model.safetensors",
    "0.lora_A.weight: dtype torch.int64",
    "adapters are floats",
)
def load_integer_adapter_tensors(tmp, mp):
    """Used to be cast to float silently."""
    integer = f"{PREFIX}0.lora_A.weight"
    return load_into_mlp(tmp, lambda p: edit_tensors(p, lambda t: {**t, integer: t[integer].long()}))


@case(
    AdapterFormatError,
    "{tmp}/adapter/adapter_model.safetensors",
    "4.bias: dtype torch.int32 in the file, the model has torch.float32",
)
def load_integer_modules_to_save_tensor(tmp, mp):
    bias = f"{PREFIX}4.bias"
    return load_into_mlp(tmp, lambda p: edit_tensors(p, lambda t: {**t, bias: t[bias].int()}))


@case(
    AdapterFormatError,
    "{tmp}/adapter/adapter_model.safetensors",
    "0: has LoRA tensors but is inside modules_to_save entry '0'",
)
def load_a_module_both_adapted_and_saved(tmp, mp):
    """Used to inject LoRA on "2", then crash with AttributeError on "0": a half-changed model."""

    def overlap(path: Path) -> None:
        edit_config(path, modules_to_save=["0", "4"])
        edit_tensors(
            path, lambda t: {**t, f"{PREFIX}0.weight": torch.zeros(32, 16), f"{PREFIX}0.bias": torch.zeros(32)}
        )

    return load_into_mlp(tmp, overlap)


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "rank_pattern: key '(a|aa)+$' repeats an alternation")
def load_a_backtracking_pattern_and_a_bogus_module_name(tmp, mp):
    """Used to run the pattern against the bogus name from the tensor file, for minutes."""

    def hostile(path: Path) -> None:
        edit_config(path, rank_pattern={"(a|aa)+$": 2})
        bogus = f"{PREFIX}{'a' * 60}!"
        edit_tensors(
            path,
            lambda t: {**t, f"{bogus}.lora_A.weight": torch.ones(2, 2), f"{bogus}.lora_B.weight": torch.ones(2, 2)},
        )

    return load_into_mlp(tmp, hostile)


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "init_lora_weights='pissa_niter_1000000000'")
def load_config_pissa_with_a_billion_iterations(tmp, mp):
    return load_into_mlp(tmp, lambda p: edit_config(p, init_lora_weights="pissa_niter_1000000000"))


@case(AdapterFormatError, "{tmp}/adapter/adapter_config.json", "is not valid JSON", "4300")
def load_config_with_an_int_of_thousands_of_digits(tmp, mp):
    """Python's JSON reader refuses ints of more than 4,300 digits with a ValueError that named no file."""
    return load_into_mlp(
        tmp,
        lambda p: (p / CONFIG_NAME).write_text((p / CONFIG_NAME).read_text().replace('"r": 4', '"r": 4' + "0" * 5000)),
    )


@case(AdapterFormatError, "cannot read '{tmp}/adapter/adapter_config.json'", "larger than 16,777,216 bytes")
def load_config_of_seventeen_megabytes(tmp, mp):
    return load_into_mlp(tmp, lambda p: (p / CONFIG_NAME).write_text(" " * 17_000_000 + "{}"))


@case(AdapterFormatError, "'{tmp}/adapter' lacks ['adapter_model.safetensors']")
def load_weights_that_are_a_fifo(tmp, mp):
    """A FIFO is not read (reading one blocks until someone writes to it)."""
    return load_into_mlp(tmp, lambda p: ((p / WEIGHTS_NAME).unlink(), os.mkfifo(p / WEIGHTS_NAME)))


@case(AdapterFormatError, "load_adapter(adapter_name=None): must be a non-empty name without dots")
def load_under_adapter_name_none(tmp, mp):
    path = saved_adapter(tmp)
    model = adapted_mlp()
    return model, lambda: load_adapter(model, path, adapter_name=None)


# ---------------------------------------------------------------------------------------------- save_adapter


def lora_mlp() -> nn.Module:
    return adapted_mlp()


@case(
    NotADirectoryError,
    "save_adapter: cannot write '{tmp}/notes.txt/adapter'",
    "'{tmp}/notes.txt' is a file, not a folder",
)
def save_under_a_file(tmp, mp):
    (tmp / "notes.txt").write_text("mine")
    model = lora_mlp()
    return model, lambda: save_adapter(model, tmp / "notes.txt" / "adapter")


@case(PermissionError, "save_adapter: cannot write '{tmp}/locked/adapter'", "choose a writable folder")
def save_into_a_read_only_folder(tmp, mp):
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").touch()
    except PermissionError:
        pass
    else:
        (locked / "probe").unlink()
        locked.chmod(0o700)
        pytest.skip("this user can write into a read-only folder (root); save_under_a_file covers the path")
    model = lora_mlp()
    return model, lambda: save_adapter(model, locked / "adapter")


@case(TypeError, "save_adapter(base_model_name_or_path=42): must be a str", "got int")
def save_with_a_base_model_name_that_is_a_number(tmp, mp):
    """A Path is taken (as its text); anything else used to fail in json.dumps, naming no argument."""
    model = lora_mlp()
    return model, lambda: save_adapter(model, tmp / "adapter", base_model_name_or_path=42)


@case(AdapterFormatError, "save_adapter(adapter_name=5): must be None (the active adapter) or a non-empty name")
def save_with_an_adapter_name_that_is_a_number(tmp, mp):
    model = lora_mlp()
    return model, lambda: save_adapter(model, tmp / "adapter", adapter_name=5)


# ------------------------------------------------------------------------------------------- the callback


@case(
    TypeError, "LoRAFinetuneCallback(optimizer=...) must be a factory", "got SGD", "functools.partial(torch.optim.AdamW"
)
def callback_given_an_optimizer_instead_of_a_factory(tmp, mp):
    """Used to be accepted, failing only at fit time after injecting."""
    module = MLPModule()
    return module, lambda: LoRAFinetuneCallback(CONFIG, optimizer=torch.optim.SGD(module.parameters(), lr=0.1))


@case(TypeError, "LoRAFinetuneCallback(optimizer=...) must be a factory", "got str")
def callback_given_an_optimizer_name(tmp, mp):
    return None, lambda: LoRAFinetuneCallback(CONFIG, optimizer="adamw")


@case(TypeError, "LoRAFinetuneCallback(lr_scheduler=...) must be a factory", "got int", "lr_scheduler.StepLR")
def callback_given_a_scheduler_that_is_not_callable(tmp, mp):
    return None, lambda: LoRAFinetuneCallback(CONFIG, optimizer=torch.optim.SGD, lr_scheduler=100)


@case(TypeError, "must be a LoRAConfig or None, got DictConfig", "LoRAConfig.from_dict(values)")
def callback_given_a_hydra_config_node(tmp, mp):
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.create({"r": 8, "alpha": 16})
    return None, lambda: LoRAFinetuneCallback(node)


def fit(module: MLPModule, tmp: Path, config: LoRAConfig | None = CONFIG, ckpt_path=None, **kwargs):
    """The action: fit ``module`` for one epoch with the callback (and ``kwargs`` for the Trainer)."""
    callbacks = [LoRAFinetuneCallback(config), *kwargs.pop("callbacks", [])]
    trainer = make_trainer(tmp / "run", **{"max_epochs": 1, **kwargs, "callbacks": callbacks})
    return lambda: trainer.fit(module, classification_data(), ckpt_path=ckpt_path)


@case(TargetError, "target_modules: ['net.9'] match no module", "adaptable layers: net.0, net.2, net.4")
def fit_with_a_target_that_matches_nothing(tmp, mp):
    module = MLPModule()
    return module, fit(module, tmp, LoRAConfig(target_modules=["net.9"]))


@case(TargetError, "modules_to_save: ['classifier'] match no module")
def fit_with_missing_modules_to_save(tmp, mp):
    module = MLPModule()
    return module, fit(module, tmp, LoRAConfig(modules_to_save=["classifier"]))


@case(
    ValueError,
    "already has adapter 'default', with AdapterSpec(r=4, alpha=8",
    "asks for AdapterSpec(r=8, alpha=16",
    "config=None",
)
def fit_with_a_config_that_disagrees_with_existing_adapters(tmp, mp):
    """Injecting twice through the callback: used to train the existing r=4 adapters and ignore r=8 silently."""
    module = MLPModule()
    inject_lora(module, LoRAConfig(r=4, alpha=8))
    return module, fit(module, tmp, LoRAConfig(r=8, alpha=16))


@case(
    NotADirectoryError,
    "ModelCheckpoint(dirpath='{tmp}/notes.txt/ckpt') is not writable",
    "choose a writable folder",
    model_check="base",
)
def fit_with_an_unwritable_checkpoint_folder(tmp, mp):
    """Used to fail at the first save, after the steps before it were spent."""
    (tmp / "notes.txt").write_text("mine")
    module = MLPModule()
    checkpoints = ModelCheckpoint(dirpath=tmp / "notes.txt" / "ckpt")
    return module, fit(module, tmp, callbacks=[checkpoints], enable_checkpointing=True)


@case(FileNotFoundError, "Checkpoint file not found: {tmp}/no-such.ckpt", model_check="base")
def resume_from_a_missing_checkpoint(tmp, mp):
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "no-such.ckpt")


def written_checkpoint(tmp: Path) -> bytes:
    trainer = make_trainer(tmp / "first", max_steps=2, callbacks=[LoRAFinetuneCallback(CONFIG)])
    trainer.fit(MLPModule(), classification_data())
    trainer.save_checkpoint(tmp / "good.ckpt")
    return (tmp / "good.ckpt").read_bytes()


@case(
    OSError,  # torch raises RuntimeError for a truncated file and OSError (EINVAL) through fsspec, as here
    "checkpoint '{tmp}/half.ckpt' is not a readable torch checkpoint (truncated or corrupted?)",
    model_check="base",
)
def resume_from_a_truncated_checkpoint(tmp, mp):
    data = written_checkpoint(tmp)
    (tmp / "half.ckpt").write_bytes(data[: len(data) // 2])
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "half.ckpt")


@case(EOFError, "checkpoint '{tmp}/empty.ckpt' is not a readable torch checkpoint", model_check="base")
def resume_from_an_empty_checkpoint(tmp, mp):
    (tmp / "empty.ckpt").write_bytes(b"")
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "empty.ckpt")


@case(
    pickle.UnpicklingError,
    "checkpoint '{tmp}/noise.ckpt' was refused by the weights-only loader: it is corrupted",
    model_check="base",
)
def resume_from_random_bytes(tmp, mp):
    (tmp / "noise.ckpt").write_bytes(bytes(range(256)) * 4)
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "noise.ckpt")


@case(
    IsADirectoryError,
    "checkpoint '{tmp}/adapter' is a folder",
    "PEFT adapter folder: load it with load_adapter(model, path)",
    model_check="base",
)
def resume_from_an_adapter_folder(tmp, mp):
    saved_adapter(tmp)
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "adapter")


@case(OSError, "checkpoint '{tmp}/pipe.ckpt' is a FIFO", model_check="base")
def resume_from_a_fifo(tmp, mp):
    """Used to block forever, waiting for a writer."""
    os.mkfifo(tmp / "pipe.ckpt")
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=tmp / "pipe.ckpt")


def edited_checkpoint(tmp: Path, edit: Callable[[dict], Any]) -> Path:
    written_checkpoint(tmp)
    checkpoint = torch.load(tmp / "good.ckpt", weights_only=True)
    edit(checkpoint)
    torch.save(checkpoint, tmp / "edited.ckpt")
    return tmp / "edited.ckpt"


@case(ValueError, "the checkpoint's 'lora_config' cannot be read by this version", "'use_qalora'", model_check="base")
def resume_a_checkpoint_whose_config_has_a_newer_field(tmp, mp):
    path = edited_checkpoint(tmp, lambda c: c["lora_config"].update(use_qalora=True))
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=path)


@case(ValueError, "the checkpoint's 'lora_adapters' gives adapter 'default' fields ['use_qalora']", model_check="base")
def resume_a_checkpoint_whose_adapters_have_a_newer_field(tmp, mp):
    path = edited_checkpoint(tmp, lambda c: c["lora_adapters"]["default"]["net.0"].update(use_qalora=True))
    module = MLPModule()
    return module, fit(module, tmp, ckpt_path=path)


@case(
    ValueError,
    "adapter 'default' was trained with other hyperparameters on 2 layer(s)",
    "alpha=8",
    "alpha=16",
    model_check="base",
)
def resume_with_another_alpha_and_no_config(tmp, mp):
    """A checkpoint of LoRAFinetuneCallback(None) used to carry no config: another alpha trained on silently."""
    first = MLPModule()
    inject_lora(first.net, LoRAConfig(r=4, alpha=8))
    trainer = make_trainer(tmp / "first", max_steps=2, callbacks=[LoRAFinetuneCallback(None)])
    trainer.fit(first, classification_data())
    trainer.save_checkpoint(tmp / "none.ckpt")
    module = MLPModule()
    inject_lora(module.net, LoRAConfig(r=4, alpha=16))
    return module, fit(module, tmp, config=None, ckpt_path=tmp / "none.ckpt")


# -------------------------------------------------------------------------------------------------- harness


def tree(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def base_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in module.state_dict().items() if ".lora_" not in k}


def test_the_table_has_at_least_30_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_clear_error_and_changes_nothing(name, tmp_path, monkeypatch):
    bad = CASES[name]
    model, act = bad.build(tmp_path, monkeypatch)
    model_before = snapshot(model) if model is not None else None
    base_before = base_tensors(model) if model is not None else None
    files_before = tree(tmp_path)

    with pytest.raises(bad.error) as err, time_limit(60):
        act()

    message = f"{err.value}\n{err.value.__cause__ or ''}"  # Hydra puts the detail into the cause
    for fragment in bad.fragments:
        assert fragment.format(tmp=tmp_path) in message, f"{fragment!r} not in:\n{message}"
    assert tree(tmp_path) == files_before, "files changed"
    if model is None:
        return
    if bad.model_check == "exact":
        assert_unchanged(model, model_before)
    else:
        assert base_tensors(model).keys() == base_before.keys()
        assert all(torch.equal(base_tensors(model)[k], v) for k, v in base_before.items()), "base weights changed"
        assert getattr(model, "losses", []) == [], "a training step ran before the error"


def test_the_same_module_trains_after_a_failed_fit(tmp_path):
    """A fit that fails after the callback injected (bad checkpoint path) loses nothing: fix the path and the
    same module object fits, from the checkpoint, with the adapters the callback put in."""
    written_checkpoint(tmp_path)
    module = MLPModule()
    with pytest.raises(FileNotFoundError):
        fit(module, tmp_path, ckpt_path=tmp_path / "typo.ckpt")()
    adapters = module.net[0]
    fit(module, tmp_path, ckpt_path=tmp_path / "good.ckpt", max_epochs=2)()
    assert module.net[0] is adapters and module.losses, "the same LoRA layers trained on"

"""The training config's schema, checked before anything is built.

Two layers, both at start-up:

* Structured configs in Hydra's ConfigStore type the top level and the ``lora`` and ``paths`` groups, so a
  misspelled or mistyped key there fails while Hydra composes (``lora.rank=4``: "Key 'rank' not in
  'LoRASchema'"; ``lora.r=four``: "Value 'four' ... could not be converted to Integer"). ``LoRASchema`` is
  derived from `LoRAConfig`'s fields, so the ``lora`` group maps onto it field for field.
* Every other node with a ``_target_`` (model, data, optimizer, scheduler, trainer, loggers, callbacks,
  nested ones too) is checked against its target's signature by `config_problems`: unknown keys (with the
  closest valid name) and values whose type contradicts a plain annotation (int, float, bool, str,
  ``Literal``, or those or ``None``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, List, Literal, Optional  # noqa: UP035 (OmegaConf reads typing generics)

from hydra.core.config_store import ConfigStore
from hydra.utils import get_object
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from lora_lightning.config import LoRAConfig

LORA_TARGET = "lora_lightning.LoRAConfig"
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_recursive_", "_convert_", "_args_"})
PLAIN = (int, float, bool, str)


class ConfigError(ValueError):
    """The composed config cannot run; the message lists every problem."""


def _schema_type(hint: Any) -> Any:
    """The closest type OmegaConf can enforce: a plain type, an Optional one, a list of one; else ``Any``."""
    if hint in PLAIN:
        return hint
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _schema_type(rest[0]) if len(rest) == 1 else Any
        return Optional[inner] if inner is not Any else Any  # noqa: UP045
    if origin is list and len(args) == 1 and args[0] in PLAIN:
        return List[args[0]]  # noqa: UP006
    return Any


def _lora_schema() -> type:
    hints = typing.get_type_hints(LoRAConfig)
    specs: list[tuple[str, Any, Any]] = [("_target_", str, field(default=LORA_TARGET))]
    for spec in dataclasses.fields(LoRAConfig):
        if not spec.init:
            continue
        if spec.default is not dataclasses.MISSING:
            default = spec.default
        elif spec.default_factory is not dataclasses.MISSING:
            default = spec.default_factory()
        else:
            default = MISSING
        value = (
            field(default_factory=lambda d=default: list(d)) if isinstance(default, list) else field(default=default)
        )
        specs.append((spec.name, _schema_type(hints[spec.name]), value))
    return dataclasses.make_dataclass("LoRASchema", specs)


LoRASchema = _lora_schema()


@dataclass
class PathsSchema:
    root_dir: str = "."
    log_dir: str = "logs"
    output_dir: str = MISSING
    cache_dir: Optional[str] = None  # noqa: UP045


@dataclass
class SweepSchema:
    seeds: int = 1  # repeat every trial of a -m grid over this many seeds (seed, seed+1, ...)


@dataclass
class ExportSchema:
    merged: bool = False  # also write the merged model as a transformers folder (<run dir>/merged)


@dataclass
class TrainSchema:
    model: Any = MISSING
    data: Any = MISSING
    lora: LoRASchema = field(default_factory=LoRASchema)  # type: ignore[valid-type]
    optimizer: Any = MISSING
    loraplus_lr_ratio: Optional[float] = None  # noqa: UP045
    quant: Optional[str] = None  # noqa: UP045
    quant_dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    compile: bool = False
    kernels: str = "none"
    scheduler: Any = None
    trainer: Any = MISSING
    logger: Any = None
    callbacks: Any = None
    paths: PathsSchema = field(default_factory=PathsSchema)
    task_name: str = "train"
    seed: Optional[int] = 42  # noqa: UP045
    train: bool = True
    eval_before: bool = True
    eval_after: bool = True
    save_adapter: bool = True
    log_adapter_artifact: bool = False
    optimized_metric: Optional[str] = None  # noqa: UP045
    ckpt_path: Optional[str] = None  # noqa: UP045
    adapter_path: Optional[str] = None  # noqa: UP045
    print_config: bool = True
    tags: List[str] = field(default_factory=list)  # noqa: UP006
    sweep: SweepSchema = field(default_factory=SweepSchema)
    export: ExportSchema = field(default_factory=ExportSchema)


def register() -> None:
    """Put the schema into Hydra's ConfigStore as ``train_schema`` (the primary config extends it)."""
    ConfigStore.instance().store(name="train_schema", node=TrainSchema)


def config_problems(cfg: DictConfig) -> list[str]:
    """Every unknown or mistyped key of a ``_target_`` node, as ``path: message`` lines."""
    problems: list[str] = []
    for key in cfg:
        if key != "hydra":
            _walk(cfg, str(key), problems)
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise `ConfigError` naming every problem `config_problems` finds."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _walk(root: DictConfig, path: str, problems: list[str]) -> None:
    node = OmegaConf.select(root, path, throw_on_resolution_failure=False)
    if isinstance(node, DictConfig):
        if "_target_" in node:
            _check_call(root, path, node, problems)
        for key in node:
            _walk(root, f"{path}.{key}", problems)
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            _walk(root, f"{path}[{index}]", problems)


def _check_call(root: DictConfig, path: str, node: DictConfig, problems: list[str]) -> None:
    target = node._target_
    try:
        obj = get_object(target)
        signature = inspect.signature(obj)
    except Exception as err:  # an unimportable target or a builtin without a signature
        if isinstance(err, ValueError) and "signature" in str(err):
            return
        problems.append(f"{path}._target_={target!r}: cannot import it ({type(err).__name__}: {err})")
        return
    params = {n: p for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    open_ended = any(p.kind == p.VAR_KEYWORD for p in signature.parameters.values())
    hints = _hints(obj)
    for key in node:
        key = str(key)
        if key in HYDRA_KEYS:
            continue
        if key not in params:
            if not open_ended:
                close = (
                    difflib.get_close_matches(key, list(params), n=1)
                    or [p for p in params if len(p) > 1 and (key.startswith(p) or p.startswith(key))][:1]
                )
                hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(params)}"
                problems.append(f"{path}.{key}: unknown key for {target} ({hint})")
            continue
        expected = hints.get(key)
        value = OmegaConf.select(root, f"{path}.{key}", throw_on_resolution_failure=False)
        if expected is not None and not _fits(value, expected):
            problems.append(f"{path}.{key}={value!r}: {target} expects {_type_name(expected)}")


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable forward references: check names only
        return {}


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` contradicts nothing in a plain ``hint``; complex hints are not judged."""
    if value is None or isinstance(value, (DictConfig, ListConfig)):
        return True  # None (or missing): many optionals are typed loosely; nodes: built recursively
    if isinstance(value, str) and "${" in value:
        return True  # an interpolation that cannot be resolved yet (e.g. ${hydra:...})
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if not all(_judgeable(a) for a in args):
            return True
        return any(_fits(value, a) for a in args if a is not type(None))
    if origin is Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _judgeable(hint: Any) -> bool:
    return hint in PLAIN or hint is type(None) or typing.get_origin(hint) is Literal


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")

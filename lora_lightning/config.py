"""`LoRAConfig`: the single source of truth for a LoRA fine-tune's hyperparameters."""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from lora_lightning.modules import regex_problem
from lora_lightning.peft_format import PEFT_KEYS

ALL_LINEAR = "all-linear"
MAX_PISSA_NITER = 64  # randomised-SVD iterations; PEFT's docs use 4 to 16
INITS = ("kaiming", "gaussian", "pissa", f"pissa_niter_<k> (k <= {MAX_PISSA_NITER})", "olora")
_INIT = re.compile(r"kaiming|gaussian|pissa|pissa_niter_([1-9][0-9]{0,2})|olora")
# Bounds on rank_pattern/alpha_pattern: each entry is a regex run against every targeted module's name.
MAX_PATTERN_ENTRIES = 4096
MAX_PATTERN_LENGTH = 1000


@dataclass(frozen=True)
class AdapterSpec:
    """One layer's adapter hyperparameters, resolved from a `LoRAConfig` (patterns applied)."""

    r: int
    alpha: float
    dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "kaiming"

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


@dataclass
class LoRAConfig:
    """Hyperparameters of the low-rank update ``W x + scaling * B A x``.

    Args:
        r: rank of the update (``A`` is ``[r, in]``, ``B`` is ``[out, r]``).
        alpha: scale numerator; ``scaling = alpha / r`` (or ``alpha / sqrt(r)`` with ``use_rslora``).
        dropout: dropout probability on the adapter's input, in ``[0, 1)``.
        target_modules: which layers get adapters: a list of exact module names or dotted suffixes
            (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``), a regular expression matched
            against the full module name, or ``"all-linear"`` (every linear layer except the output head).
        exclude_modules: layers never adapted, in the same forms as ``target_modules``.
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        modules_to_save: modules trained in full beside the adapters (e.g. a new classifier head),
            given as names or dotted suffixes; saved with the adapter.
        use_dora: weight-decomposed LoRA: ``W' = m * (W + s B A) / ||W + s B A||`` with a trainable
            magnitude ``m`` per output channel, initialised to ``||W||`` so the model is unchanged at step 0.
        init: how ``A`` and ``B`` start. ``"kaiming"`` (Kaiming-uniform ``A``, zero ``B``) and ``"gaussian"``
            (``A ~ N(0, 1/r)``, zero ``B``) leave the model unchanged. ``"pissa"`` (exact SVD) or
            ``"pissa_niter_<k>"`` (randomised SVD, k iterations) start ``B A`` at the top-``r`` singular part
            of ``W`` and ``"olora"`` at its QR factors; both subtract ``s B A`` from the base weight, so the
            model is again unchanged. Loading such an adapter repeats the init on the original base first.
        rank_pattern: per-layer ranks, ``{pattern: r}``; a pattern matches a module name or a dotted suffix of
            it as a regular expression (PEFT's rule), the first match wins, unmatched layers use ``r``.
        alpha_pattern: per-layer ``alpha`` in the same form.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.target_modules = _as_names(self.target_modules)
        self.exclude_modules = None if self.exclude_modules is None else _as_names(self.exclude_modules)
        self.modules_to_save = None if self.modules_to_save is None else _as_names(self.modules_to_save)
        self.rank_pattern = _as_dict(self.rank_pattern)
        self.alpha_pattern = _as_dict(self.alpha_pattern)
        problems = list(self._problems())
        if problems:
            raise ValueError("invalid LoRAConfig:\n  - " + "\n  - ".join(problems))

    @property
    def scaling(self) -> float:
        return AdapterSpec(self.r, self.alpha, use_rslora=self.use_rslora).scaling

    def spec_for(self, name: str) -> AdapterSpec:
        """The adapter hyperparameters of the layer called ``name`` (``rank_pattern``/``alpha_pattern`` applied)."""
        return AdapterSpec(
            r=_pattern_value(self.rank_pattern, name, self.r),
            alpha=_pattern_value(self.alpha_pattern, name, self.alpha),
            dropout=self.dropout,
            use_rslora=self.use_rslora,
            use_dora=self.use_dora,
            init=self.init,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        known = sorted(f.name for f in fields(cls))
        if not isinstance(values, Mapping):
            raise TypeError(f"LoRAConfig.from_dict expects a mapping of field names to values, got {_shown(values)}")
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            hints = [f"{_suggest(u, known)!r} for {u!r}" for u in unknown if _suggest(u, known)]
            meant = f"; did you mean {', '.join(hints)}?" if hints else ""
            raise ValueError(f"unknown LoRAConfig field(s) {unknown}{meant}; known fields: {known}")
        return cls(**values)

    def _problems(self) -> Iterable[str]:
        for field in fields(self):
            yield from field_problems(field.name, getattr(self, field.name))
        if self.exclude_modules == ALL_LINEAR:
            yield "exclude_modules='all-linear' would exclude every layer; list the layers to skip instead"


def field_problems(field: str, value: Any, shown_as: str | None = None) -> list[str]:
    """Why ``value`` is not a valid `LoRAConfig` ``field`` (empty if it is), each reason naming the value as
    ``shown_as`` (the field's name by default; e.g. PEFT's key for a value read from ``adapter_config.json``)."""
    return list(_CHECKS[field](shown_as or field, value))


def _check_r(name: str, value: Any) -> Iterable[str]:
    if not _is_int(value) or value <= 0:
        yield f"{name}={_shown(value)}: the rank must be a positive int, e.g. {name}=8"


def _check_alpha(name: str, value: Any) -> Iterable[str]:
    if not _is_positive_finite(value):
        yield f"{name}={_shown(value)}: must be a positive finite number, e.g. {name}=16 (2 * r is common)"


def _check_dropout(name: str, value: Any) -> Iterable[str]:
    if not _is_number(value) or not 0.0 <= value < 1.0:
        yield f"{name}={_shown(value)}: must be a number in [0, 1), e.g. {name}=0.05"


def _check_bool(name: str, value: Any) -> Iterable[str]:
    if not isinstance(value, bool):
        yield f"{name}={_shown(value)}: must be true or false (a bool)"


def _check_init(name: str, value: Any) -> Iterable[str]:
    found = _INIT.fullmatch(value) if isinstance(value, str) else None
    if found is None or int(found.group(1) or 0) > MAX_PISSA_NITER:
        yield f"{name}={_shown(value)}: must be one of {', '.join(INITS)}"


def _check_modules_to_save(name: str, value: Any) -> Iterable[str]:
    yield from _name_problems(name, value, required=False)
    if isinstance(value, str):
        yield f"{name}={_shown(value)}: must be a list of module names, e.g. ['classifier']"


def _pattern_check(is_kind: Any, example: str) -> Any:
    def check(name: str, value: Any) -> Iterable[str]:
        if value is None:
            return
        if not isinstance(value, dict):
            yield f"{name}={_shown(value)}: must be a mapping of module-name patterns to values, e.g. {example}"
            return
        if len(value) > MAX_PATTERN_ENTRIES:
            yield f"{name} has {len(value):,} entries; at most {MAX_PATTERN_ENTRIES:,} are read"
            return
        for key, entry in value.items():
            if not isinstance(key, str) or not key:
                yield f"{name}: key {_shown(key)} must be a non-empty module-name pattern"
                continue
            if len(key) > MAX_PATTERN_LENGTH:
                yield f"{name}: key {_shown(key)} is longer than {MAX_PATTERN_LENGTH} characters"
                continue
            problem = regex_problem(key)
            if problem:
                yield f"{name}: key {_shown(key)} {problem}"
            if not is_kind(entry) or not _is_positive_finite(entry):
                yield f"{name}[{key!r}]={_shown(entry)}: must be {example}"

    return check


# PEFT's names for our fields: the likeliest "mistyped key" from anyone who knows PEFT's LoraConfig.
_PEFT_NAMES = {peft: ours for ours, peft in PEFT_KEYS.items() if peft != ours} | {"rank": "r"}


def _suggest(name: Any, known: list[str]) -> str | None:
    if not isinstance(name, str):
        return None
    if name in _PEFT_NAMES:
        return _PEFT_NAMES[name]
    close = difflib.get_close_matches(name, known, n=1)
    return close[0] if close else None


def _as_names(value: Any) -> Any:
    """Turn any non-string sequence of names (tuple, OmegaConf ListConfig) into a plain list."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        return value
    return list(value)


def _as_dict(value: Any) -> Any:
    """Turn any mapping (OmegaConf DictConfig) into a plain dict; ``{}`` means no pattern."""
    if isinstance(value, Mapping):
        return dict(value) or None
    return value


def _pattern_value(pattern: dict[str, Any] | None, name: str, default: Any) -> Any:
    for key, value in (pattern or {}).items():
        if _pattern_regex(key).match(name):
            return value
    return default


@functools.lru_cache(maxsize=MAX_PATTERN_ENTRIES)
def _pattern_regex(key: str) -> re.Pattern[str]:
    """PEFT's rule: ``key`` matches the whole name or a dotted suffix of it."""
    return re.compile(rf"(.*\.)?({key})$")


def _shown(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a value read from a file can be huge)."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<int of {value.bit_length():,} bits>"
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-4:]}"


def _name_problems(name: str, value: Any, required: bool) -> Iterable[str]:
    if value is None:
        if required:
            yield f"{name}=None: give layer names, a regex or 'all-linear'"
        return
    if isinstance(value, str):
        if not value:
            yield f"{name}='': give layer names, a regex or 'all-linear'"
        elif value != ALL_LINEAR:
            problem = regex_problem(value)
            if problem:
                yield f"{name}={_shown(value)} {problem}"
        return
    if not isinstance(value, list) or not value:
        alternatives = "or a regex string" if required else "a regex string, or None"
        yield f"{name}={_shown(value)}: must be a non-empty list of module names, {alternatives}"
        return
    bad = [v for v in value if not isinstance(v, str) or not v]
    if bad:
        yield f"{name}={_shown(value)}: entries must be non-empty strings, got {_shown(bad)}"


def is_adapter_name(value: Any) -> bool:
    """A usable adapter name: a non-empty string without dots (it becomes one segment of state-dict keys)."""
    return isinstance(value, str) and bool(value) and "." not in value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_finite(value: Any) -> bool:
    """A positive number that is finite as a float (an int too large for a float is not: 10**400)."""
    try:
        return _is_number(value) and 0 < float(value) < math.inf
    except OverflowError:
        return False


_CHECKS = {
    "r": _check_r,
    "alpha": _check_alpha,
    "dropout": _check_dropout,
    "target_modules": lambda name, value: _name_problems(name, value, required=True),
    "exclude_modules": lambda name, value: _name_problems(name, value, required=False),
    "use_rslora": _check_bool,
    "modules_to_save": _check_modules_to_save,
    "use_dora": _check_bool,
    "init": _check_init,
    "rank_pattern": _pattern_check(_is_int, "a positive int, e.g. {'q_proj': 16}"),
    "alpha_pattern": _pattern_check(_is_number, "a positive finite number, e.g. {'q_proj': 32}"),
}

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
from lora_lightning.peft_format import PEFT_KEYS, RESEARCH_FIELDS, RESEARCH_INITS

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
    lora_bias: bool = False

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
            it as a regular expression (PEFT's rule), the first match wins, unmatched layers use ``r``. For
            ``target_parameters`` the pattern is matched against the parameter's name (``experts.gate_up_proj``).
        alpha_pattern: per-layer ``alpha`` in the same form.
        lora_bias: ``B`` gets a trainable bias ``b`` (zero at first): ``y = base(x) + s (B A x + b)``; merging adds
            ``s b`` to the base layer's bias (a layer without one cannot be merged).
        target_parameters: bare parameters that get adapters, by name or dotted suffix (``["experts.down_proj"]``),
            e.g. fused mixture-of-experts weights: ``P' = P + s B A`` for a 2-D ``P`` (``[d0, d1]``), per expert
            for a 3-D one (PEFT's layout). The module's own forward then runs with ``P'``.
        trainable_token_indices: rows of an embedding trained in full (new tokens), the rest frozen:
            ``[ids]`` for the model's input embedding, or ``{module: [ids]}``. A layer whose weight is tied to
            that embedding (an output head) uses the same trained rows.
        layers_to_transform: only layers with these indices (``model.layers.<i>...``) are adapted; applies to
            ``target_modules`` entries that match a dotted suffix, as in PEFT.
        layers_pattern: the name of the layer list whose index ``layers_to_transform`` reads (``"layers"``,
            ``"h"``; a regex), needed when the name has several numbered parts.
        ensure_weight_tying: ``modules_to_save`` also takes the modules tied to a listed one (an output head tied
            to the embeddings), and their copies stay tied; without it each listed module gets its own copy and an
            unlisted tied module keeps the base weight (PEFT's default; a warning says so).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = ALL_LINEAR
    exclude_modules: list[str] | str | None = None
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    use_dora: bool = False
    init: str = "kaiming"
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    lora_bias: bool = False
    target_parameters: list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    ensure_weight_tying: bool = False

    def __post_init__(self) -> None:
        self.target_modules = _as_names(self.target_modules)
        self.exclude_modules = None if self.exclude_modules is None else _as_names(self.exclude_modules)
        self.modules_to_save = None if self.modules_to_save is None else _as_names(self.modules_to_save)
        self.rank_pattern = _as_dict(self.rank_pattern)
        self.alpha_pattern = _as_dict(self.alpha_pattern)
        self.target_parameters = None if self.target_parameters is None else _as_names(self.target_parameters)
        self.trainable_token_indices = _as_indices(self.trainable_token_indices)
        self.layers_to_transform = _none_if_empty(_as_names(self.layers_to_transform))  # []: every layer, as None
        self.layers_pattern = _none_if_empty(_as_names(self.layers_pattern))
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
            lora_bias=self.lora_bias,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoRAConfig:
        known = sorted(f.name for f in fields(cls))
        if not isinstance(values, Mapping):
            raise TypeError(f"LoRAConfig.from_dict expects a mapping of field names to values, got {_shown(values)}")
        unknown = sorted(set(values) - set(known), key=str)
        research = [f"{name!r} ({RESEARCH_FIELDS[name]})" for name in unknown if name in RESEARCH_FIELDS]
        if research:
            raise ValueError(f"{', '.join(research)}: not implemented by lora-lightning; known fields: {known}")
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
        if self.target_modules is None and self.target_parameters is None:
            yield "target_modules=None: give layer names, a regex or 'all-linear' (or target_parameters)"
        if self.layers_to_transform is not None and isinstance(self.target_modules, str):
            yield (
                f"layers_to_transform={_shown(self.layers_to_transform)} works with a list of target_modules only "
                f"(as in PEFT), not with target_modules={_shown(self.target_modules)}"
            )
        if self.layers_pattern is not None and self.layers_to_transform is None:
            yield f"layers_pattern={_shown(self.layers_pattern)} needs layers_to_transform, the indices to adapt"
        if self.lora_bias and self.use_dora:
            yield "lora_bias=True does not combine with use_dora=True (as in PEFT)"
        if self.lora_bias and self.init not in ("kaiming",):
            yield f"lora_bias=True needs init='kaiming' (as in PEFT), not init={self.init!r}"
        if self.target_parameters is not None:
            for field, off in (("dropout", 0.0), ("use_dora", False), ("lora_bias", False)):
                if getattr(self, field) != off:
                    yield (
                        f"target_parameters with {field}={getattr(self, field)!r}: a parameter's adapter is added to "
                        f"the weight itself, which takes no {field} (as in PEFT); use {field}={off!r}"
                    )


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
    if isinstance(value, str) and value in RESEARCH_INITS:
        yield f"{name}={value!r}: {RESEARCH_INITS[value]} init is not implemented; must be one of {', '.join(INITS)}"
    elif found is None or int(found.group(1) or 0) > MAX_PISSA_NITER:
        yield f"{name}={_shown(value)}: must be one of {', '.join(INITS)}"


def _check_target_parameters(name: str, value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield f"{name}={_shown(value)}: must be a list of parameter names (no regex, as in PEFT), e.g. ['experts.w1']"
    else:
        yield from _name_problems(name, value, required=False)


def _check_token_indices(name: str, value: Any) -> Iterable[str]:
    if value is None:
        return
    if not isinstance(value, dict):
        yield from _indices_problems(name, value)
        return
    if not value:
        yield f"{name}={{}}: give token ids, [ids] or {{module: [ids]}}, or None"
    for key, indices in value.items():
        if not isinstance(key, str) or not key:
            yield f"{name}: key {_shown(key)} must be a module name"
        else:
            yield from _indices_problems(f"{name}[{key!r}]", indices)


def _indices_problems(name: str, value: Any) -> Iterable[str]:
    if not isinstance(value, list) or not value or not all(_is_int(i) and i >= 0 for i in value):
        yield f"{name}={_shown(value)}: must be a non-empty list of token ids (ints >= 0), e.g. [0, 10]"
    elif len(set(value)) != len(value):
        yield f"{name}={_shown(value)}: lists a token id twice"


def _check_layers_to_transform(name: str, value: Any) -> Iterable[str]:
    if value is None or (_is_int(value) and value >= 0):
        return
    if not isinstance(value, list) or not all(_is_int(i) and i >= 0 for i in value):
        yield f"{name}={_shown(value)}: must be a layer index or a list of them (ints >= 0), e.g. [0, 1]"


def _check_layers_pattern(name: str, value: Any) -> Iterable[str]:
    entries = [value] if isinstance(value, str) else value
    if value is None:
        return
    if not isinstance(entries, list) or not all(isinstance(e, str) and e for e in entries):
        yield f"{name}={_shown(value)}: must be the name of a layer list or a list of them, e.g. 'layers'"
        return
    for entry in entries:
        problem = regex_problem(entry)
        if problem:
            yield f"{name}: {_shown(entry)} {problem}"


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


def _none_if_empty(value: Any) -> Any:
    return None if value in ([], "") else value


def _as_indices(value: Any) -> Any:
    """``trainable_token_indices`` as plain lists (a dict of them stays a dict)."""
    if isinstance(value, Mapping):
        return {key: _as_names(indices) for key, indices in value.items()}
    return _as_names(value)


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
    "target_modules": lambda name, value: _name_problems(name, value, required=False),
    "exclude_modules": lambda name, value: _name_problems(name, value, required=False),
    "use_rslora": _check_bool,
    "modules_to_save": _check_modules_to_save,
    "use_dora": _check_bool,
    "init": _check_init,
    "rank_pattern": _pattern_check(_is_int, "a positive int, e.g. {'q_proj': 16}"),
    "alpha_pattern": _pattern_check(_is_number, "a positive finite number, e.g. {'q_proj': 32}"),
    "lora_bias": _check_bool,
    "target_parameters": _check_target_parameters,
    "trainable_token_indices": _check_token_indices,
    "layers_to_transform": _check_layers_to_transform,
    "layers_pattern": _check_layers_pattern,
    "ensure_weight_tying": _check_bool,
}

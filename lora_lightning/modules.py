"""A model's submodules by name (names without wrapper segments, containment, matching, replacement), the rule
for regular expressions that select modules, and shadowing a module's method on one instance."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn

try:  # Python 3.11+
    from re import _constants as _c
    from re import _parser as _regex_parser
except ImportError:  # Python 3.10
    import sre_constants as _c
    import sre_parse as _regex_parser

_REPEATS = tuple(op for op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)) if op is not None)

# Segments that wrappers insert into module names (FSDP1, activation checkpointing, ``torch.compile``) and that the
# full state dicts Lightning saves and loads do not carry.
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def canonical_name(name: str) -> str:
    """``name`` with every wrapper segment dropped, e.g.
    ``layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.q_proj`` -> ``layers.0.q_proj``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)


def is_within(name: str, parent: str) -> bool:
    """Whether the module (or state-dict key) ``name`` is ``parent`` or lies inside it; ``""`` is the root."""
    return not parent or name == parent or name.startswith(parent + ".")


def matches(name: str, pattern: list[str] | str) -> bool:
    """Whether a module name is selected by a list of names/dotted suffixes or a full-match regex."""
    return name_matcher(pattern)(name)


def name_matcher(pattern: list[str] | str) -> Callable[[str], bool]:
    """`matches` for one ``pattern`` and many names: a list becomes a set that each name's dotted suffixes are
    looked up in, a regex is compiled once."""
    if isinstance(pattern, str):
        regex = re.compile(pattern)
        return lambda name: regex.fullmatch(name) is not None
    entries = frozenset(pattern)
    return lambda name: not entries.isdisjoint(dotted_suffixes(name))


def dotted_suffixes(name: str) -> Iterator[str]:
    """``name`` and each part of it after a dot: ``a.b.c``, ``b.c``, ``c``."""
    parts = name.split(".")
    for start in range(len(parts)):
        yield ".".join(parts[start:])


# A module-name regex from a config or an adapter file must not be able to hang a match (Python's engine
# backtracks): no backreferences or conditionals, no repetition inside a repetition or around an alternation
# (the shapes that take exponential time: (a+)+, (a|a)*), and at most this many variable-length repetitions
# (a match then takes polynomial time in the name's length; a few milliseconds for a 100-character name).
MAX_REPEATS = 3


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a usable module-name regex (it does not compile, or could hang a match), or None; the
    reason reads after the pattern: "'(a+)+' repeats a repetition ..."."""
    try:
        tree = _regex_parser.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as err:
        return f"is not a valid regular expression ({err})"
    repeats = 0
    for op, av, inside_repeat in _walk(tree.data, False):
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            return "uses a backreference or a conditional group, which are not supported"
        if op in _REPEATS and av[1] > 1 and av[1] != av[0]:
            repeats += 1
            if inside_repeat:
                return "repeats a repetition (like (a+)+), which can take exponential time to match"
        if op is _c.BRANCH and inside_repeat:
            return "repeats an alternation (like (a|bc)*), which can take exponential time to match"
    if repeats > MAX_REPEATS:
        return f"has {repeats} variable-length repetitions; at most {MAX_REPEATS} keep a match fast"
    return None


def _walk(items: list, inside_repeat: bool) -> Iterator[tuple[Any, Any, bool]]:
    """Every node of a parsed regex as ``(op, argument, whether a repetition of more than one encloses it)``."""
    for op, av in items:
        yield op, av, inside_repeat
        if op in _REPEATS:
            yield from _walk(av[2].data, inside_repeat or av[1] > 1)
        elif op is _c.SUBPATTERN:
            yield from _walk(av[3].data, inside_repeat)
        elif op is _c.BRANCH:
            for branch in av[1]:
                yield from _walk(branch.data, inside_repeat)
        elif op in (_c.ASSERT, _c.ASSERT_NOT):
            yield from _walk(av[1].data, inside_repeat)
        elif op is _c.GROUPREF_EXISTS:
            yield from _walk(av[1].data, inside_repeat)
            if av[2] is not None:
                yield from _walk(av[2].data, inside_repeat)
        elif op is getattr(_c, "ATOMIC_GROUP", None):
            yield from _walk(av.data, inside_repeat)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is; ``name`` may leave out wrapper segments (``net.0`` for
    ``net._orig_mod.0``): the child is replaced inside the wrapper, where the wrapper's forward finds it."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    while child not in parent._modules:
        wrapped = [m for n, m in parent.named_children() if n in WRAPPER_SEGMENTS]
        if not wrapped:
            break
        parent = wrapped[0]
    setattr(parent, child, new)


def shadow_method(module: nn.Module, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
    """Set an instance attribute ``name`` that wraps the bound method (``make(original)``); ``delattr`` undoes it."""
    original = getattr(module, name)
    object.__setattr__(module, name, functools.update_wrapper(make(original), original))

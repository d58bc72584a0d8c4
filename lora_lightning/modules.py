"""A model's submodules by name (names without wrapper segments, containment, matching, replacement), and
shadowing a module's method on one instance."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from torch import nn

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
    if isinstance(pattern, str):
        return re.fullmatch(pattern, name) is not None
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def shadow_method(module: nn.Module, name: str, make: Callable[[Any], Callable[..., Any]]) -> None:
    """Set an instance attribute ``name`` that wraps the bound method (``make(original)``); ``delattr`` undoes it."""
    original = getattr(module, name)
    object.__setattr__(module, name, functools.update_wrapper(make(original), original))

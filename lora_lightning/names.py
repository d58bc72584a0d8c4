"""Module and state-dict names without the segments that wrappers (FSDP1, activation checkpointing,
``torch.compile``) insert: the names a full state dict carries."""

from __future__ import annotations

WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod"})


def canonical_name(name: str) -> str:
    """``name`` with every wrapper segment dropped, e.g.
    ``layers.0._fsdp_wrapped_module._checkpoint_wrapped_module.q_proj`` -> ``layers.0.q_proj``."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_SEGMENTS)

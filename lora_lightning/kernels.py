"""Optional Triton kernels for the frozen base model: ``"liger"`` patches Hugging Face model instances with
Liger-Kernel (RMSNorm, SwiGLU MLP, RoPE, and the fused linear cross-entropy that never materialises the logits,
used when the model is called with ``labels=``). Liger-Kernel is the extra ``kernels``; it needs Triton and CUDA.

Liger patches the model instance and, as it always does, the model type's module in transformers (classes and
``apply_rotary_pos_emb``), so models of that type built later in the process use its kernels too. Call
`apply_kernels` before `fused.install_fused_paths`. A fused gated MLP node runs its own SiLU kernels either way (one
backward pass that also gives the adapters' gradients); Liger's SwiGLU runs where an MLP is not fused.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass, field

from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lora_lightning.fused import fused_paths_installed
from lora_lightning.layers import LoRALayer

KERNELS = ("none", "liger")
LIGER_REQUIREMENT = "liger-kernel==0.8.5"
INSTALL_HINT = f"pip install 'lora-lightning[kernels]'  (or: pip install {LIGER_REQUIREMENT})"


@dataclass(frozen=True)
class KernelReport:
    """What `apply_kernels` patched: per Hugging Face model (by module name), the patched modules by kind."""

    kernels: str
    patched: dict[str, list[str]] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.patched:
            return f"kernels={self.kernels!r}: nothing patched"
        models = "; ".join(f"{name or 'the model'}: {', '.join(kinds)}" for name, kinds in self.patched.items())
        return f"kernels={self.kernels!r} patched {models}"


def check_kernels(kernels: str) -> None:
    """Raise if ``kernels`` is not a `KERNELS` name (``ValueError``) or its package is missing (``ImportError``,
    with the pip line to run)."""
    if kernels not in KERNELS:
        raise ValueError(f"kernels={kernels!r} is not one of {list(KERNELS)}; 'none' (default) or 'liger'")
    if kernels == "liger":
        try:
            import liger_kernel.transformers  # noqa: F401
        except ImportError as err:
            raise ImportError(f"kernels='liger' needs Liger-Kernel (Triton, CUDA): {INSTALL_HINT}") from err


def apply_kernels(model: nn.Module, kernels: str = "liger", adapting: Collection[str] = ()) -> KernelReport:
    """Patch every outermost Hugging Face model inside ``model`` whose type Liger-Kernel supports, and report what
    was patched. The fused linear cross-entropy computes the logits from the output head's weight, bypassing any
    adapter on it: an adapted head (a LoRA layer now, or a name in ``adapting``, the layers about to be adapted)
    is refused before anything changes. ``kernels="none"`` patches nothing. Logs the report as one info line."""
    check_kernels(kernels)
    if kernels == "none":
        return KernelReport(kernels)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if fused_paths_installed(model):
        raise RuntimeError("apply_kernels: call it before install_fused_paths (or after remove_fused_paths)")
    found = _hf_models(model)
    unsupported = {name or "the model": m.config.model_type for name, m in found.items()}
    targets = {name: m for name, m in found.items() if m.config.model_type in MODEL_TYPE_TO_APPLY_LIGER_FN}
    if not targets:
        raise ValueError(
            f"kernels='liger' found no Hugging Face model of a type Liger-Kernel supports in the module (found "
            f"{unsupported or 'no Hugging Face model'}; supported: {sorted(MODEL_TYPE_TO_APPLY_LIGER_FN)})"
        )
    for name, hf_model in targets.items():
        head = hf_model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        if isinstance(head, LoRALayer) or (head_name is not None and head_name in adapting):
            raise ValueError(
                f"kernels='liger' computes the loss of {name or 'the model'} with a fused linear cross-entropy that "
                f"reads the output head's weight directly, so an adapter on {head_name!r} would get wrong (no) "
                "gradients; leave the head out of target_modules (modules_to_save=[...] works) or use kernels='none'"
            )
    patched = {}
    for name, hf_model in targets.items():
        apply = MODEL_TYPE_TO_APPLY_LIGER_FN[hf_model.config.model_type]
        accepted = inspect.signature(apply).parameters
        options = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False}
        options["fused_linear_cross_entropy"] = hf_model.get_output_embeddings() is not None
        before = {id(m): m.__dict__.get("forward") for m in hf_model.modules()}
        apply(model=hf_model, **{k: v for k, v in options.items() if k in accepted})
        patched[name] = _patched_kinds(hf_model, before, {k for k, v in options.items() if v and k in accepted})
    report = KernelReport(kernels, patched)
    rank_zero_info(str(report))
    return report


def _hf_models(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost Hugging Face models inside ``model`` (modules with a ``config.model_type`` and
    ``get_output_embeddings``), by module name."""
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        is_hf = callable(getattr(module, "get_output_embeddings", None)) and hasattr(
            getattr(module, "config", None), "model_type"
        )
        if is_hf and not any(name.startswith(f"{outer}.") or not outer for outer in found):
            found[name] = module
    return found


def _patched_kinds(hf_model: nn.Module, before: dict[int, object], options: set[str]) -> list[str]:
    """The modules whose forward Liger replaced, counted by Liger's name for them, and the functions it patched."""
    counts = Counter(
        m._get_name()
        for m in hf_model.modules()
        if m is not hf_model and m.__dict__.get("forward") is not before.get(id(m))
    )
    kinds = [f"{kind} x{n}" for kind, n in counts.items()]
    if "rope" in options:
        kinds.append("RoPE (apply_rotary_pos_emb)")
    if "fused_linear_cross_entropy" in options:
        kinds.append("fused linear cross-entropy (when called with labels=)")
    return kinds

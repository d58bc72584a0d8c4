"""`LoRALinear`: LoRA on ``nn.Linear`` (also a 4-bit base) and on Hugging Face's GPT-2 ``Conv1D``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.config import AdapterSpec
from lora_lightning.functional import LinearOperands, lora_linear
from lora_lightning.layers.lora import LoRALayer

if TYPE_CHECKING:
    from lora_lightning.fused import SharedInputGroup


def hf_conv1d_type() -> type[nn.Module] | None:
    """Hugging Face's GPT-2 ``Conv1D`` (a linear layer storing ``W^T``), if transformers is loaded."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` (also a 4-bit base) and on Hugging Face's GPT-2 ``Conv1D``, whose weight is
    stored transposed (``[in, out]``, PEFT's ``fan_in_fan_out``). ``A`` is ``[r, in]``, ``B`` is ``[out, r]``.

    In eager training of a plain frozen ``nn.Linear`` in ``x``'s dtype without DoRA or ``lora_bias``, the layer runs
    `functional.lora_linear` (one autograd node that saves only ``x`` and ``x A^T``), or its share of a node over
    the siblings that read the same input (``input_group``, set by `fused.install_fused_paths`); under
    ``torch.compile`` its share of the siblings' one ``A`` product, else its modules (Inductor fuses those better),
    as under autocast, DoRA or another base.
    """

    # Set by `fused.install_fused_paths`: the siblings this layer may share its input node with.
    input_group: SharedInputGroup | None = None

    @property
    def fan_in_fan_out(self) -> bool:
        return not isinstance(self.base_layer, nn.Linear)

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        if isinstance(base, nn.Linear):  # also a 4-bit base, whose packed weight has another shape
            return base.in_features, base.out_features
        return base.weight.shape[0], base.weight.shape[1]  # GPT-2's Conv1D stores W^T

    @property
    def _channel_dim(self) -> int:  # type: ignore[override]
        return 1 if self.fan_in_fan_out else 0

    @classmethod
    def _new_factors(cls, base: nn.Module, spec: AdapterSpec, factory: dict) -> tuple[nn.Module, nn.Module]:
        in_features, out_features = cls.features(base)
        return (
            nn.Linear(in_features, spec.r, bias=False, **factory),
            nn.Linear(spec.r, out_features, bias=spec.lora_bias, **factory),
        )

    def _delta(self, name: str) -> torch.Tensor:
        delta = self.lora_B[name].weight.float() @ self.lora_A[name].weight.float()
        return delta.t() if self.fan_in_fan_out else delta

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        problems = []
        if spec.init.startswith(("pissa", "olora")) and quant.is_quantized(base):
            problems.append(
                f"init={spec.init!r} rewrites the base weight, which a 4-bit base cannot hold exactly; "
                "use init='kaiming' or 'gaussian' on a quantized base"
            )
        return problems

    @torch.no_grad()
    def _init_adapter(self, name: str) -> None:
        """PiSSA: ``W = U S V^T``, ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``. OLoRA: ``W = Q R``,
        ``B = Q_r``, ``A = R_r``. Both then keep ``W - s B A`` as the base weight."""
        spec = self.specs[name]
        if not spec.init.startswith(("pissa", "olora")):
            return super()._init_adapter(name)
        weight = self.base_weight()
        weight = weight.t() if self.fan_in_fan_out else weight
        if spec.init == "olora":
            q, r_ = torch.linalg.qr(weight)
            b, a = q[:, : spec.r], r_[: spec.r]
        else:
            if spec.init == "pissa":
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                u, s, vh = u[:, : spec.r], s[: spec.r], vh[: spec.r]
            else:
                u, s, v = torch.svd_lowrank(weight, spec.r, niter=int(spec.init.rsplit("_", 1)[1]))
                vh = v.t()
            root = torch.sqrt(s / spec.scaling)
            b, a = u * root, root[:, None] * vh
        self.lora_A[name].weight.copy_(a)
        self.lora_B[name].weight.copy_(b)
        self._set_base_weight(self.base_weight() - self.delta_weight(name))

    def fused_operands(self, x: torch.Tensor, name: str | None = None, traced: bool = False) -> LinearOperands | None:
        """What the fused nodes of `functional` need to run adapter ``name`` (the active one by default) on ``x``,
        or ``None`` where they do not apply: the adapter is not the one running (merged, disabled, inactive, one
        adapter per sample), DoRA, ``lora_bias``, a base other than a plain frozen ``nn.Linear`` (4-bit, Conv1D,
        sharded), ``x`` or adapters of another dtype than the base, autocast, a device other than CPU/CUDA, or
        ``torch.compile`` tracing unless ``traced`` (for the compiled paths: a custom op that the compiled graph
        keeps whole, the siblings' shared ``A`` product)."""
        # Called for every adapted layer in every step: the checks read the module dicts directly rather than
        # through nn.Module.__getattr__, and the cheapest come first.
        active = self.active_adapter
        name = active if name is None else name
        if (
            name is None
            or name != active
            or self.merged_adapter is not None
            or self.disabled
            or self.sample_adapters is not None
            or x.device.type not in ("cpu", "cuda")
            or torch.is_autocast_enabled(x.device.type)
            or (torch.compiler.is_compiling() and not traced)
        ):
            return None
        spec = self.specs.get(name)
        base = self._modules["base_layer"]
        if spec is None or spec.use_dora or spec.lora_bias or type(base) is not nn.Linear:
            return None
        a = self._modules["lora_A"][name]._parameters.get("weight")
        b = self._modules["lora_B"][name]._parameters.get("weight")
        if a is None or b is None or "weight" not in base._parameters or "bias" not in base._parameters:
            return None  # held as plain attributes, not parameters: views of FSDP1's flat parameters
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        if (
            weight.requires_grad
            or (bias is not None and bias.requires_grad)
            or type(weight) not in (nn.Parameter, torch.Tensor)  # not a DTensor or another subclass
            or not x.dtype == weight.dtype == a.dtype == b.dtype  # the nodes multiply them without casts
        ):
            return None
        return LinearOperands(weight, bias, a, b, spec.scaling, spec.dropout if self.training else 0.0)

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``out += (s h) B^T`` with ``h = d(x) A^T``, one GEMM that adds as it writes: no update the width of
        ``out`` is written, scaled or read again, in forward or in backward (where the scale falls on ``gh``).
        Adapters in another dtype than ``out``, with a ``lora_bias``, or a base whose output is not contiguous take
        the generic path."""
        lora_a, lora_b = self._modules["lora_A"][name], self._modules["lora_B"][name]
        if (
            lora_b.bias is not None
            or not x.dtype == out.dtype == lora_a.weight.dtype == lora_b.weight.dtype
            or not out.is_contiguous()
        ):
            return super()._add_update(out, x, name)
        h = lora_a(self._modules["lora_dropout"][name](x)) * self.specs[name].scaling
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), lora_b.weight.t())
        return out

    def _fused_forward(self, x: torch.Tensor, name: str, *args: object, **kwargs: object) -> torch.Tensor | None:
        if args or kwargs:
            return None
        group = self.input_group  # siblings reading the same input (`fused.install_fused_paths`)
        if torch.compiler.is_compiling():
            return group.run_traced(self, x) if group is not None and name == self.active_adapter else None
        if group is not None and name == self.active_adapter:
            out = group.take(self, x)  # computed when a sibling was called on x
            if out is not None:
                return out
        operands = self.fused_operands(x, name)
        if operands is None:
            return None
        if group is not None:
            out = group.run(self, x, operands)
            if out is not None:
                return out
        return lora_linear(x, *operands)

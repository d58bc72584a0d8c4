"""`LoRAParameter`: LoRA on a bare parameter of a module (``target_parameters``), e.g. fused expert weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from lora_lightning.config import AdapterSpec
from lora_lightning.layers.lora import LoRALayer


@dataclass(frozen=True)
class ParameterTarget:
    """Parameter ``name`` of ``module``: what a `LoRAParameter`'s class methods take as its base."""

    module: nn.Module
    name: str

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    @property
    def is_transposed(self) -> bool:
        return bool(getattr(self.module, "is_transposed", False))


class LoRAParameter(LoRALayer):
    """LoRA on parameter ``parameter_name`` of the wrapped module, in PEFT's layout: the module's own forward runs
    with ``P + s ΔP``. ``A`` is ``[r E, in]`` and ``B`` ``[out, r E]`` for ``E`` experts:

    - a 2-D ``P`` (``[d0, d1]``, whatever the module reads it as): ``E = 1``, ``in = d1``, ``out = d0``,
      ``ΔP = B A``;
    - a 3-D ``P`` (``[E, d1, d2]``): ``in = d2``, ``out = d1``, and expert ``e`` gets
      ``ΔP[e] = B[:, e::E] A[e r:(e + 1) r]`` (``A``'s rows by expert, ``B``'s columns interleaved); with the
      module's ``is_transposed`` set, ``in = d1``, ``out = d2`` and ``ΔP[e] = (B[:, e::E] A[e r:(e + 1) r])^T``.

    ``r`` and ``alpha`` are per expert. Several parameters of one module nest, one wrapper each, the one the module
    registers first innermost (PEFT's order, so its file keys are ``<module>.base_layer.lora_A.weight`` and so on).
    """

    _input_dropout = False

    def __init__(
        self, base_layer: nn.Module, parameter_name: str, spec: AdapterSpec | None = None, adapter_name: str = "default"
    ) -> None:
        self.parameter_name = parameter_name
        super().__init__(base_layer, spec, adapter_name)

    def target(self) -> ParameterTarget:
        """The wrapped parameter, in the module that holds it (below any wrappers of its other parameters)."""
        module = self.base_layer
        while isinstance(module, LoRAParameter):
            module = module.base_layer
        return ParameterTarget(module, self.parameter_name)

    @classmethod
    def features(cls, base: ParameterTarget) -> tuple[int, int]:  # type: ignore[override]
        shape = base.weight.shape
        if len(shape) == 2:
            return shape[1], shape[0]
        return (shape[1], shape[2]) if base.is_transposed else (shape[2], shape[1])

    @staticmethod
    def experts(base: ParameterTarget) -> int:
        return base.weight.shape[0] if base.weight.dim() == 3 else 1

    @property
    def in_features(self) -> int:
        return self.features(self.target())[0]

    @property
    def out_features(self) -> int:
        return self.features(self.target())[1]

    @classmethod
    def problems(cls, base: ParameterTarget, spec: AdapterSpec) -> list[str]:  # type: ignore[override]
        problems = []
        if spec.init not in ("kaiming", "gaussian"):
            problems.append(f"init={spec.init!r} works on linear layers only, not on a parameter")
        if base.weight.dim() not in (2, 3):
            problems.append(f"a {base.weight.dim()}-D parameter; target_parameters takes 2-D and 3-D ones")
        return problems

    @classmethod
    def adapter_shapes(cls, base: ParameterTarget, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:  # type: ignore[override]
        (in_features, out_features), rank = cls.features(base), spec.r * cls.experts(base)
        return {"lora_A.weight": (rank, in_features), "lora_B.weight": (out_features, rank)}

    @classmethod
    def _new_factors(cls, base: ParameterTarget, spec: AdapterSpec, factory: dict) -> tuple[nn.Module, nn.Module]:  # type: ignore[override]
        (in_features, out_features), rank = cls.features(base), spec.r * cls.experts(base)
        return nn.Linear(in_features, rank, bias=False, **factory), nn.Linear(rank, out_features, bias=False, **factory)

    def _factor_base(self) -> ParameterTarget:  # type: ignore[override]
        return self.target()

    def _base_param(self) -> torch.Tensor:
        return self.target().weight

    def _delta(self, name: str) -> torch.Tensor:
        return self._product(name, torch.float32)

    def _product(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """``ΔP`` (unscaled) of adapter ``name`` in ``dtype``, shaped like the parameter."""
        a, b = (w.to(dtype) for w in self.factors(name))
        target = self.target()
        if target.weight.dim() == 2:
            return b @ a
        experts = self.experts(target)
        per_expert_a = a.reshape(experts, -1, a.shape[-1])  # [E, r, in]
        per_expert_b = b.reshape(b.shape[0], -1, experts)  # [out, r, E]: B's columns interleave the experts
        layout = "e i o" if target.is_transposed else "e o i"
        return torch.einsum(f"o r e, e r i -> {layout}", per_expert_b, per_expert_a)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = self._weight_space_adapter()
        if name is None:
            return self.base_layer(x, *args, **kwargs)
        weight = self.target().weight
        updated = weight + self.specs[name].scaling * self._product(name, weight.dtype)
        return functional_call(self.base_layer, {self._path(): updated}, (x, *args), kwargs)

    def _path(self) -> str:
        """The parameter's name relative to ``base_layer``, through the wrappers of the module's other parameters."""
        depth, module = 0, self.base_layer
        while isinstance(module, LoRAParameter):
            depth, module = depth + 1, module.base_layer
        return "base_layer." * depth + self.parameter_name

    def sample_problem(self, names: set[str]) -> str | None:
        return "target_parameters adds its adapters to the weights, one set for the whole batch (as in PEFT)"

    def extra_repr(self) -> str:
        return f"parameter_name={self.parameter_name!r}, {super().extra_repr()}"

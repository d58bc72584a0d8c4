"""`LoRALayer`: a frozen base layer plus named low-rank adapters, one of them active.

Every layer computes ``y = base(x) + s * (B A d(x) + b)`` for its active adapter (``s`` is the scaling, ``d``
dropout, ``b`` the optional ``lora_bias`` of ``B``) and plain ``base(x)`` when no adapter is active or adapters are
disabled. With DoRA it computes ``y = base(x) + (m / n - 1) * (base(x) - bias) + (m / n) * s * B A d(x)`` where
``m`` is the trainable magnitude and ``n = ||W + s ΔW||`` per output channel (detached, as in the DoRA paper), so
the effective weight is ``m * (W + s ΔW) / n``. Tensors and module names follow PEFT: ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight`` (and ``.bias``; ``lora_embedding_A``/``_B`` for embeddings),
``lora_magnitude_vector.<adapter>``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.config import AdapterSpec
from lora_lightning.layers.base import AdapterModule, sample_rows


class LoRALayer(AdapterModule):
    """Base of the LoRA layer types: adapter bookkeeping, activation, merging and DoRA.

    A subclass says how to build ``A`` and ``B`` for its base layer (``_new_factors``), how to apply them
    (``_update``), what they add to the base weight (``_delta``, in the base weight's layout) and along which weight
    axis the output channels lie (``_channel_dim``); ``_base_param`` is the tensor a merge writes (the base weight).
    """

    adapter_attrs: tuple[str, str] = ("lora_A", "lora_B")
    factor_container: type[nn.Module] = nn.ModuleDict
    _channel_dim = 0
    _input_dropout = True  # whether ``spec.dropout`` applies to the input (not to an embedding's indices)

    def __init__(self, base_layer: nn.Module, spec: AdapterSpec | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.train(base_layer.training)  # a layer injected into a model in eval mode runs in eval mode
        for attr in self.adapter_attrs:
            setattr(self, attr, self.factor_container())
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.merged_adapter: str | None = None
        self._dora_merge_scale: torch.Tensor | None = None
        if spec is not None:
            self.add_adapter(adapter_name, spec)

    # ------------------------------------------------------------------ adapters

    @property
    def wrapped(self) -> nn.Module:
        return self.base_layer

    @property
    def merged(self) -> bool:
        return self.merged_adapter is not None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.specs)

    def spec(self, name: str | None = None) -> AdapterSpec:
        """Hyperparameters of adapter ``name`` (the active one by default)."""
        return self.specs[self._name(name)]

    @property
    def r(self) -> int:
        return self.spec().r

    @property
    def alpha(self) -> float:
        return self.spec().alpha

    @property
    def scaling(self) -> float:
        return self.spec().scaling

    def add_adapter(self, name: str, spec: AdapterSpec) -> None:
        """Add adapter ``name`` (initialised per ``spec.init``) and make it the active one."""
        if name in self.specs:
            raise ValueError(f"adapter {name!r} already exists on this layer; delete_adapter it first")
        if self.merged:
            raise RuntimeError(f"cannot add adapter {name!r} while {self.merged_adapter!r} is merged; unmerge() first")
        problems = self.problems(self._factor_base(), spec)
        if problems:
            raise ValueError("; ".join(problems))
        factory = {"device": self._weight_device(), "dtype": self.adapter_dtype()}
        for attr, factor in zip(self.adapter_attrs, self._new_factors(self._factor_base(), spec, factory), strict=True):
            self._container(attr)[name] = factor
        applies = spec.dropout > 0 and self._input_dropout
        self.lora_dropout[name] = (nn.Dropout(spec.dropout) if applies else nn.Identity()).train(self.training)
        self.specs[name] = spec
        self._init_adapter(name)
        if spec.use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self._weight_norm(name).to(**factory))
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        if name == self.merged_adapter:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge() before deleting it")
        for attr in (*self.adapter_attrs, "lora_dropout", "lora_magnitude_vector"):
            container = self._container(attr)
            if name in container:
                del container[name]
        del self.specs[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def factors(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """Adapter ``name``'s ``(A, B)``."""
        a, b = (_weight(self._container(attr)[name]) for attr in self.adapter_attrs)
        return a, b

    def adapter_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s parameters keyed by their name in a PEFT file (``lora_A.weight``, ...)."""
        tensors = _factor_tensors(self.adapter_attrs, [self._container(attr)[name] for attr in self.adapter_attrs])
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    @classmethod
    def adapter_shapes(cls, base: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """The shapes ``adapter_tensors`` would have for an adapter with ``spec`` on ``base``, without building it."""
        with torch.device("meta"):
            factors = cls._new_factors(base, spec, {"dtype": torch.float32})
            shapes = {key: tuple(t.shape) for key, t in _factor_tensors(cls.adapter_attrs, factors).items()}
        if spec.use_dora:
            shapes["lora_magnitude_vector"] = cls._magnitude_shape(base)
        return shapes

    def state_key(self, name: str, file_key: str) -> str:
        attr, _, rest = file_key.partition(".")
        return f"{attr}.{name}.{rest}" if rest else f"{attr}.{name}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.sample_adapters is not None:
            return self._per_sample_forward(x, *args, **kwargs)
        name = self.active_adapter
        if self.merged or name not in self.specs:
            return self.base_layer(x, *args, **kwargs)
        spec = self.specs[name]
        out = self._fused_forward(x, name, *args, **kwargs)
        if out is not None:
            return out
        out = self.base_layer(x, *args, **kwargs)
        if not spec.use_dora:
            return self._add_update(out, x, name)
        update = self._adapter_output(x, name).to(out.dtype)
        scale = (self.lora_magnitude_vector[name] / self._weight_norm(name).detach()).to(out.dtype)
        bias = getattr(self.base_layer, "bias", None)
        unbiased = out if bias is None else out - self._channel_view(bias)
        return out + (scale - 1) * unbiased + (scale * spec.scaling) * update

    def _add_update(self, out: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
        """``out + s * update``, accumulated into ``out``: the base output is not saved for backward. The update is
        scaled first: Inductor's addmm patterns drop add_'s alpha (silently wrong; pytorch#167313, #196577)."""
        return out.add_(self._adapter_output(x, name).to(out.dtype) * self.specs[name].scaling)

    def _weight_space_adapter(self) -> str | None:
        """The adapter that a weight-space layer (whose module runs with ``W + s B A``, so it cannot split a batch
        per sample) runs, or ``None`` for its base alone."""
        if self.sample_adapters is not None and set(self.sample_adapters) & set(self.specs) and not self.disabled:
            raise ValueError(f"per-sample adapters: {self.sample_problem(set())}")
        name = self.active_adapter
        if self.disabled or self.merged or name not in self.specs or self.sample_adapters is not None:
            return None
        return name

    def _adapter_output(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """``B A d(x) + b`` in the adapter's dtype (a 4-bit base's compute dtype)."""
        x = x.to(self.factors(name)[0].dtype) if x.is_floating_point() else x
        return self._update(self.lora_dropout[name](x), name)

    def _per_sample_forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        """Each sample (row of dimension 0) with the adapter ``sample_adapters`` names for it."""
        if self.merged:
            raise ValueError(
                f"per-sample adapters: adapter {self.merged_adapter!r} is merged into this layer; unmerge it first"
            )
        out = self.base_layer(x, *args, **kwargs)
        for name, rows in sample_rows(self.sample_adapters, len(x)).items():
            if name in self.specs:  # not "__base__", nor an adapter that does not adapt this layer
                rows = rows.to(x.device)
                update = self._adapter_output(x[rows], name).to(out.dtype) * self.specs[name].scaling
                out = out.index_add(0, rows, update)
        return out

    def sample_problem(self, names: set[str]) -> str | None:
        dora = sorted(n for n in names & set(self.specs) if self.specs[n].use_dora)
        if dora:
            return f"adapters {dora} use DoRA, whose per-sample batches PEFT does not run either"
        return None

    def _fused_forward(self, x: torch.Tensor, name: str, *args: object, **kwargs: object) -> torch.Tensor | None:
        """A fused path for the whole layer (base and adapter in one autograd node), or ``None`` for the generic
        one."""
        return None

    # ------------------------------------------------------------------ merging

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``s * ΔW`` of adapter ``name`` in fp32, shaped like the base weight."""
        name = self._name(name)
        return self._delta(name) * self.specs[name].scaling

    def fold_problem(self, name: str) -> str | None:
        if name in self.specs and self.specs[name].lora_bias and getattr(self.base_layer, "bias", None) is None:
            kind = type(self.base_layer).__name__
            return f"adapter {name!r} has a lora_bias but the base {kind} has no bias to add it to (as in PEFT)"
        return None

    def fold(self, name: str | None) -> nn.Module:
        if self.merged and self.merged_adapter != name:
            self.unmerge()
        if name in self.specs and not self.merged:
            self.merge(name)
        return self.base_layer

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (the active one by default) into the base weight (and bias), computed in fp32."""
        if self.merged:
            raise RuntimeError(f"merge(): adapter {self.merged_adapter!r} is already merged; call unmerge() first")
        name = self._name(name)
        problem = self.fold_problem(name)
        if problem:
            raise RuntimeError(f"merge(): {problem}")
        weight = self.base_weight() + self.delta_weight(name)
        if self.specs[name].use_dora:
            self._dora_merge_scale = self.lora_magnitude_vector[name].float() / self._channel_norm(weight)
            weight = weight * self._dora_merge_scale.reshape(self._weight_scale_shape())
        self._set_base_weight(weight)
        self._add_to_bias(name, 1)
        self.merged_adapter = name

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("unmerge(): this layer is not merged")
        name = self.merged_adapter
        weight = self.base_weight()
        if self._dora_merge_scale is not None:
            weight = weight / self._dora_merge_scale.reshape(self._weight_scale_shape())
            self._dora_merge_scale = None
        self._set_base_weight(weight - self.delta_weight(name))
        self._add_to_bias(name, -1)
        self.merged_adapter = None

    def _add_to_bias(self, name: str, sign: int) -> None:
        """``bias += sign * s * b`` for an adapter with ``lora_bias``."""
        lora_bias = getattr(self._container(self.adapter_attrs[1])[name], "bias", None)
        if lora_bias is not None:
            bias = self.base_layer.bias
            bias.copy_((bias.float() + sign * self.specs[name].scaling * lora_bias.float()).to(bias.dtype))

    @classmethod
    def weight_of(cls, base: nn.Module) -> torch.Tensor:
        """The weight of ``base`` that adapters of this type update (whose dtype and device they take)."""
        return base.weight

    def _factor_base(self) -> nn.Module:
        """What the class methods (``problems``, ``_new_factors``) take as this layer's base."""
        return self.base_layer

    def _base_param(self) -> torch.Tensor:
        """The tensor a merge writes: the base layer's weight."""
        return self.base_layer.weight

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32 (dequantized for a 4-bit base)."""
        if quant.is_quantized(self.base_layer):
            return quant.dequantized_weight(self.base_layer)
        return self._base_param().detach().float()

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        if quant.is_quantized(self.base_layer):
            self.base_layer = quant.dequantize_linear(self.base_layer)
        target = self._base_param()
        target.copy_(weight.to(target.dtype))

    # ------------------------------------------------------------------ DoRA

    def _weight_norm(self, name: str) -> torch.Tensor:
        """``||W + s ΔW||`` per output channel, shaped like the magnitude vector."""
        return self._channel_norm(self.base_weight() + self.delta_weight(name))

    def _channel_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """The norm of each output channel of ``weight`` (in the base weight's layout), shaped like the magnitude."""
        dims = [d for d in range(weight.dim()) if d != self._channel_dim]
        return torch.linalg.vector_norm(weight, dim=dims).reshape(self._magnitude_shape(self.base_layer))

    @classmethod
    def _magnitude_shape(cls, base: nn.Module) -> tuple[int, ...]:
        return (cls.features(base)[1],)

    def _weight_scale_shape(self) -> tuple[int, ...]:
        """The magnitude's shape for scaling the base weight along its channel axis."""
        weight_dims = self.base_layer.weight.dim()
        return tuple(self.out_features if d == self._channel_dim else 1 for d in range(weight_dims))

    def _channel_view(self, bias: torch.Tensor) -> torch.Tensor:
        """``bias`` shaped to broadcast against this layer's output."""
        return bias

    # ------------------------------------------------------------------ helpers

    def adapter_dtype(self) -> torch.dtype:
        """Adapters use the base weight's dtype; a 4-bit base's compute dtype."""
        if quant.is_quantized(self.base_layer):
            return quant.compute_dtype(self.base_layer)
        return self._base_param().dtype

    def _weight_device(self) -> torch.device:
        return self._base_param().device

    def _name(self, name: str | None) -> str:
        name = self.active_adapter if name is None else name
        if name is None or name not in self.specs:
            raise KeyError(f"no adapter {name!r} on this layer; it has {self.adapter_names}")
        return name

    def _container(self, attr: str) -> nn.ModuleDict | nn.ParameterDict:
        return getattr(self, attr)

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        """Why an adapter with ``spec`` cannot go on ``base`` (empty if it can)."""
        if spec.init not in ("kaiming", "gaussian"):
            return [f"init={spec.init!r} works on linear layers only, not on {type(base).__name__}"]
        return []

    def _init_adapter(self, name: str) -> None:
        a, b = self.factors(name)
        if self.specs[name].init == "gaussian":
            nn.init.normal_(a, std=1 / self.specs[name].r)
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(b)
        lora_bias = getattr(self._container(self.adapter_attrs[1])[name], "bias", None)
        if lora_bias is not None:
            nn.init.zeros_(lora_bias)

    @classmethod
    def _new_factors(
        cls, base: nn.Module, spec: AdapterSpec, factory: dict
    ) -> tuple[nn.Module | nn.Parameter, nn.Module | nn.Parameter]:
        raise NotImplementedError

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        a, b = (self._container(attr)[name] for attr in self.adapter_attrs)
        return b(a(x))

    def _delta(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        """``(in, out)`` of ``base``: the sizes of ``A``'s input and ``B``'s output."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        return self.features(self.base_layer)[0]

    @property
    def out_features(self) -> int:
        return self.features(self.base_layer)[1]

    def extra_repr(self) -> str:
        specs = ", ".join(
            f"{n}: r={s.r} alpha={s.alpha:g}{' dora' if s.use_dora else ''}{' lora_bias' if s.lora_bias else ''}"
            for n, s in self.specs.items()
        )
        return f"adapters=[{specs}], active={self.active_adapter!r}, merged={self.merged_adapter!r}"


def _factor_tensors(attrs: tuple[str, ...], factors: list) -> dict[str, torch.Tensor]:
    """Factors' tensors by their name in a PEFT file: ``lora_A.weight`` (``lora_B.bias``) for a module, the bare
    ``lora_embedding_A`` for a tensor."""
    tensors = {}
    for attr, factor in zip(attrs, factors, strict=True):
        if isinstance(factor, nn.Module):
            tensors.update({f"{attr}.{key}": param for key, param in factor.named_parameters()})
        else:
            tensors[attr] = factor
    return tensors


def _weight(factor: nn.Module | nn.Parameter) -> nn.Parameter:
    return factor.weight if isinstance(factor, nn.Module) else factor

"""LoRA layers: a frozen base layer plus named low-rank adapters, one of them active.

Every layer computes ``y = base(x) + s * B A d(x)`` for its active adapter (``s`` is the scaling, ``d``
dropout) and plain ``base(x)`` when no adapter is active or adapters are disabled. With DoRA it computes
``y = base(x) + (m / n - 1) * (base(x) - bias) + (m / n) * s * B A d(x)`` where ``m`` is the trainable
magnitude and ``n = ||W + s ΔW||`` per output channel (detached, as in the DoRA paper), so the effective
weight is ``m * (W + s ΔW) / n``. Tensors and module names follow PEFT: ``lora_A.<adapter>.weight``,
``lora_B.<adapter>.weight`` (``lora_embedding_A``/``_B`` for embeddings), ``lora_magnitude_vector.<adapter>``.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from lora_lightning import quant
from lora_lightning.config import AdapterSpec
from lora_lightning.functional import LinearOperands, lora_linear

if TYPE_CHECKING:
    from lora_lightning.fused import SharedInputGroup


def hf_conv1d_type() -> type[nn.Module] | None:
    """Hugging Face's GPT-2 ``Conv1D`` (a linear layer storing ``W^T``), if transformers is loaded."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


class LoRALayer(nn.Module):
    """Base of the LoRA layer types: adapter bookkeeping, activation, merging and DoRA.

    A subclass says how to build ``A`` and ``B`` for its base layer, how to apply them (``_update``), what
    they add to the base weight (``_delta``, in the base weight's layout) and along which weight axis the
    output channels lie (``_channel_dim``).
    """

    adapter_attrs: tuple[str, str] = ("lora_A", "lora_B")
    factor_container: type[nn.Module] = nn.ModuleDict
    _channel_dim = 0
    _input_dropout = True  # whether ``spec.dropout`` applies to the input (not to an embedding's indices)

    def __init__(self, base_layer: nn.Module, spec: AdapterSpec | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        self.base_layer = base_layer
        for attr in self.adapter_attrs:
            setattr(self, attr, self.factor_container())
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged_adapter: str | None = None
        self._dora_merge_scale: torch.Tensor | None = None
        if spec is not None:
            self.add_adapter(adapter_name, spec)

    # ------------------------------------------------------------------ adapters

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
        problems = self.problems(self.base_layer, spec)
        if problems:
            raise ValueError("; ".join(problems))
        factory = {"device": self._weight_device(), "dtype": self.adapter_dtype()}
        for attr, factor in zip(self.adapter_attrs, self._new_factors(self.base_layer, spec.r, factory), strict=True):
            self._container(attr)[name] = factor
        applies = spec.dropout > 0 and self._input_dropout
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if applies else nn.Identity()
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

    def adapter_tensors(self, name: str) -> dict[str, nn.Parameter]:
        """Adapter ``name``'s parameters keyed by their name in a PEFT file (``lora_A.weight``, ...)."""
        tensors = {}
        for attr in self.adapter_attrs:
            factor = self._container(attr)[name]
            tensors[_file_key(attr, factor)] = _weight(factor)
        if name in self.lora_magnitude_vector:
            tensors["lora_magnitude_vector"] = self.lora_magnitude_vector[name]
        return tensors

    @classmethod
    def adapter_shapes(cls, base: nn.Module, spec: AdapterSpec) -> dict[str, tuple[int, ...]]:
        """The shapes ``adapter_tensors`` would have for an adapter with ``spec`` on ``base``, without building it."""
        with torch.device("meta"):
            factors = cls._new_factors(base, spec.r, {"dtype": torch.float32})
            shapes = {
                _file_key(attr, f): tuple(_weight(f).shape) for attr, f in zip(cls.adapter_attrs, factors, strict=True)
            }
        if spec.use_dora:
            shapes["lora_magnitude_vector"] = cls._magnitude_shape(base)
        return shapes

    def state_key(self, name: str, file_key: str) -> str:
        """The ``state_dict`` key (relative to this layer) of adapter ``name``'s tensor ``file_key``."""
        attr, _, rest = file_key.partition(".")
        return f"{attr}.{name}.{rest}" if rest else f"{attr}.{name}"

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        name = self.active_adapter
        if self.merged or self.disabled or name not in self.specs:
            return self.base_layer(x, *args, **kwargs)
        spec = self.specs[name]
        out = self._fused_forward(x, name, *args, **kwargs)
        if out is not None:
            return out
        out = self.base_layer(x, *args, **kwargs)
        # Adapters keep their own dtype (a 4-bit base's compute dtype); the update joins the base output's.
        adapter_dtype = self.factors(name)[0].dtype
        x = x.to(adapter_dtype) if x.is_floating_point() else x
        update = self._update(self.lora_dropout[name](x), name).to(out.dtype)
        if not spec.use_dora:
            # The base output is not saved for backward, so the update can be accumulated in place. It is scaled
            # first: Inductor's addmm patterns drop add_'s alpha (silently wrong; pytorch#167313, #196577).
            return out.add_(update * spec.scaling)
        scale = (self.lora_magnitude_vector[name] / self._weight_norm(name).detach()).to(out.dtype)
        bias = getattr(self.base_layer, "bias", None)
        unbiased = out if bias is None else out - self._channel_view(bias)
        return out + (scale - 1) * unbiased + (scale * spec.scaling) * update

    def _fused_forward(self, x: torch.Tensor, name: str, *args: object, **kwargs: object) -> torch.Tensor | None:
        """A fused path for the whole layer (base and adapter in one autograd node), or ``None`` for the generic
        one."""
        return None

    # ------------------------------------------------------------------ merging

    def delta_weight(self, name: str | None = None) -> torch.Tensor:
        """``s * ΔW`` of adapter ``name`` in fp32, shaped like the base weight."""
        name = self._name(name)
        return self._delta(name) * self.specs[name].scaling

    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (the active one by default) into the base weight, computed in fp32."""
        if self.merged:
            raise RuntimeError(f"merge(): adapter {self.merged_adapter!r} is already merged; call unmerge() first")
        name = self._name(name)
        weight = self.base_weight() + self.delta_weight(name)
        if self.specs[name].use_dora:
            self._dora_merge_scale = self.lora_magnitude_vector[name].float() / self._channel_norm(weight)
            weight = weight * self._dora_merge_scale.reshape(self._weight_scale_shape())
        self._set_base_weight(weight)
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
        self.merged_adapter = None

    def base_weight(self) -> torch.Tensor:
        """The base weight in fp32 (dequantized for a 4-bit base)."""
        if quant.is_quantized(self.base_layer):
            return quant.dequantized_weight(self.base_layer)
        return self.base_layer.weight.detach().float()

    def _set_base_weight(self, weight: torch.Tensor) -> None:
        if quant.is_quantized(self.base_layer):
            self.base_layer = quant.dequantize_linear(self.base_layer)
        target = self.base_layer.weight
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
        return self.base_layer.weight.dtype

    def _weight_device(self) -> torch.device:
        return self.base_layer.weight.device

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

    @classmethod
    def _new_factors(
        cls, base: nn.Module, r: int, factory: dict
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
            f"{n}: r={s.r} alpha={s.alpha:g}{' dora' if s.use_dora else ''}" for n, s in self.specs.items()
        )
        return f"adapters=[{specs}], active={self.active_adapter!r}, merged={self.merged_adapter!r}"


class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` (also a 4-bit base) and on Hugging Face's GPT-2 ``Conv1D``, whose weight is
    stored transposed (``[in, out]``, PEFT's ``fan_in_fan_out``). ``A`` is ``[r, in]``, ``B`` is ``[out, r]``.

    In eager training of a plain frozen ``nn.Linear`` in ``x``'s dtype without DoRA, the layer runs
    `functional.lora_linear` (one autograd node that saves only ``x`` and ``x A^T``), or its share of a node over
    the siblings that read the same input (``input_group``, set by `fused.install_fused_paths`); under
    ``torch.compile``, autocast, DoRA or another base it runs the modules (Inductor fuses those better).
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
    def _new_factors(cls, base: nn.Module, r: int, factory: dict) -> tuple[nn.Module, nn.Module]:
        in_features, out_features = cls.features(base)
        return nn.Linear(in_features, r, bias=False, **factory), nn.Linear(r, out_features, bias=False, **factory)

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

    def fused_operands(self, x: torch.Tensor, name: str | None = None) -> LinearOperands | None:
        """What the fused nodes of `functional` need to run adapter ``name`` (the active one by default) on ``x``,
        or ``None`` where they do not apply: the adapter is not the one running (merged, disabled, inactive), DoRA,
        a base other than a plain frozen ``nn.Linear`` (4-bit, Conv1D, sharded), ``x`` of another dtype, autocast,
        a device other than CPU/CUDA, or ``torch.compile`` tracing (Inductor fuses the modules better)."""
        name = self.active_adapter if name is None else name
        base = self.base_layer
        if (
            name is not None
            and name == self.active_adapter
            and not (self.merged or self.disabled)
            and name in self.specs
            and not self.specs[name].use_dora
            and type(base) is nn.Linear
            and not base.weight.requires_grad
            and (base.bias is None or not base.bias.requires_grad)
            and type(base.weight) in (nn.Parameter, torch.Tensor)  # not a DTensor or another subclass
            and x.dtype == base.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
            and x.device.type in ("cpu", "cuda")
            and not torch.compiler.is_compiling()
        ):
            spec = self.specs[name]
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            return LinearOperands(base.weight, base.bias, a, b, spec.scaling, spec.dropout if self.training else 0.0)
        return None

    def _fused_forward(self, x: torch.Tensor, name: str, *args: object, **kwargs: object) -> torch.Tensor | None:
        operands = None if args or kwargs else self.fused_operands(x, name)
        if operands is None:
            return None
        if self.input_group is not None:  # siblings reading the same input (`fused.install_fused_paths`)
            out = self.input_group.run(self, x)
            if out is not None:
                return out
        return lora_linear(x, *operands)


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: ``A`` (``lora_embedding_A``, ``[r, num_embeddings]``) is looked up like the
    base table and ``B`` (``lora_embedding_B``, ``[embedding_dim, r]``) maps it out. As in PEFT, ``A`` starts
    at zero and ``B`` normal, and dropout does not apply (the input is indices)."""

    adapter_attrs = ("lora_embedding_A", "lora_embedding_B")
    factor_container = nn.ParameterDict
    _channel_dim = 1
    _input_dropout = False

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.num_embeddings, base.embedding_dim

    @classmethod
    def _new_factors(cls, base: nn.Module, r: int, factory: dict) -> tuple[nn.Parameter, nn.Parameter]:
        in_features, out_features = cls.features(base)
        return (
            nn.Parameter(torch.empty(r, in_features, **factory)),
            nn.Parameter(torch.empty(out_features, r, **factory)),
        )

    def _init_adapter(self, name: str) -> None:
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def _update(self, x: torch.Tensor, name: str) -> torch.Tensor:
        base = self.base_layer
        looked_up = F.embedding(
            x, self.lora_embedding_A[name].t(), base.padding_idx, base.max_norm, base.norm_type,
            base.scale_grad_by_freq, base.sparse,
        )  # fmt: skip
        return looked_up @ self.lora_embedding_B[name].t()

    def _delta(self, name: str) -> torch.Tensor:
        return (self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()).t()


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d``/``nn.Conv2d``: ``A`` is a convolution like the base's with ``r`` output channels,
    ``B`` a 1x1 convolution to the base's output channels, so ``ΔW[o, i, k] = sum_j B[o, j] A[j, i, k]``."""

    @classmethod
    def problems(cls, base: nn.Module, spec: AdapterSpec) -> list[str]:
        unsupported = {
            key: getattr(base, key)
            for key, plain in (("groups", 1), ("padding_mode", "zeros"))
            if getattr(base, key) != plain
        }
        if any(d != 1 for d in base.dilation):
            unsupported["dilation"] = base.dilation
        problems = super().problems(base, spec)
        if unsupported:
            problems.append(
                f"LoRA on {type(base).__name__} supports groups=1, dilation=1 and padding_mode='zeros' only, "
                f"got {unsupported}; exclude this layer"
            )
        return problems

    @classmethod
    def features(cls, base: nn.Module) -> tuple[int, int]:
        return base.in_channels, base.out_channels

    @classmethod
    def _new_factors(cls, base: nn.Module, r: int, factory: dict) -> tuple[nn.Module, nn.Module]:
        conv = type(base)
        ones = (1,) * len(base.kernel_size)
        return (
            conv(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False, **factory),
            conv(r, base.out_channels, ones, ones, bias=False, **factory),
        )

    def _delta(self, name: str) -> torch.Tensor:
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b.flatten(1) @ a.flatten(1)).reshape(self.base_layer.weight.shape)

    @classmethod
    def _magnitude_shape(cls, base: nn.Module) -> tuple[int, ...]:
        return (1, base.out_channels, *(1 for _ in base.kernel_size))

    def _channel_view(self, bias: torch.Tensor) -> torch.Tensor:
        return bias.reshape(self._magnitude_shape(self.base_layer))


def lora_layer_type(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that adapts ``module``, or ``None`` if its type is not supported."""
    conv1d = hf_conv1d_type()
    if isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
        return LoRALinear
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoRAConv
    return None


def _file_key(attr: str, factor: nn.Module | nn.Parameter) -> str:
    """A factor's name in a PEFT file: ``lora_A.weight`` for a module, ``lora_embedding_A`` for a bare tensor."""
    return f"{attr}.weight" if isinstance(factor, nn.Module) else attr


def _weight(factor: nn.Module | nn.Parameter) -> nn.Parameter:
    return factor.weight if isinstance(factor, nn.Module) else factor

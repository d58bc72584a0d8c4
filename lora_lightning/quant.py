"""Frozen 4-bit NF4 bases for QLoRA: what a 4-bit layer is, how to build one, and how to read it back in fp32.

Two kinds, both running forward and backward (input gradients) on CPU as well as on GPU:

- ``"bnb-nf4"``: bitsandbytes' ``Linear4bit`` (NF4, blocksize 64, double-quantized block scales).
- ``"torchao-nf4"``: `NF4Linear`, an ``nn.Linear`` whose weight is torchao's ``NF4Tensor`` (blocksize 64,
  int8 block scales in groups of up to 256).

Both compute as bitsandbytes does: the input is cast to the layer's compute dtype, the weight is dequantized
to it, and the output is cast back to the input's dtype. The packages are imported only when a model is
quantized (``pip install 'lora-lightning[quant]'``); `is_quantized` never imports them. Quantizing a whole
model is `lora_lightning.quantize.quantize_linears`.

For a LoRA layer around a quantized ``base_layer``: forward calls ``base_layer(x)``; adapters use
`compute_dtype`; merging adds an fp32 delta to `dequantized_weight` and puts back `dequantize_linear`'s
plain ``nn.Linear``; `describe` says what the base was.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import logging
import sys
from collections.abc import Iterator
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

Kind = Literal["bnb-nf4", "torchao-nf4"]
KINDS: tuple[str, ...] = get_args(Kind)
COMPUTE_DTYPES: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float16, torch.float32)
BLOCKSIZE = 64  # weights per NF4 scale, as in the QLoRA paper (both kinds)
MAX_SCALER_BLOCKSIZE = 256  # torchao: block scales per second-level scale
INSTALL_HINT = "pip install 'lora-lightning[quant]'"
_PACKAGES = {"bnb-nf4": "bitsandbytes", "torchao-nf4": "torchao"}
# where torchao keeps NF4Tensor: 0.18 (the pinned one), and releases before it
_NF4_MODULES = ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor")
_SHORT_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class NF4Linear(nn.Linear):
    """A frozen ``nn.Linear`` whose ``weight`` is a torchao ``NF4Tensor``: ``x`` is cast to ``compute_dtype``,
    multiplied by the weight dequantized to that dtype, and the result cast back to ``x``'s dtype.
    Build one with `from_linear`."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias, device="meta")  # weights are set by from_linear
        self.compute_dtype = compute_dtype

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype) -> NF4Linear:
        """``linear``'s weight quantized (from fp32: scales and lookup table in fp32) and its bias in
        ``compute_dtype``, both frozen. Needs ``in_features * out_features`` to be a multiple of 64."""
        nf4 = _nf4_tensor_type(load=True)
        weight = linear.weight.detach()
        blocks = weight.numel() // BLOCKSIZE
        # NF4Tensor needs the block count to be a multiple of the scaler blocksize: the largest divisor <= 256
        scaler_blocksize = max(d for d in range(1, min(blocks, MAX_SCALER_BLOCKSIZE) + 1) if blocks % d == 0)
        layer = cls(linear.in_features, linear.out_features, compute_dtype, bias=linear.bias is not None)
        quantized = nf4.from_tensor(weight.float().contiguous(), BLOCKSIZE, scaler_blocksize)
        layer.weight = nn.Parameter(quantized, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
        return layer.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.compute_dtype), self.weight, self.bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer`` is a 4-bit linear layer this module reads: bitsandbytes ``Linear4bit`` (from anywhere,
    e.g. transformers' 4-bit loading) or an ``nn.Linear`` holding a torchao ``NF4Tensor`` weight."""
    linear4bit = getattr(sys.modules.get("bitsandbytes.nn"), "Linear4bit", None)
    if linear4bit is not None and isinstance(layer, linear4bit):
        return True
    return isinstance(layer, nn.Linear) and _is_nf4_tensor(layer.weight)


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a quantized layer computes in: its input is cast to it, and its output cast back."""
    _check_quantized(layer, "compute_dtype")
    if isinstance(layer, NF4Linear):
        return layer.compute_dtype
    if _is_nf4_tensor(layer.weight):  # a plain nn.Linear with an NF4 weight computes in its input's dtype
        return layer.weight.dtype
    return layer.compute_dtype or torch.float32  # bitsandbytes: None adopts the first input's dtype


@torch.no_grad()
def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """A quantized layer's weight dequantized to fp32, shaped ``[out_features, in_features]`` (a new tensor)."""
    _check_quantized(layer, "dequantized_weight")
    weight = layer.weight
    if _is_nf4_tensor(weight):
        return weight.get_original_weight().float()
    bnb_functional = importlib.import_module("bitsandbytes.functional")
    state = weight.quant_state if weight.quant_state is not None else layer.quant_state
    data = weight.data
    if getattr(state, "packing_format_for_cpu", False):  # the CPU inference layout (see bnb_linear): undo it
        data, state = bnb_functional._convert_weight_packed_for_cpu_inverse(data, copy.copy(state))
    return bnb_functional.dequantize_4bit(data, state).float().reshape(layer.out_features, layer.in_features)


@torch.no_grad()
def dequantize_linear(layer: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain frozen ``nn.Linear`` with the quantized layer's weight (dequantized in fp32, then cast to
    ``dtype``, by default the compute dtype) and its bias, on the same device and in the same mode."""
    _check_quantized(layer, "dequantize_linear")
    dtype = compute_dtype(layer) if dtype is None else dtype
    weight = dequantized_weight(layer)
    linear = nn.Linear(
        layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta", dtype=dtype
    ).train(layer.training)
    linear.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    if layer.bias is not None:
        linear.bias = nn.Parameter(layer.bias.detach().to(device=weight.device, dtype=dtype), requires_grad=False)
    return linear


def describe(layer: nn.Module) -> str:
    """What a quantized layer holds, for messages: ``"bnb nf4 4-bit, blocksize 64, compute dtype bf16"``."""
    _check_quantized(layer, "describe")
    dtype = _SHORT_DTYPES.get(compute_dtype(layer), str(compute_dtype(layer)))
    weight = layer.weight
    if _is_nf4_tensor(weight):
        return f"torchao nf4 4-bit, blocksize {weight.block_size}, double-quantized scales, compute dtype {dtype}"
    state = weight.quant_state if weight.quant_state is not None else layer.quant_state
    quant_type = getattr(state, "quant_type", None) or weight.quant_type
    blocksize = getattr(state, "blocksize", None) or weight.blocksize
    nested = ", double-quantized scales" if getattr(state, "nested", False) else ""
    return f"bnb {quant_type} 4-bit, blocksize {blocksize}{nested}, compute dtype {dtype}"


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as stored: 4-bit weights packed, with their scales and
    lookup tables; tensors shared between modules counted once."""
    sizes: dict[tuple[torch.device, int], int] = {}

    def add(tensor: torch.Tensor | None) -> None:
        if tensor is not None and tensor.numel():
            key = (tensor.device, tensor.data_ptr())
            sizes[key] = max(sizes.get(key, 0), tensor.numel() * tensor.element_size())

    packed = set()
    for module in model.modules():
        if is_quantized(module):
            packed.add(id(module.weight))
            for tensor in _stored_tensors(module):
                add(tensor)
    for param in model.parameters():
        if id(param) not in packed:
            add(param.detach())
    for buffer in model.buffers():
        add(buffer)
    return sum(sizes.values())


# ---------------------------------------------------------------------------------------------- helpers


def compute_dtype_arg(value: torch.dtype | str) -> torch.dtype:
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if dtype not in COMPUTE_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in COMPUTE_DTYPES)
        raise ValueError(f"compute_dtype={value!r}: must be one of {names} (a torch.dtype or its name)")
    return dtype


def require(kind: str) -> None:
    """Import the package ``kind`` needs, or say how to install it."""
    package = _PACKAGES[kind]
    try:
        with _quiet_import():
            importlib.import_module(package)
    except (ImportError, OSError, RuntimeError) as err:  # bitsandbytes raises RuntimeError for a broken native library
        raise ImportError(
            f"kind={kind!r} needs the {package} package, which is not importable ({err}); install it with "
            f"{INSTALL_HINT}, or choose kind={next(k for k in KINDS if k != kind)!r}"
        ) from err


@contextlib.contextmanager
def _quiet_import() -> Iterator[None]:
    """Drop import-time notes about native kernels the NF4 layers never use: torchao's CUDA extensions that a
    CPU torch cannot load, and bitsandbytes 0.49+'s optional CPU inference kernel (`bnb_linear` turns that
    path off). Only while this module imports the package; transformers may have imported torchao earlier."""
    quiet = ("Failed to load", "Skipping import of cpp extensions", "<enum '")
    loggers = [logging.getLogger(n) for n in ("bitsandbytes.backends.cpu.ops", "torchao", "torch.utils._pytree")]

    def drop(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(quiet)

    for logger in loggers:
        logger.addFilter(drop)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(drop)


def _nf4_tensor_type(load: bool = False) -> type | None:
    """torchao's NF4Tensor if torchao is loaded (with ``load``: importing it, or raising ImportError)."""
    for name in _NF4_MODULES:
        if load:
            with contextlib.suppress(ImportError), _quiet_import():
                importlib.import_module(name)
        found = getattr(sys.modules.get(name), "NF4Tensor", None)
        if found is not None:
            return found
    if load:
        raise ImportError(f"this torchao has no NF4Tensor; install the pinned one with {INSTALL_HINT}")
    return None


def _is_nf4_tensor(value: object) -> bool:
    nf4 = _nf4_tensor_type()
    return nf4 is not None and isinstance(value, nf4)


def _check_quantized(layer: nn.Module, what: str) -> None:
    if not is_quantized(layer):
        raise TypeError(f"{what}(): {type(layer).__name__} is not a 4-bit layer (bnb Linear4bit or torchao NF4)")


def bnb_cpu_shape_ok(layer: nn.Linear) -> bool:
    """Shapes bitsandbytes' CPU 4-bit kernels get right. 0.49.0 to at least 0.50.2 compute wrong forward,
    backward and dequantized values when ``in_features`` is a multiple of 16 but not of 64; 0.48.2 raises for
    an odd weight count and crashes (segfault) quantizing a single block with double quantization."""
    return layer.in_features % BLOCKSIZE == 0 and layer.in_features * layer.out_features > BLOCKSIZE


def bnb_linear(old: nn.Linear, dtype: torch.dtype) -> nn.Module:
    """A frozen bitsandbytes ``Linear4bit`` (NF4, double-quantized scales) holding ``old``'s weight and bias."""
    bnb = importlib.import_module("bitsandbytes")
    weight = old.weight.detach()
    layer = bnb.nn.Linear4bit(
        old.in_features, old.out_features, bias=old.bias is not None, compute_dtype=dtype,
        compress_statistics=True, quant_type="nf4", device="meta",
    )  # fmt: skip
    layer.weight = bnb.nn.Params4bit(
        weight.float(), requires_grad=False, blocksize=BLOCKSIZE, compress_statistics=True, quant_type="nf4",
        module=layer,
    ).to(weight.device)  # quantizes  # fmt: skip
    if old.bias is not None:
        layer.bias = nn.Parameter(old.bias.detach().to(dtype), requires_grad=False)
    # bitsandbytes 0.49+ on CPUs with AVX512-BF16: Linear4bit repacks its weight in place on the first eval-mode
    # forward without input grads (Lightning's validation) into an inference-only layout: block scales rounded
    # to bf16, and later training forwards run a kernel without autograd (no input gradient; with a bias they
    # raise). Turning that path off keeps the layer trainable.
    layer.support_avx512bf16_for_cpu = False
    return layer.train(old.training)


def _stored_tensors(layer: nn.Module) -> list[torch.Tensor | None]:
    """The plain tensors that hold a quantized layer's weight."""
    weight = layer.weight
    if _is_nf4_tensor(weight):
        names = ("quantized_data", "quantized_scalers", "quantization_factor", "scaler_mean", "nf4")
        return [getattr(weight, name, None) for name in names]
    state = weight.quant_state if weight.quant_state is not None else layer.quant_state
    nested = getattr(state, "state2", None) if getattr(state, "nested", False) else None
    return [
        weight.data, state.absmax, state.code, getattr(state, "offset", None),
        *((nested.absmax, nested.code) if nested is not None else ()),
    ]  # fmt: skip

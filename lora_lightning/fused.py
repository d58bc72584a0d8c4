"""Fused LoRA paths over several adapted layers, found by structure and wiring; today's per-layer path is the
fallback. The math of each path is in `functional`.

- **Shared input.** Sibling `LoRALinear` layers (children of one module with plain ``nn.Linear`` bases and the same
  input width) that receive the *same tensor* in a forward pass, such as q/k/v, run as one
  `functional.lora_shared_input` node: one GEMM for all their ``A`` factors, one input-gradient buffer. Which
  siblings share their input is seen in the first forward of their parent (wiring, not names); from then on the
  first of them to be called computes all their outputs and the others take theirs. A sibling that later gets
  another tensor turns its group off (one info line), and each layer runs its own node again.
- **Gated MLP.** A module with three adapted children and one parameterless child ``act`` whose forward is
  ``down(act(gate(x)) * up(x))``: checked by running the module on a probe input against that formula with the
  three children in every role order (exactly one order must match). Its forward then runs
  `functional.lora_gated_mlp`, which recomputes ``act(gate) * up`` in backward instead of saving down's input and
  folds the adapters into the base GEMMs: from the MLP's first fused call on, its three frozen weights are views of
  a `functional.MLPBuffers` (the same values; `remove_fused_paths` gives each its own storage back).
- **Norm inputs.** A fused node whose input is an output of a frozen leaf sibling of its module (a norm)
  whose own autograd node keeps the sibling's input (Liger's RMSNorm does; see `InputProducers`) keeps that input
  instead of its own and runs the sibling again in backward (on CUDA, an RMSNorm as one `norm_triton` launch where
  that gives its bits): the block keeps one activation where it kept two.

A fused path gives way to the layers' own path for any call it does not cover (the checks of
`LoRALinear.fused_operands`: torch.compile, autocast, DoRA, a quantized or sharded base, a merged or disabled
adapter), and a gated MLP whose layers FSDP manages runs its layers' own nodes (folding would keep a whole copy of
the weights that FSDP gathers for each forward, on every rank). Traced by torch.compile, a gated MLP with a SiLU
gate, bias-free layers and no dropout runs as one custom op (`functional.lora_gated_mlp_op`: the node's math and
kernels, which Inductor keeps whole), on the weights that `fold_gated_mlps` folded; another gated MLP runs its
module's forward under selective checkpointing that recomputes elementwise results other than sums in backward.
Either way it keeps ``G`` and ``U`` but not ``act(G) * U``: Inductor's partitioner keeps down's input otherwise,
because the adapter's gradient multiplies it. Traced siblings that get one tensor share ``h = d(x) [A_1; ...]^T``
as plain operations (`SharedInputGroup.run_traced`); the tensor carries the others' shares from the first call to
theirs, so that neither sets nor clears state outside the traced region (activation checkpointing allows none),
and the parent drops those left as it returns (a sibling called outside its parent leaves them until then).
Unlike the eager node, the traced path does not see an in-place change of the tensor between the siblings' calls,
and a sibling that a traced forward does not call gets a zero gradient for its ``A`` where it would get none.

Dropout draws one mask per shared input where PEFT draws one per adapter: each adapter's mask has PEFT's
distribution, but the adapters of one input see the same mask in a step (they are correlated).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lora_lightning.functional import (
    InputProducer,
    LinearOperands,
    MLPBuffers,
    linear_with_factor_product,
    lora_gated_mlp,
    lora_gated_mlp_op,
    lora_shared_input,
    shared_factor_products,
)
from lora_lightning.layers import LoRALinear
from lora_lightning.modules import canonical_name
from lora_lightning.triton_support import triton_applies

# The attribute holding what `install_fused_paths` put on a module (`_Installed`).
_INSTALLED = "_lora_fused_paths"
WIRING_KEY = "lora_fused_wiring"  # the checkpoint key of `fused_wiring`
# The attribute of a compiled forward's tensor holding the siblings' shares of ``h`` (`SharedInputGroup.run_traced`).
_SHARED_PRODUCTS = "_lora_shared_factor_products"


@dataclass(frozen=True)
class FusionReport:
    """What `install_fused_paths` fused, and which adapted layers keep the per-layer path (with the reason)."""

    gated_mlps: list[str] = field(default_factory=list)
    shared_input_parents: list[str] = field(default_factory=list)
    not_fused: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.not_fused.items():
            by_reason.setdefault(reason, []).append(name)
        not_fused = "; ".join(f"{_summary(names)} ({reason})" for reason, names in by_reason.items()) or "nothing"
        return (
            f"LoRA fused paths: gated MLP node on {_summary(self.gated_mlps)}; shared-input node for the children "
            f"that get the same tensor (seen in the first forward) of {_summary(self.shared_input_parents)}. "
            f"Not fused: {not_fused}. Under torch.compile a gated MLP with a SiLU gate runs as one custom op, "
            "siblings that get one tensor share one A product, and the other layers run their modules (a compiled "
            "gated MLP recomputes act(gate) * up in backward); under autocast every layer runs its modules, and "
            "under FSDP a gated MLP runs its layers' own nodes"
        )


def install_fused_paths(model: nn.Module) -> FusionReport:
    """Install the fused paths on ``model``'s adapted layers where their structure fits (a second call starts
    over), log one info line of what was and was not fused and return it. A gated MLP node computes a SiLU gate
    with its own Triton kernels on CUDA (`gate_triton`), whether or not Liger-Kernel patched the module."""
    remove_fused_paths(model)
    gated, parents, not_fused, groups, consumers = [], [], {}, [], []
    producers = _install(model).producers = InputProducers()
    for name, module in model.named_modules():
        adapted = {n: c for n, c in module.named_children() if isinstance(c, LoRALinear)}
        if not adapted:
            continue
        mlp = _gated_mlp(module, adapted)
        if isinstance(mlp, str):
            not_fused[canonical_name(name)] = mlp
        elif mlp is not None:
            _install(module).mlp = _GatedMLP(module, *mlp, producers)
            gated.append(canonical_name(name))
            consumers.append(name)
            continue
        candidates = _by_input_width(adapted)
        for members in (m for m in candidates.values() if len(m) > 1):
            groups.append(SharedInputGroup(canonical_name(name), module, members, producers))
        if any(len(m) > 1 for m in candidates.values()):
            parents.append(canonical_name(name))
            consumers.append(name)
        for child, layer in adapted.items():
            reason = _why_alone(layer, candidates)
            if reason:
                not_fused[canonical_name(f"{name}.{child}" if name else child)] = reason
    first_forward = _FirstForwardLog(len(groups))
    for group in groups:
        group.first_forward = first_forward
    producers.watch(_sibling_leaves(model, consumers))
    report = FusionReport(gated, parents, not_fused)
    rank_zero_info(str(report))
    return report


def fold_gated_mlps(model: nn.Module) -> None:
    """Fold each fused gated MLP's frozen weights into its buffers now, as its first eager call would, where they
    are plain 2-D tensors (not sharded): a compiled MLP's custom op then runs on them instead of folding copies per
    call. Call it on the training device, before the first compiled step (`LoRAFinetuneCallback` does, as fit
    starts); under FSDP2 after ``fully_shard`` (which refuses the folded weights: they are not contiguous), where it
    leaves the sharded MLPs to their layers' own nodes."""
    for module in model.modules():
        installed = module.__dict__.get(_INSTALLED)
        if installed is not None and installed.mlp is not None:
            installed.mlp.fold()


def remove_fused_paths(model: nn.Module) -> None:
    """Undo `install_fused_paths`: every layer runs its own path again."""
    for module in model.modules():
        installed = module.__dict__.pop(_INSTALLED, None)
        if installed is not None:
            installed.remove(module)


def fused_paths_installed(model: nn.Module) -> bool:
    return any(_INSTALLED in module.__dict__ for module in model.modules())


def fused_wiring(model: nn.Module) -> dict[str, list[list[str]]]:
    """Which siblings share their input, as the first forward settled it: ``{parent name: [[child names in call
    order], ...]}`` (an empty list where none share), for the parents that have seen a forward."""
    wiring: dict[str, list[list[str]]] = {}
    for name, module in model.named_modules():
        installed = module.__dict__.get(_INSTALLED)
        for group in installed.groups if installed is not None else ():
            sets = group.sets if group.sets is not None else group._settled
            if sets is not None:
                shared = [[group.names[layer] for layer in siblings] for siblings in dict.fromkeys(sets.values())]
                wiring.setdefault(name, []).extend(shared)
    return wiring


def restore_fused_wiring(model: nn.Module, wiring: dict[str, list[list[str]]]) -> None:
    """Settle the shared-input groups as `fused_wiring` recorded them (from a checkpoint), so that a resumed run's
    first step takes the fused path that the run it resumes took, bit for bit. Parents not recorded (or recorded
    in another shape) watch their first forward as usual."""
    if not isinstance(wiring, dict):
        return
    for name, module in model.named_modules():
        installed = module.__dict__.get(_INSTALLED)
        recorded = wiring.get(name)
        if installed is None or not (isinstance(recorded, list) and all(isinstance(s, list) for s in recorded)):
            continue
        for group in installed.groups:
            layers = {child: layer for layer, child in group.names.items()}
            shared = [tuple(layers[c] for c in s) for s in recorded if s and all(c in layers for c in s)]
            group.settle({layer: siblings for siblings in shared for layer in siblings})


# ------------------------------------------------------------------------------------------------------ shared input


class SharedInputGroup:
    """Sibling layers of one parent, candidates for sharing their input; see the module docstring.

    What a forward saw (the sets of siblings that got one tensor, or a sibling that got another tensor later)
    takes effect at the start of the next forward that is not a recomputation inside backward, so that activation
    checkpointing recomputes a block exactly as its forward ran. Where such a forward may be recomputed (under
    saved-tensor hooks, as non-reentrant checkpointing's), the change waits until the backward of every forward run
    since has reached the parent: two forwards may come before a backward."""

    def __init__(
        self, parent_name: str, parent: nn.Module, members: dict[str, LoRALinear], producers: InputProducers
    ) -> None:
        self.parent_name = parent_name or "the model"
        self.names = {layer: name for name, layer in members.items()}
        self.sets: dict[LoRALinear, tuple[LoRALinear, ...]] | None = None  # None until a forward was seen
        self.first_forward: _FirstForwardLog | None = None
        self.producers = producers
        self._seen: dict[LoRALinear, torch.Tensor | None] = {}
        self._settled: dict[LoRALinear, tuple[LoRALinear, ...]] | None = None  # seen, in effect from the next forward
        self._turning_off: dict[tuple[LoRALinear, ...], str] = {}
        self._unfinished = 0  # forwards run with the old wiring since a change was seen, their backward to come
        self._pending: dict[tuple[LoRALinear, ...], tuple[torch.Tensor, int, dict[LoRALinear, torch.Tensor]]] = {}
        self._handles = [
            parent.register_forward_pre_hook(self._begin),
            parent.register_forward_hook(self._end, with_kwargs=True, always_call=True),
        ]
        for layer in members.values():
            layer.input_group = self
        _install(parent).groups.append(self)

    def take(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s output on ``x``, if the shared node ran on that tensor (unchanged since) when a sibling was
        called; otherwise ``None``, and `run` decides."""
        siblings = None if self.sets is None else self.sets.get(layer)
        pending = None if siblings is None else self._pending.get(siblings)
        if pending is None:
            return None
        source, version, outputs = pending
        if source is not x or version != _version(x) or layer not in outputs:
            return None
        out = outputs.pop(layer)
        if not outputs:
            del self._pending[siblings]
        return out

    def run(self, layer: LoRALinear, x: torch.Tensor, operands: LinearOperands) -> torch.Tensor | None:
        """``layer``'s output on ``x`` (``operands``: its `LoRALinear.fused_operands`) from the shared node, or
        ``None`` for its own path; `take` came first."""
        if self.sets is None:
            if self._settled is None:  # the first forward: watch who gets which tensor
                self._seen[layer] = x if layer not in self._seen else None  # called twice: never shares
            return None
        siblings = self.sets.get(layer)
        if siblings is None:
            return None
        if self._pending.pop(siblings, None) is not None:  # a sibling's call left outputs `take` did not match
            self._turning_off[siblings] = f"{self.names[layer]} got another tensor than its siblings"
        together = [operands if sibling is layer else sibling.fused_operands(x) for sibling in siblings]
        if any(o is None for o in together) or len({o.dropout for o in together}) > 1:
            return None
        outputs = dict(zip(siblings, lora_shared_input(x, together, self.producers.of(x)), strict=True))
        out = outputs.pop(layer)
        self._pending[siblings] = (x, _version(x), outputs)
        return out

    def run_traced(self, layer: LoRALinear, x: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile: ``layer``'s output on ``x`` with its ``h`` from `functional.shared_factor_products`
        over the siblings, which the first of them to be called on ``x`` computes and leaves on ``x`` (an attribute
        of the tensor, which Dynamo traces, also inside activation checkpointing) for the others; ``None`` for the
        module path. The siblings are those the first eager forward saw share their input, else every member of
        the group (a member later called on another tensor computes its own ``h``; its share of the first is
        unused). Each share is taken once; as the parent returns, its forward hook drops the shares left on its
        tensor arguments (`_drop_shares`), so that no later call takes a share of old factors; the attribute is
        ``None`` on a tensor with nothing left (Dynamo traces no ``delattr`` of a tensor)."""
        shared = getattr(x, _SHARED_PRODUCTS, None)
        products = None if shared is None else shared.get(self)
        operands = layer.fused_operands(x, traced=True)
        if operands is None:
            return None
        if products is None or layer not in products:
            sets = self._settled if self.sets is None else self.sets  # what an eager forward saw, if one ran
            siblings = self.names if sets is None else sets.get(layer, ())
            together = {s: operands if s is layer else s.fused_operands(x, traced=True) for s in siblings}
            together = {s: o for s, o in together.items() if o is not None and o.dropout == operands.dropout}
            if len(together) < 2 or layer not in together:
                return None
            if shared is None:
                shared = {}
                setattr(x, _SHARED_PRODUCTS, shared)
            products = shared.setdefault(self, {})  # siblings of another dropout may have shares waiting here
            products.update(zip(together, shared_factor_products(x, list(together.values())), strict=True))
        return linear_with_factor_product(x, operands, products.pop(layer))

    def settle(self, sets: dict[LoRALinear, tuple[LoRALinear, ...]]) -> None:
        """Take ``sets`` as what the first forward saw, in effect at once."""
        self.sets, self._settled = sets, None
        self._seen.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for layer in self.names:
            layer.input_group = None

    def _begin(self, module: nn.Module, args: Any) -> None:
        if torch.compiler.is_compiling():
            return
        self._pending.clear()
        if torch._C._current_graph_task_id() != -1 or self._unfinished:  # as the forwards to recompute ran
            return
        if self.sets is None and self._settled is not None:
            self.sets, self._settled = self._settled, None
        for siblings, reason in self._turning_off.items():
            for layer in siblings:
                self.sets.pop(layer, None)
            names = "+".join(self.names[layer] for layer in siblings)
            rank_zero_info(
                f"LoRA fused paths: {names} of {self.parent_name} run their own nodes from now on ({reason})"
            )
        self._turning_off.clear()

    def _end(self, module: nn.Module, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if torch.compiler.is_compiling():
            _drop_shares(self, (*args, *kwargs.values()))
            return
        self._pending.clear()
        if self.sets is None and self._settled is None and self._seen:
            self._settle()
        changing = (self.sets is None and self._settled is not None) or self._turning_off
        if changing and torch._C._current_graph_task_id() == -1 and _may_be_recomputed():
            node = _grad_fn(output)
            if node is not None:
                self._unfinished += 1
                node.register_prehook(self._backward_reached())

    def _backward_reached(self) -> Callable[[Any], None]:
        """A hook for the node of a forward's output: the first time backward reaches it, that forward is done."""
        reached = False

        def hook(grad_outputs: Any) -> None:
            nonlocal reached
            if not reached:
                reached = True
                self._unfinished -= 1

        return hook

    def _settle(self) -> None:
        """Group the layers seen in the first forward by the tensor they got."""
        classes: list[list[LoRALinear]] = []
        for layer, x in self._seen.items():
            match = next((c for c in classes if x is not None and self._seen[c[0]] is x), None)
            if match is None:
                classes.append([layer])
            else:
                match.append(layer)
        self._seen.clear()
        self._settled = {layer: tuple(c) for c in classes if len(c) > 1 for layer in c}
        if self.first_forward is not None:
            shared = ["+".join(self.names[layer] for layer in c) for c in classes if len(c) > 1]
            alone = [f"{self.parent_name}.{self.names[c[0]]}" for c in classes if len(c) == 1]
            self.first_forward.settled(shared, alone)


class _FirstForwardLog:
    """What every shared-input group saw in its first forward, logged as one info line once all have seen one."""

    def __init__(self, groups: int) -> None:
        self.waiting = groups
        self.shared: Counter[str] = Counter()
        self.alone: list[str] = []

    def settled(self, shared: list[str], alone: list[str]) -> None:
        self.shared.update(shared)
        self.alone += alone
        self.waiting -= 1
        if self.waiting == 0:
            together = ", ".join(f"{names} x{n}" if n > 1 else names for names, n in self.shared.items()) or "none"
            rank_zero_info(
                f"LoRA fused paths, seen in the first forward: one shared-input node each for {together}; own node "
                f"(another tensor than their siblings): {_summary(self.alone)}"
            )


def _may_be_recomputed() -> bool:
    """Whether saved-tensor hooks are on, as non-reentrant activation checkpointing's are in a forward that its
    backward runs again."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _grad_fn(output: Any) -> Any:
    """The autograd node of ``output``, or of the first tensor of a tuple or list output that has one."""
    tensors = output if isinstance(output, tuple | list) else (output,)
    return next((t.grad_fn for t in tensors if isinstance(t, torch.Tensor) and t.grad_fn is not None), None)


def _drop_shares(group: SharedInputGroup, values: Any) -> None:
    """Drop ``group``'s shares (`SharedInputGroup.run_traced`) from the tensors among ``values``."""
    for value in values:
        shared = getattr(value, _SHARED_PRODUCTS, None) if isinstance(value, torch.Tensor) else None
        if shared is not None and group in shared:
            del shared[group]
            if not shared:
                setattr(value, _SHARED_PRODUCTS, None)


def _version(x: torch.Tensor) -> int | None:
    """``x``'s in-place version counter (``None`` for an inference-mode tensor, which has none)."""
    return None if x.is_inference() else x._version


def _by_input_width(adapted: dict[str, LoRALinear]) -> dict[int, dict[str, LoRALinear]]:
    """The candidates for sharing an input, by input width: plain frozen-able ``nn.Linear`` bases without DoRA."""
    groups: dict[int, dict[str, LoRALinear]] = {}
    for name, layer in adapted.items():
        if _why_not_linear(layer) is None:
            groups.setdefault(layer.in_features, {})[name] = layer
    return groups


def _why_alone(layer: LoRALinear, candidates: dict[int, dict[str, LoRALinear]]) -> str | None:
    reason = _why_not_linear(layer)
    if reason is None and len(candidates[layer.in_features]) == 1:
        reason = "no sibling of its input width"
    return reason


def _why_not_linear(layer: LoRALinear) -> str | None:
    """Why ``layer`` can never run a fused node, or ``None``."""
    if type(layer.base_layer) is not nn.Linear:
        return f"{type(layer.base_layer).__name__} base"
    if type(layer.base_layer.weight.detach()) is not torch.Tensor:
        return f"{type(layer.base_layer.weight.detach()).__name__} weight"
    if layer.active_adapter in layer.specs and layer.spec().use_dora:
        return "DoRA"
    return None


# ------------------------------------------------------------------------------------------------------ producers


class InputProducers:
    """Leaf siblings of the fused modules (a decoder block's norms) that may produce a fused node's input. One
    whose autograd node keeps its input and which gives the same bits when run again (a probe, on the first call
    per device and dtype: Liger's RMSNorm qualifies, Hugging Face's, which keeps an fp32 copy, does not) has its
    outputs remembered, weakly; a node reading one of them, unchanged, keeps the module's input in its
    place and runs the module again in backward (`functional.InputProducer`): on CUDA, an RMSNorm by structure that
    gives `norm_triton.rms_norm`'s bits on a probe runs as that one launch instead."""

    def __init__(self) -> None:
        self._outputs: dict[int, _Produced] = {}  # by id(output), while the output lives
        # how to run each module again, or None where it is no producer (probed once per device, dtype and mode)
        self._reruns: dict[tuple[nn.Module, torch.device, torch.dtype, bool], _Rerun | None] = {}
        self._handles: list[Any] = []

    def watch(self, modules: list[nn.Module]) -> None:
        self._handles += [module.register_forward_hook(self._record) for module in modules]

    def of(self, x: torch.Tensor) -> InputProducer | None:
        """How ``x`` came about, if ``x`` is a producer's output, neither changed in place since: whichever call
        made it, so that a recomputation in backward (activation checkpointing) decides as its forward did, also
        after later forwards."""
        produced = self._outputs.get(id(x))
        if produced is None:
            return None
        output, version, rerun, source, source_version = produced
        kept = source()
        if output() is not x or x._version != version or kept is None or kept._version != source_version:
            return None
        return InputProducer(rerun, kept)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __getstate__(self) -> dict[str, Any]:
        """Without the outputs (weak references, which do not pickle and only matter within a step) and the reruns
        (probed again on the next forward)."""
        return {**self.__dict__, "_outputs": {}, "_reruns": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for earlier in ("_verdicts", "_latest", "_latest_of"):  # earlier versions' state, rebuilt as it runs
            state.pop(earlier, None)
        self.__dict__.update({"_reruns": {}, "_outputs": {}, **state})

    def _record(self, module: nn.Module, args: Any, output: Any) -> None:
        if torch.compiler.is_compiling() or len(args) != 1 or not isinstance(output, torch.Tensor):
            return
        (source,) = args
        if output.grad_fn is None or not isinstance(source, torch.Tensor) or source.is_inference():
            return
        if not (output.is_contiguous() and output.storage_offset() == 0):  # as a run in backward gives it
            return
        key = (module, source.device, source.dtype, module.training)
        if key not in self._reruns:
            self._reruns[key] = _rerun(module, source)
        rerun = self._reruns[key]
        if rerun is not None:
            self._outputs[id(output)] = _Produced(
                weakref.ref(output, functools.partial(self._forget, id(output))),
                output._version,
                rerun,
                weakref.ref(source),
                source._version,
            )

    def _forget(self, key: int, dead: weakref.ref) -> None:
        """Drop the record of an output that died (unless another output took its id since)."""
        if key in self._outputs and self._outputs[key].output is dead:
            del self._outputs[key]


class _Produced(NamedTuple):
    """A producer's call, weakly: its output and input with their in-place versions at the time."""

    output: weakref.ref
    version: int
    rerun: _Rerun
    source: weakref.ref
    source_version: int


def _rerun(module: nn.Module, like: torch.Tensor) -> _Rerun | None:
    """How to run ``module`` again on an input like ``like`` in backward, or ``None`` where it is no producer
    (`_keeps_its_input`)."""
    return _Rerun(module, like) if _keeps_its_input(module, like) else None


class _Rerun:
    """A producer run again in backward: as one `norm_triton.rms_norm` launch while the module is as it was when
    that kernel gave its output's bits on probes (type, forward, weight dtype and plain attributes such as ``eps``,
    ``offset`` or a casting mode), else by the module's forward as it is then."""

    def __init__(self, module: nn.Module, like: torch.Tensor) -> None:
        args = _rms_norm_args(module, like)
        matches = args is not None and _gives_the_kernel_s_bits(module, like, args)
        self.module, self.args = module, args
        self.probed = _state(module) if matches else None  # the module's state when the probes passed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.probed is not None and _state(self.module) == self.probed:
            from lora_lightning import norm_triton

            return norm_triton.rms_norm(x, self.module.weight, *self.args)
        return self.module.forward(x)


def _rms_norm_args(module: nn.Module, like: torch.Tensor) -> tuple[float, float] | None:
    """``(eps, offset)`` of a module with an RMSNorm's structure for inputs like ``like`` (a 1-D ``weight`` as wide
    on its device, a float ``variance_epsilon`` or ``eps``, a float ``offset`` or none), on CUDA with Triton."""
    weight = getattr(module, "weight", None)
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    offset = getattr(module, "offset", 0.0)
    if not (
        triton_applies(like)
        and isinstance(weight, torch.Tensor)
        and weight.shape == like.shape[-1:]
        and weight.device == like.device
        and isinstance(eps, float)
        and isinstance(offset, float)
    ):
        return None
    return eps, offset


def _gives_the_kernel_s_bits(module: nn.Module, like: torch.Tensor, args: tuple[float, float]) -> bool:
    """Whether ``module``'s output equals `norm_triton.rms_norm`'s bit for bit on probes of 64 rows and, for a norm
    at most 256 wide, 32768 rows (where an implementation may switch kernels: Liger's reduces rows in blocks)."""
    from lora_lightning import norm_triton

    width = like.shape[-1]
    generator = torch.Generator(device=like.device).manual_seed(0)
    try:
        with torch.no_grad():
            for rows in (64, 32768) if width <= 256 else (64,):
                probe = 4 * torch.randn(rows, width, generator=generator, device=like.device, dtype=like.dtype)
                if not torch.equal(norm_triton.rms_norm(probe, module.weight, *args), module.forward(probe)):
                    return False
    except Exception:  # a kernel that does not build for this norm: the module runs instead
        return False
    return True


def _state(module: nn.Module) -> tuple:
    """What a module computes by, as far as a rerun can tell: its type, an instance forward, its weight's dtype
    and its plain attributes."""
    plain = {k: v for k, v in vars(module).items() if isinstance(v, bool | int | float | str | type(None))}
    return type(module), module.__dict__.get("forward"), getattr(getattr(module, "weight", None), "dtype", None), plain


def _keeps_its_input(module: nn.Module, like: torch.Tensor) -> bool:
    """Whether ``module``'s autograd node keeps its input itself and a run without autograd gives the same bits,
    on a probe shaped like ``like``'s last dimension (saved-tensor hooks such as checkpointing's left out)."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    probe = torch.randn(2, 3, like.shape[-1], generator=generator, device=like.device, dtype=like.dtype)
    probe.requires_grad_(True)
    try:
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t), torch.enable_grad():
            out = module.forward(probe)
            kept = getattr(out.grad_fn, "saved_tensors", None) or ()
        with torch.no_grad():
            again = module.forward(probe)
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
        return False
    return any(t.data_ptr() == probe.data_ptr() for t in kept) and torch.equal(out, again)


def _sibling_leaves(model: nn.Module, consumers: list[str]) -> list[nn.Module]:
    """The leaf children without buffers or trainable parameters (norms, say) of the parents of ``consumers``."""
    modules = dict(model.named_modules())
    children = [child for name in consumers if name for child in modules[name.rpartition(".")[0]].children()]
    return [
        child
        for child in dict.fromkeys(children)
        if next(child.children(), None) is None
        and next(child.buffers(), None) is None
        and not any(p.requires_grad for p in child.parameters())
    ]


# ------------------------------------------------------------------------------------------------------ gated MLP


class _GatedMLP:
    """The fused forward of one gated MLP module; the module's own forward is the fallback."""

    def __init__(
        self,
        module: nn.Module,
        roles: tuple[str, str, str],
        layers: tuple[LoRALinear, LoRALinear, LoRALinear],
        act: nn.Module,
        producers: InputProducers,
    ) -> None:
        self.roles, self.layers, self.act, self.producers = roles, layers, act, producers
        self.buffers: MLPBuffers | None = None  # the layers' weights live here once the node has run
        self.elementwise = "silu" if _is_silu(act) else "torch"
        self.previous = module.__dict__.get("forward")  # an instance patch (e.g. Liger's), put back on removal
        module.__dict__["forward"] = _GatedMLPForward(module)

    def run(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        if torch.compiler.is_compiling() or not self._in_place(module):
            return None
        operands = [layer.fused_operands(x) for layer in self.layers]
        if any(o is None for o in operands) or operands[0].dropout != operands[1].dropout:
            return None
        buffers = self._folded(operands)
        if buffers is None:
            return None
        return lora_gated_mlp(x, self.act, *operands, self.elementwise, buffers, self.producers.of(x))

    def run_traced(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """Under torch.compile: the custom op (`functional.lora_gated_mlp_op`) for a SiLU gate with bias-free layers
        and no dropout, else ``None`` (with dropout the module path runs, whose masks Inductor draws: activation
        checkpointing in the compiled graph draws them again the same, where an opaque op would draw others)."""
        if self.elementwise != "silu" or not self._in_place(module) or self._managed_by_fsdp():
            return None
        operands = [layer.fused_operands(x, traced=True) for layer in self.layers]
        if any(o is None or o.bias is not None or o.dropout for o in operands):
            return None
        return lora_gated_mlp_op(x, *operands)

    def fold(self) -> None:
        """Fold the layers' frozen weights now, as the first fused call would, where they are plain 2-D tensors on
        a real device (for the adapters now active)."""
        weight = self.layers[0].base_layer._parameters.get("weight")
        if weight is None or weight.dim() != 2 or weight.device.type == "meta":
            return  # sharded (FSDP1 holds views of flat parameters as plain attributes) or not materialized
        operands = [layer.fused_operands(weight.new_empty(0, weight.shape[1])) for layer in self.layers]
        if all(o is not None for o in operands):
            self._folded(operands)

    def _managed_by_fsdp(self) -> bool:
        """Whether FSDP (2, or 1 with original parameters) manages the layers: it marks each module it manages."""
        return any(layer.base_layer.__dict__.get("_is_fsdp_managed_module") for layer in self.layers)

    def _in_place(self, module: nn.Module) -> bool:
        """Whether ``module``'s children are still the layers seen at install."""
        return all(getattr(module, role) is layer for role, layer in zip(self.roles, self.layers, strict=True))

    def _folded(self, operands: list[LinearOperands]) -> MLPBuffers | None:
        """The buffers the layers' weights are views of, folded anew where they are not (the first run, another
        rank, a weight replaced or moved); ``None`` where FSDP manages the layers: the weights it gathers for a
        forward are its own, and a folded copy would stay whole on every rank."""
        weights = [o.weight for o in operands]
        ranks = tuple(o.lora_a.shape[0] for o in operands)
        if self.buffers is None or self.buffers.ranks != ranks or not self.buffers.holds(*weights):
            if self._managed_by_fsdp():
                self.buffers = None
                return None
            with torch.no_grad(), torch.inference_mode(False):
                self.buffers = MLPBuffers.fold(*weights, *ranks)
                for weight, view in zip(weights, self.buffers.weights(), strict=True):
                    weight.data = view
        return self.buffers

    def remove(self, module: nn.Module) -> None:
        if self.buffers is not None:  # each weight gets its own storage back
            for layer, view in zip(self.layers, self.buffers.weights(), strict=True):
                weight = layer.base_layer.weight
                if weight.data_ptr() == view.data_ptr():
                    weight.data = view.clone(memory_format=torch.contiguous_format)
            self.buffers = None
        if not isinstance(module.__dict__.get("forward"), _GatedMLPForward):
            return  # someone patched the forward after us; leave theirs
        if self.previous is None:
            del module.__dict__["forward"]
        else:
            module.__dict__["forward"] = self.previous


class _GatedMLPForward:
    """A fused MLP module's forward: the fused node, else the forward it had. It holds its module (not a bound
    method of a module-level function), so that a deepcopy runs on the copy's own layers and a pickled model
    loads."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        mlp = module.__dict__[_INSTALLED].mlp
        if args or kwargs:
            return self.fallback(x, *args, **kwargs)
        # Compiled, a SiLU MLP without dropout runs as the custom op (also where Liger patched the forward: the op
        # runs the fused node's own SiLU kernels, as eager does); another runs its module's own forward under the
        # recompute policy, or a patched forward (Liger's SwiGLU, whose node keeps only G and U) as it is.
        if torch.compiler.is_compiling():
            out = mlp.run_traced(module, x)
            if out is not None:
                return out
            if torch.is_grad_enabled() and mlp.previous is None:
                return checkpoint(self.fallback, x, use_reentrant=False, context_fn=_recomputing_elementwise)
        out = mlp.run(module, x)
        return self.fallback(x) if out is None else out

    def fallback(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The forward the module had."""
        previous = self.module.__dict__[_INSTALLED].mlp.previous
        if previous is not None:
            return previous(x, *args, **kwargs)
        return type(self.module).forward(self.module, x, *args, **kwargs)


def _recomputing_elementwise() -> tuple[Any, Any]:
    """Selective checkpointing that recomputes elementwise results in backward, except sums and random draws, and
    keeps the rest: traced by torch.compile, a gated MLP keeps ``G`` and ``U`` (GEMM outputs, or sums where an
    adapter adds its update apart) but not ``act(G) * U``."""
    return create_selective_checkpoint_contexts(_recompute_elementwise)


_SUMS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)


def _traced(op: Any, args: Any, kwargs: Any) -> bool:
    """Whether checkpointing traces ``op`` into a graph (where a policy only tags nodes) rather than running it
    (where it keeps outputs and fails if they change in place): the test checkpointing itself uses, or the one it
    is made of (a proxy dispatch mode is tracing) where a release lacks it."""
    is_compiling = getattr(torch.utils.checkpoint, "_is_compiling", None)
    if is_compiling is not None:
        return bool(is_compiling(op, args, kwargs))
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY) is not None


def _recompute_elementwise(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    if not _traced(op, args, kwargs):
        # The region runs eagerly (a graph break inside it, an eager backend): there the adapters' in-place updates
        # would change outputs that the policy keeps, so the region is plainly checkpointed instead.
        return CheckpointPolicy.PREFER_RECOMPUTE
    tags = getattr(op, "tags", ())
    if torch.Tag.pointwise in tags and torch.Tag.nondeterministic_seeded not in tags and op not in _SUMS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE


def _gated_mlp(
    module: nn.Module, adapted: dict[str, LoRALinear]
) -> tuple[tuple[str, str, str], tuple[LoRALinear, ...], nn.Module] | str | None:
    """``((gate, up, down) child names, their layers, act)`` if ``module`` is a gated MLP; a reason if it has the
    parts of one (three adapted children with plain bases, one parameterless leaf child, a forward mapping a tensor
    to one of the same shape) but not the wiring; ``None`` if it is no candidate."""
    others = [c for n, c in module.named_children() if n not in adapted]
    acts = [c for c in others if next(c.parameters(), None) is None and next(c.children(), None) is None]
    if len(adapted) != 3 or len(acts) != 1:
        return None
    if any(p.device.type == "meta" or type(p.detach()) is not torch.Tensor for p in module.parameters()):
        return "parameters on the meta device or sharded: its structure cannot be probed"
    if any(_why_not_linear(layer) for layer in adapted.values()):
        return None  # each layer is reported with its own reason
    results = {order: _probe(module, adapted, order, acts[0]) for order in itertools.permutations(adapted)}
    matches = [order for order, result in results.items() if result is True]
    if len(matches) == 1:
        return matches[0], tuple(adapted[n] for n in matches[0]), acts[0]
    if matches or any(result is False for result in results.values()):
        return "its forward is not down(act(gate(x)) * up(x))"
    return None


def _probe(module: nn.Module, adapted: dict[str, LoRALinear], order: tuple[str, ...], act: nn.Module) -> bool | None:
    """Whether ``module``'s forward equals ``down(act(gate(x)) * up(x))`` on a probe input with the children in
    ``order``; ``None`` where the forward or the formula does not run on one tensor of gate's input width."""
    gate, up, down = (adapted[n] for n in order)
    weight = gate.base_layer.weight
    generator = torch.Generator(device=weight.device).manual_seed(0)
    probe = torch.randn(2, 3, gate.in_features, generator=generator, device=weight.device, dtype=weight.dtype)
    tolerance = 1e-4 if torch.finfo(weight.dtype).bits >= 32 else 2e-2
    try:
        with torch.no_grad(), _evaluating(module):
            want = module.forward(probe)
            got = down(act(gate(probe)) * up(probe))
    except (RuntimeError, ValueError, TypeError, AttributeError, IndexError):
        return None
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return None
    scale = want.float().norm()
    return bool(scale > 0 and (got.float() - want.float()).norm() <= tolerance * scale)


@contextlib.contextmanager
def _evaluating(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode (no dropout) for the block, each submodule's mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _is_silu(act: nn.Module) -> bool:
    probe = torch.linspace(-6, 6, 97)
    with torch.no_grad():
        try:
            return torch.allclose(act(probe), probe * torch.sigmoid(probe), atol=1e-6)
        except (RuntimeError, TypeError):
            return False


# ------------------------------------------------------------------------------------------------------ helpers


class _Installed:
    """What `install_fused_paths` put on one module, so that `remove_fused_paths` can take it off."""

    def __init__(self) -> None:
        self.groups: list[SharedInputGroup] = []
        self.mlp: _GatedMLP | None = None
        self.producers: InputProducers | None = None

    def remove(self, module: nn.Module) -> None:
        for group in self.groups:
            group.remove()
        if self.producers is not None:
            self.producers.remove()
        if self.mlp is not None:
            self.mlp.remove(module)


def _install(module: nn.Module) -> _Installed:
    return module.__dict__.setdefault(_INSTALLED, _Installed())


def _summary(names: list[str]) -> str:
    """``names`` compressed: ``model.layers.*.mlp x16`` for names that differ only in numbers."""
    if not names:
        return "none"
    by_pattern: dict[str, list[str]] = {}
    for name in names:
        by_pattern.setdefault(".".join("*" if part.isdigit() else part for part in name.split(".")), []).append(name)
    shown = [f"{p} x{len(group)}" if len(group) > 1 else group[0] or "the model" for p, group in by_pattern.items()]
    return ", ".join(shown)

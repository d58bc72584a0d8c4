"""Pure functions that put LoRA layers into a model and take them out again."""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from lora_lightning import quant
from lora_lightning.adapters import set_active_adapter
from lora_lightning.config import ALL_LINEAR, LoRAConfig, is_adapter_name
from lora_lightning.layers import LoRALayer, LoRALinear, lora_layer_type
from lora_lightning.modules import canonical_name, dotted_suffixes, is_within, name_matcher, replace_module
from lora_lightning.params import (
    ParamSummary,
    adapter_names,
    lora_layers,
    mark_only_adapters_trainable,
    mark_trained_in_full,
    param_summary,
    tied_parameter_ids,
    trained_in_full_modules,
)

SUPPORTED_LAYERS = "nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, transformers' Conv1D (GPT-2)"


class TargetError(ValueError):
    """The configured target, exclude or modules_to_save names do not fit the model."""


@dataclass(frozen=True)
class InjectionReport:
    """What `inject_lora` adapted, and the parameter counts afterwards; ``left_out`` are the output heads that
    ``target_modules="all-linear"`` did not adapt."""

    targets: list[str]
    modules_to_save: list[str]
    params: ParamSummary
    left_out: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        layers = f"{len(self.targets)} layer{'' if len(self.targets) == 1 else 's'}"
        saved = f"; trained in full: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        left_out = f"; all-linear left out: {', '.join(self.left_out)}" if self.left_out else ""
        return f"LoRA on {layers}; {self.params}{saved}{left_out}"


@dataclass(frozen=True)
class _Plan:
    targets: list[str]
    modules_to_save: list[str]
    left_out: list[str]
    wide_ranks: list[str]  # "'name' r=20 (16 -> 32)": ranks above a layer's smaller side, as PEFT allows


def find_targets(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> list[str]:
    """Names of the layers `inject_lora` would adapt; raises `TargetError` listing candidates."""
    return _plan(model, config, adapter_name).targets


def inject_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> InjectionReport:
    """Add adapter ``adapter_name`` to every targeted layer (wrapping it in its LoRA layer type, or joining
    the adapters a LoRA layer already has), make it the active adapter, freeze everything else
    (``modules_to_save`` stay trainable) and return a report. Everything is checked first: on error the
    model is untouched."""
    plan = _plan(model, config, adapter_name)
    if plan.wide_ranks:
        warnings.warn(
            f"r exceeds the smaller side of {len(plan.wide_ranks)} layer(s), so the update's rank stays below r "
            f"there (PEFT allows this too; it only costs memory): {', '.join(plan.wide_ranks[:10])}",
            stacklevel=2,
        )
    for name in plan.targets:
        module = model.get_submodule(name)
        spec = config.spec_for(canonical_name(name))
        if isinstance(module, LoRALayer):
            module.add_adapter(adapter_name, spec)
        else:
            replace_module(model, name, lora_layer_type(module)(module, spec, adapter_name))
    for _, layer in lora_layers(model):
        layer.active_adapter = adapter_name
    for name in plan.modules_to_save:
        mark_trained_in_full(model.get_submodule(name))
    mark_only_adapters_trainable(model, adapter_name)
    return InjectionReport(plan.targets, plan.modules_to_save, param_summary(model), plan.left_out)


def prepare_adapter(
    model: nn.Module, config: LoRAConfig | None, adapter_name: str = "default"
) -> InjectionReport | None:
    """Make adapter ``adapter_name`` the one that trains. A model without it gets it injected from ``config``
    (the report is returned); a model that has it (a second fit, or `load_adapter`) trains it as it is, after a
    check that ``config``, if given, describes it (it would be silently ignored otherwise). Either way it becomes
    the active adapter and everything else is frozen."""
    if next(lora_layers(model, adapter_name), None) is None:
        if config is None:
            raise ValueError(
                f"config=None needs a model that already has adapter {adapter_name!r}; it has "
                f"{adapter_names(model)}; pass a LoRAConfig to inject one"
            )
        _refuse_sharded(model)
        return inject_lora(model, config, adapter_name)
    for layer_name, layer in lora_layers(model, adapter_name) if config is not None else ():
        found, wanted = layer.spec(adapter_name), config.spec_for(canonical_name(layer_name))
        if found != wanted:
            raise ValueError(
                f"the model already has adapter {adapter_name!r}, with {found} on {layer_name!r}, but config=... "
                f"asks for {wanted}; pass config=None to train the existing adapter, or give the new one another "
                "adapter_name"
            )
    set_active_adapter(model, adapter_name)
    mark_only_adapters_trainable(model, adapter_name)
    return None


def _refuse_sharded(model: nn.Module) -> None:
    """Adapters injected after FSDP2's ``fully_shard`` would be plain tensors that no rank shares: every rank
    would silently train its own. Injection must come first."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise RuntimeError(
            "the module's parameters are already sharded (fully_shard ran in configure_model), so adapters "
            "injected now would not be sharded or synchronised; call inject_lora(self, config) in configure_model "
            "before fully_shard and pass LoRAFinetuneCallback(None) (docs/multi_gpu.md)"
        )


def merge_lora(model: nn.Module, adapter_name: str | None = None) -> nn.Module:
    """Fold adapter ``adapter_name`` (the active one by default) into the base weights and put the plain
    base layers back, dropping any other adapters (zero inference overhead). A 4-bit base is dequantized
    first: the merged layer is a plain ``nn.Linear`` in the adapter's dtype, and a warning says so. A base
    weight that is tied to another module (an input embedding and its output head) gets its own copy first,
    so the merge changes that layer only, and a warning says so."""
    dequantized = Counter()
    tied = tied_parameter_ids(model)
    untied = []
    for name, layer in list(lora_layers(model)):
        wanted = adapter_name or layer.active_adapter
        if layer.merged and layer.merged_adapter != wanted:
            layer.unmerge()
        if not layer.merged and wanted in layer.specs:
            kind = quant.describe(layer.base_layer) if quant.is_quantized(layer.base_layer) else None
            weight = layer.base_layer.weight
            if kind is None and id(weight) in tied:
                layer.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                untied.append(name)
            layer.merge(wanted)
            if kind:
                dequantized[f"{kind} -> nn.Linear({layer.base_layer.weight.dtype})"] += 1
        replace_module(model, name, layer.base_layer)
    if dequantized:
        counts = ", ".join(f"{n} x {kind}" for kind, n in dequantized.items())
        warnings.warn(f"merge_lora dequantized 4-bit layers to hold the merged weights: {counts}", stacklevel=2)
    if untied:
        warnings.warn(
            f"merge_lora untied the weights of {untied} from the modules they were shared with (e.g. a tied output "
            "head), which keep the base weights; tying them again (tie_weights()) would undo part of the merge",
            stacklevel=2,
        )
    return model


def unload_lora(model: nn.Module) -> nn.Module:
    """Remove every adapter without merging, restoring the original layers and weights."""
    for name, layer in list(lora_layers(model)):
        if layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    return model


def _plan(model: nn.Module, config: LoRAConfig, adapter_name: str) -> _Plan:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}; pass the model object itself")
    if not isinstance(config, LoRAConfig):
        raise TypeError(
            f"config must be a LoRAConfig, got {type(config).__name__}; build one with LoRAConfig(r=8, ...) "
            "or LoRAConfig.from_dict(values)"
        )
    if not is_adapter_name(adapter_name):
        raise ValueError(f"adapter_name={adapter_name!r}: must be a non-empty name without dots, e.g. 'default'")
    existing = [name for name, _ in lora_layers(model, adapter_name)]
    if existing:
        raise TargetError(
            f"the model already has adapter {adapter_name!r} on {len(existing)} layers (e.g. {existing[0]!r}); "
            "give the new adapter another adapter_name, or delete_adapter/unload_lora the old one first"
        )
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise TargetError(f"LoRA layers {merged[:3]} have a merged adapter; unmerge them before adding adapters")
    others = [n for n in adapter_names(model) if n != adapter_name]
    shared = [n for n, _ in trained_in_full_modules(model)] or config.modules_to_save
    if others and shared:
        raise TargetError(
            f"adapter {adapter_name!r} cannot join adapters {others}: modules_to_save ({shared}) are trained in "
            "full in place, so every adapter would share them and switching adapters would not switch them; "
            "use modules_to_save on a model with a single adapter"
        )
    modules = _visible_modules(model)
    problems: list[str] = []

    saved = _select(modules, config.modules_to_save, "modules_to_save", problems) if config.modules_to_save else []
    inside_saved = {n for n in modules if any(is_within(n, s) for s in saved)}

    left_out = []
    if config.target_modules == ALL_LINEAR:
        heads = output_heads(model)
        linears = [n for n, m in modules.items() if lora_layer_type(m) is LoRALinear]
        targets = [n for n in linears if n not in heads]
        left_out = [n for n in linears if n in heads]
    else:
        targets = _select(modules, config.target_modules, "target_modules", problems)
        unsupported = [f"{n} ({type(modules[n]).__name__})" for n in targets if lora_layer_type(modules[n]) is None]
        if unsupported:
            problems.append(
                f"target_modules selects layers of unsupported types: {unsupported}; supported: {SUPPORTED_LAYERS}"
            )
    if config.exclude_modules:
        excluded = set(_select(modules, config.exclude_modules, "exclude_modules", problems))
        targets = [n for n in targets if n not in excluded]
    in_saved = [n for n in targets if n in inside_saved]
    targets = [n for n in targets if n not in inside_saved]

    if not targets and not problems:
        why = f" (modules_to_save={saved} holds {in_saved}, which are trained in full instead)" if in_saved else ""
        problems.append(f"target_modules={config.target_modules!r} leaves no layer to adapt{why}")
    for name in targets:
        kind = lora_layer_type(modules[name])
        if kind is not None:
            spec = config.spec_for(canonical_name(name))
            problems += [f"layer {name!r}: {p}" for p in kind.problems(modules[name], spec)]
    size_problems, wide_ranks = _size_problems(modules, targets, config)
    problems += size_problems
    if problems:
        raise TargetError(
            "cannot inject LoRA:\n  - " + "\n  - ".join(problems) + f"\nadaptable layers: {_candidates(modules)}"
        )
    return _Plan(targets, saved, left_out, wide_ranks)


def _size_problems(
    modules: dict[str, nn.Module], targets: list[str], config: LoRAConfig
) -> tuple[list[str], list[str]]:
    """Every target's adapter sized from its shapes, without allocating: the problems (adapters that cannot be
    built, or do not fit into the free memory of their device; an SVD/QR init asking for more directions than the
    weight has) and the ranks above a layer's smaller side (``"'name' r=20 (16 -> 32)"``), which only warn."""
    problems, wide_ranks = [], []
    sizes: dict[torch.device, list[tuple[int, str]]] = {}
    shapes_of: dict[tuple, list[tuple[int, ...]]] = {}  # layers of one shape (most of a transformer) share theirs
    for name in targets:
        base, kind = modules[name], lora_layer_type(modules[name])
        if kind is None:
            continue
        spec = config.spec_for(canonical_name(name))
        key = (kind, type(base), tuple(base.weight.shape), kind.features(base), spec)
        try:
            if key not in shapes_of:
                shapes_of[key] = list(kind.adapter_shapes(base, spec).values())
        except (RuntimeError, OverflowError, ValueError) as err:
            problems.append(f"layer {name!r}: an adapter with r={spec.r} cannot be built ({str(err).splitlines()[0]})")
            continue
        shapes = shapes_of[key]
        # A is [r, in, ...] and B is [out, r, ...] for every layer type: the update's rank is at most min(in, out)
        inputs, outputs = math.prod(shapes[0][1:]), shapes[1][0]
        if spec.r > min(inputs, outputs):
            wide_ranks.append(f"{name!r} r={spec.r} ({inputs} -> {outputs})")
            if spec.init.startswith(("pissa", "olora")):
                problems.append(
                    f"layer {name!r}: init={spec.init!r} takes the top r={spec.r} singular directions of a "
                    f"{inputs} -> {outputs} weight, which has {min(inputs, outputs)}; lower r there (rank_pattern)"
                )
        # adapters go where the base weight is, in its dtype (a 4-bit base's compute dtype)
        dtype = quant.compute_dtype(base) if quant.is_quantized(base) else base.weight.dtype
        size = sum(map(math.prod, shapes)) * dtype.itemsize
        sizes.setdefault(base.weight.device, []).append((size, f"{name!r} r={spec.r}"))
    return problems + _memory_problems(sizes), wide_ranks


def free_bytes(device: torch.device) -> int | None:
    """Memory that can still be allocated on ``device`` (``None``: unknown or unlimited, as on ``meta``)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as meminfo:
            available = next(line for line in meminfo if line.startswith("MemAvailable:"))
        return int(available.split()[1]) * 1024
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _memory_problems(sizes: dict[torch.device, list[tuple[int, str]]]) -> list[str]:
    """The adapters of each device (``(bytes, "'layer' r=...")``) must fit into what is free there."""
    problems = []
    for device, layers in sizes.items():
        need, free = sum(n for n, _ in layers), free_bytes(device)
        if free is not None and need > free:
            largest = ", ".join(f"{what} ({_bytes(n)})" for n, what in sorted(layers, reverse=True)[:5])
            problems.append(
                f"the adapters need {_bytes(need)} on {device}, which has {_bytes(free)} free; the largest: "
                f"{largest}; lower r (or rank_pattern) for these layers"
            )
    return problems


def _bytes(n: float) -> str:
    """``n`` bytes in decimal units, e.g. ``192.0 TB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _select(modules: dict[str, nn.Module], pattern: list[str] | str, field: str, problems: list[str]) -> list[str]:
    """Module names matching ``pattern``; every list entry (or the regex) must match at least one."""
    selected = list(filter(name_matcher(pattern), modules))
    if isinstance(pattern, str):
        unmatched = [] if selected else [pattern]
    else:
        covered = {suffix for name in selected for suffix in dotted_suffixes(name)}
        unmatched = [entry for entry in pattern if entry not in covered]
    if unmatched:
        problems.append(f"{field}: {unmatched} match no module of the model")
    return selected


def _visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by the names a user sees and writes: without wrapper segments (`canonical_name`; a
    ``torch.compile``'d ``net`` lists its layers as ``net.0``, not ``net._orig_mod.0``, and the wrapper stands for
    the module it wraps), and with a LoRA layer standing for its base layer (it is matched by its own name and
    adapted by adding an adapter) and nothing inside it listed."""
    modules = {}
    inside = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, LoRALayer):
            inside = (name + ".",)
            module = module.base_layer
        modules.setdefault(canonical_name(name), module)
    return modules


def output_heads(model: nn.Module) -> set[str]:
    """The output layers that 'all-linear' leaves alone. Hugging Face models name theirs: the module any of them
    reports from ``get_output_embeddings()``, else a task head called ``classifier`` or ``score``; a headless
    backbone has none, so all its layers are adapted, as PEFT does. Outside Hugging Face models, the last
    linear layer is taken for the head (a plain ``nn.Module``, or a head put on top of a backbone). Names are
    those of `_visible_modules`."""
    named = [(canonical_name(n), m) for n, m in model.named_modules()]
    hf_models = {n: m for n, m in named if callable(getattr(m, "get_output_embeddings", None))}
    heads = set()
    for hf_model in hf_models.values():
        head = hf_model.get_output_embeddings()
        if isinstance(head, nn.Module):
            heads.update(n for n, m in named if m is head)
    if heads:
        return heads
    linears = [n for n, m in _visible_modules(model).items() if lora_layer_type(m) is LoRALinear]
    task_heads = {f"{n}.{leaf}".lstrip(".") for n in hf_models for leaf in ("classifier", "score")}
    heads.update(n for n in linears if n in task_heads)
    if heads:
        return heads
    outside = [n for n in linears if not any(is_within(n, h) for h in hf_models)]
    return set(outside[-1:])


def _candidates(modules: dict[str, nn.Module], limit: int = 20) -> str:
    """The adaptable layers by `_shown_name`, counted: ``q_proj (x24), ..., net.0``."""
    counts = Counter(_shown_name(n) for n, m in modules.items() if lora_layer_type(m) is not None)
    if not counts:
        return f"none (the model has no layer of a supported type: {SUPPORTED_LAYERS})"
    shown = [f"{leaf} (x{count})" if count > 1 else leaf for leaf, count in counts.most_common(limit)]
    more = f", ... {len(counts) - limit} more" if len(counts) > limit else ""
    return ", ".join(shown) + more


def _shown_name(name: str) -> str:
    """The shortest dotted suffix of ``name`` that does not start with a position: ``q_proj`` for
    ``model.layers.0.self_attn.q_proj``, ``net.0`` for ``net.0`` (an index alone names no layer)."""
    parts = name.split(".")
    start = len(parts) - 1
    while start > 0 and parts[start].isdigit():
        start -= 1
    return ".".join(parts[start:])

"""Pure functions that put LoRA layers into a model and take them out again."""

from __future__ import annotations

import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lora_lightning import quant
from lora_lightning.adapters import set_active_adapter
from lora_lightning.config import ALL_LINEAR, LoRAConfig, is_adapter_name
from lora_lightning.fused import remove_fused_paths
from lora_lightning.layers import (
    SUPPORTED_LAYERS,
    AdapterModule,
    LoRALayer,
    LoRALinear,
    LoRAParameter,
    ModulesToSave,
    ParameterTarget,
    TrainableTokens,
    copies_of,
    innermost,
    lora_layer_type,
)
from lora_lightning.modules import canonical_name, is_within, replace_module
from lora_lightning.params import (
    ParamSummary,
    adapter_modules,
    adapter_names,
    lora_layers,
    mark_only_adapters_trainable,
    param_summary,
    tied_parameter_ids,
)
from lora_lightning.peft_format import TOKENS_KEY, split_key
from lora_lightning.selection import (
    in_attention,
    input_embeddings,
    layer_filter,
    overlap_problems,
    parameter_targets,
    saved_groups,
    select,
    token_targets,
)
from lora_lightning.sizing import size_problems


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
    parameters: list[str] = field(default_factory=list)  # ``target_parameters``: ``<module>.<parameter>``
    trainable_tokens: list[str] = field(default_factory=list)  # embeddings (and modules tied to them)

    def __str__(self) -> str:
        layers = f"{len(self.targets)} layer{'' if len(self.targets) == 1 else 's'}"
        parameters = f" and {len(self.parameters)} parameter(s)" if self.parameters else ""
        saved = f"; trained in full: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""
        tokens = f"; trainable token rows in: {', '.join(self.trainable_tokens)}" if self.trainable_tokens else ""
        left_out = f"; all-linear left out: {', '.join(self.left_out)}" if self.left_out else ""
        return f"LoRA on {layers}{parameters}; {self.params}{saved}{tokens}{left_out}"


@dataclass(frozen=True)
class _Plan:
    targets: list[str]
    parameters: dict[str, list[str]]  # module -> its parameters that get adapters, innermost first
    saved: list[tuple[str, ...]]  # modules_to_save, in groups copied together (tied weights stay tied)
    tokens: dict[str, list[int]]  # embedding -> the rows trainable_token_indices trains
    tied_tokens: dict[str, str]  # module tied to such an embedding -> the embedding
    left_out: list[str]
    notes: list[str]  # what only warns: ranks above a layer's smaller side (as PEFT allows), ties left out, ...


def find_targets(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> list[str]:
    """Names of the layers `inject_lora` would adapt; raises `TargetError` listing candidates."""
    return _plan(model, config, adapter_name).targets


def inject_lora(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> InjectionReport:
    """Add adapter ``adapter_name`` to every targeted layer (wrapping it in its LoRA layer type, or joining
    the adapters a LoRA layer already has) and parameter (``target_parameters``), give it its own copy of each
    ``modules_to_save`` module and its own rows of ``trainable_token_indices``, make it the active adapter, freeze
    everything else and return a report. Everything is checked first: on error the model is untouched."""
    plan = _plan(model, config, adapter_name)
    for note in plan.notes:
        warnings.warn(note, stacklevel=2)
    for name in plan.targets:
        module = model.get_submodule(name)
        spec = config.spec_for(canonical_name(name))
        if isinstance(module, LoRALayer):
            module.add_adapter(adapter_name, spec)
        else:
            replace_module(model, name, lora_layer_type(module)(module, spec, adapter_name))
    for name, parameters in plan.parameters.items():
        for parameter in parameters:
            spec = config.spec_for(canonical_name(f"{name}.{parameter}"))
            layer = _parameter_layer(model.get_submodule(name), parameter)
            if layer is not None:
                layer.add_adapter(adapter_name, spec)
            else:
                replace_module(model, name, LoRAParameter(model.get_submodule(name), parameter, spec, adapter_name))
    _add_copies(model, plan.saved, adapter_name)
    for name, indices in plan.tokens.items():
        _wrapper(model, name, TrainableTokens).add_adapter(adapter_name, indices)
    for name, source in plan.tied_tokens.items():
        embedding = model.get_submodule(source)
        _wrapper(model, name, lambda m, e=embedding: TrainableTokens(m, tied_to=e)).add_adapter(
            adapter_name, plan.tokens[source]
        )
    for _, module in adapter_modules(model):
        module.active_adapter = adapter_name
    mark_only_adapters_trainable(model, adapter_name)
    return InjectionReport(
        plan.targets,
        [name for group in plan.saved for name in group],
        param_summary(model),
        plan.left_out,
        [f"{name}.{parameter}" for name, parameters in plan.parameters.items() for parameter in parameters],
        [*plan.tokens, *plan.tied_tokens],
    )


def add_modules_to_save(model: nn.Module, names: list[str], adapter_name: str, ensure_weight_tying: bool) -> None:
    """Give adapter ``adapter_name`` its own copies of the modules ``names`` (trained in full), as `inject_lora` does
    for ``modules_to_save``."""
    groups, _ = saved_groups(names, _visible_modules(model), ensure_weight_tying)
    _add_copies(model, groups, adapter_name)


def _add_copies(model: nn.Module, groups: list[tuple[str, ...]], adapter_name: str) -> None:
    for group in groups:
        for name, copied in zip(group, copies_of([model.get_submodule(n) for n in group]), strict=True):
            _wrapper(model, name, ModulesToSave).add_adapter(adapter_name, copied)


def saved_shapes(model: nn.Module, name: str) -> dict[str, tuple[int, ...]]:
    """The tensors a ``modules_to_save`` copy of module ``name`` holds, keyed as in a PEFT file, with their shapes."""
    return {k: tuple(t.shape) for k, t in innermost(model.get_submodule(name)).state_dict().items()}


def planned_tensors(
    model: nn.Module, config: LoRAConfig, adapter_name: str = "default"
) -> dict[str, tuple[str, dict[str, tuple[int, ...]]]]:
    """What `inject_lora` would give adapter ``adapter_name``, checked as it checks, without changing anything:
    ``{module: (what holds the tensors there, {key in a PEFT file: shape})}``, module names relative to ``model``
    (a nested LoRA layer's through its outer one's ``base_layer``)."""
    plan = _plan(model, config, adapter_name)
    modules = _visible_modules(model)
    planned: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {}

    def add(holder: str, kind: str, shapes: dict[str, tuple[int, ...]]) -> None:
        for key, shape in shapes.items():
            inner, suffix = split_key(f"{holder}.{key}") or (holder, key)
            planned.setdefault(inner, (kind if inner == holder else "LoRALinear", {}))[1][suffix] = shape

    for name in plan.targets:
        kind = lora_layer_type(modules[name])
        add(name, kind.__name__, kind.adapter_shapes(modules[name], config.spec_for(canonical_name(name))))
    for name, parameters in plan.parameters.items():
        chain = _parameter_chain(model.get_submodule(name))
        chain = [p for p in reversed(parameters) if p not in chain] + chain  # new wrappers go outside, in order
        for depth, parameter in enumerate(chain):
            if parameter in parameters:
                spec = config.spec_for(canonical_name(f"{name}.{parameter}"))
                shapes = LoRAParameter.adapter_shapes(ParameterTarget(modules[name], parameter), spec)
                add(name + ".base_layer" * depth, LoRAParameter.__name__, shapes)
    for name in (n for group in plan.saved for n in group):
        planned[name] = ("modules_to_save", saved_shapes(model, name))
    for name, indices in plan.tokens.items():
        planned[name] = ("trainable_token_indices", {TOKENS_KEY: (len(indices), modules[name].weight.shape[1])})
    return planned


def _parameter_chain(module: nn.Module) -> list[str]:
    """The parameters that the `LoRAParameter` wrappers at ``module`` adapt, outermost first."""
    chain = []
    while isinstance(module, LoRAParameter):
        chain.append(module.parameter_name)
        module = module.base_layer
    return chain


def _wrapper(model: nn.Module, name: str, make: Any) -> AdapterModule:
    """The wrapper at ``name`` (made by ``make(module)`` and put in place if it is not there yet)."""
    module = model.get_submodule(name)
    if isinstance(module, AdapterModule):
        return module
    wrapper = make(module)
    replace_module(model, name, wrapper)
    return wrapper


def _parameter_layer(module: nn.Module, parameter: str) -> LoRAParameter | None:
    """The `LoRAParameter` among the wrappers at ``module`` that adapts ``parameter``, if there is one."""
    while isinstance(module, LoRAParameter):
        if module.parameter_name == parameter:
            return module
        module = module.base_layer
    return None


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
        found, wanted = layer.spec(adapter_name), config.spec_for(_spec_name(layer_name, layer))
        if found != wanted:
            raise ValueError(
                f"the model already has adapter {adapter_name!r}, with {found} on {layer_name!r}, but config=... "
                f"asks for {wanted}; pass config=None to train the existing adapter, or give the new one another "
                "adapter_name"
            )
    set_active_adapter(model, adapter_name)
    mark_only_adapters_trainable(model, adapter_name)
    return None


def _spec_name(layer_name: str, layer: LoRALayer) -> str:
    """The name ``rank_pattern``/``alpha_pattern`` match for ``layer``: its module's, or its parameter's."""
    if isinstance(layer, LoRAParameter):
        owner = layer_name.split(".base_layer")[0]
        return canonical_name(f"{owner}.{layer.parameter_name}")
    return canonical_name(layer_name)


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
    base layers back, dropping any other adapters (zero inference overhead): a ``modules_to_save`` module becomes
    the adapter's copy, trained token rows are written into the embedding. A 4-bit base is dequantized
    first: the merged layer is a plain ``nn.Linear`` in the adapter's dtype, and a warning says so. A base
    weight that is tied to another module (an input embedding and its output head) gets its own copy first,
    so the merge changes that layer only, and a warning says so. What cannot be merged (an adapter on a grouped
    convolution, a ``lora_bias`` on a layer without a bias) is refused before anything changes."""
    modules = list(adapter_modules(model))
    wanted = {name: adapter_name or module.active_adapter for name, module in modules}
    problems = [f"{name}: {p}" for name, m in modules if (p := wanted[name] and m.fold_problem(wanted[name]))]
    if problems:
        raise RuntimeError("merge_lora: cannot merge:\n  - " + "\n  - ".join(problems))
    remove_fused_paths(model)  # they run the adapter layers, which go; each base weight gets its own storage back
    dequantized = Counter()
    tied = tied_parameter_ids(model)
    untied = []
    for name, module in reversed(modules):  # inner modules first: an outer one's removal renames them
        kind = None
        if isinstance(module, LoRALayer) and not module.merged and wanted[name] in module.specs:
            kind = quant.describe(module.base_layer) if quant.is_quantized(module.base_layer) else None
            weight = module._base_param() if kind is None else None
            if weight is not None and id(weight) in tied and isinstance(module.base_layer.weight, nn.Parameter):
                module.base_layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
                untied.append(name)
        folded = module.fold(wanted[name])
        replace_module(model, name, folded)
        if kind:
            dequantized[f"{kind} -> nn.Linear({folded.weight.dtype})"] += 1
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
    """Remove every adapter without merging, restoring the original layers and weights (and the originals of
    ``modules_to_save``)."""
    remove_fused_paths(model)
    for name, module in reversed(list(adapter_modules(model))):
        if isinstance(module, LoRALayer) and module.merged:
            module.unmerge()
        replace_module(model, name, module.wrapped)
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
    existing = [name for name, _ in adapter_modules(model, adapter_name)]
    if existing:
        raise TargetError(
            f"the model already has adapter {adapter_name!r} on {len(existing)} layers (e.g. {existing[0]!r}); "
            "give the new adapter another adapter_name, or delete_adapter/unload_lora the old one first"
        )
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise TargetError(f"LoRA layers {merged[:3]} have a merged adapter; unmerge them before adding adapters")
    modules = _visible_modules(model)
    outer = {name: model.get_submodule(name) for name in modules}
    problems: list[str] = []

    saved = select(modules, config.modules_to_save, "modules_to_save", problems) if config.modules_to_save else []
    inside_saved = {n for n in modules if any(is_within(n, s) for s in saved)}
    groups, tied_left_out = saved_groups(saved, modules, config.ensure_weight_tying)
    saved = [name for group in groups for name in group]
    tokens, tied_tokens = token_targets(modules, input_embeddings(model), config, problems)

    left_out = []
    if config.target_modules == ALL_LINEAR:
        heads = output_heads(model)
        linears = [n for n, m in modules.items() if lora_layer_type(m) is LoRALinear and not in_attention(modules, n)]
        targets = [n for n in linears if n not in heads]
        left_out = [n for n in linears if n in heads]
    elif config.target_modules is not None:
        selected = select(modules, config.target_modules, "target_modules", problems)
        keep = layer_filter(config)
        targets = [n for n in selected if keep(canonical_name(n))]
        if selected and not targets:
            problems.append(
                f"layers_to_transform={config.layers_to_transform!r} (layers_pattern={config.layers_pattern!r}) keeps "
                f"none of the {len(selected)} layers target_modules selects (e.g. {selected[:3]}); their layer "
                "indices are the number after the layer list's name (model.layers.<i>...)"
            )
        unsupported = [f"{n} ({type(modules[n]).__name__})" for n in targets if lora_layer_type(modules[n]) is None]
        if unsupported:
            problems.append(
                f"target_modules selects layers of unsupported types: {unsupported}; supported: {SUPPORTED_LAYERS}"
            )
        inside_attention = [n for n in targets if in_attention(modules, n)]
        if inside_attention:
            problems.append(
                f"target_modules selects {inside_attention}, which nn.MultiheadAttention reads as weights without "
                "calling them (an adapter there would do nothing); target the nn.MultiheadAttention itself"
            )
    else:
        targets = []
    if config.exclude_modules:
        excluded = set(select(modules, config.exclude_modules, "exclude_modules", problems))
        targets = [n for n in targets if n not in excluded]
    in_saved = [n for n in targets if n in inside_saved]
    targets = [n for n in targets if n not in inside_saved]
    parameters = parameter_targets(modules, config.target_parameters, set(targets), problems)
    parameters = {n: p for n, p in parameters.items() if n not in inside_saved}

    if not targets and not parameters and not problems:
        why = f" (modules_to_save={saved} holds {in_saved}, which are trained in full instead)" if in_saved else ""
        problems.append(f"target_modules={config.target_modules!r} leaves no layer to adapt{why}")
    problems += overlap_problems(outer, set(targets) | set(parameters), set(saved), set(tokens) | set(tied_tokens))
    sized = []
    for name in targets:
        kind = lora_layer_type(modules[name])
        if kind is not None:
            spec_name = canonical_name(name)
            problems += [f"layer {name!r}: {p}" for p in kind.problems(modules[name], config.spec_for(spec_name))]
            sized.append((name, kind, modules[name], spec_name))
    for name, names in parameters.items():
        for parameter in names:
            base, spec_name = ParameterTarget(modules[name], parameter), canonical_name(f"{name}.{parameter}")
            problems += [
                f"parameter {spec_name!r}: {p}" for p in LoRAParameter.problems(base, config.spec_for(spec_name))
            ]
            sized.append((spec_name, LoRAParameter, base, spec_name))
    too_large, wide_ranks = size_problems(sized, config)
    problems += too_large
    if problems:
        raise TargetError(
            "cannot inject LoRA:\n  - " + "\n  - ".join(problems) + f"\nadaptable layers: {_candidates(modules)}"
        )
    return _Plan(
        targets,
        parameters,
        groups,
        tokens,
        tied_tokens,
        left_out,
        _notes(modules, targets, config, wide_ranks, saved, tied_left_out),
    )


def _notes(
    modules: dict[str, nn.Module],
    targets: list[str],
    config: LoRAConfig,
    wide_ranks: list[str],
    saved: list[str],
    tied_left_out: list[str],
) -> list[str]:
    """What injection warns about: it works, as in PEFT, but may not be what the user meant."""
    notes = []
    if wide_ranks:
        notes.append(
            f"r exceeds the smaller side of {len(wide_ranks)} layer(s), so the update's rank stays below r "
            f"there (PEFT allows this too; it only costs memory): {', '.join(wide_ranks[:10])}"
        )
    no_bias = [n for n in targets if config.lora_bias and getattr(modules[n], "bias", None) is None]
    if no_bias:
        notes.append(f"lora_bias=True on layers without a bias {no_bias}: their adapters cannot be merged")
    if tied_left_out:
        notes.append(
            f"modules_to_save {saved} hold weights tied to {tied_left_out}, which keep the base weights (as in PEFT); "
            "pass ensure_weight_tying=True to train them as one, tied"
        )
    if config.dropout and any(isinstance(modules[n], nn.MultiheadAttention) for n in targets):
        notes.append(
            "dropout does not apply to nn.MultiheadAttention's adapters, which act on its weights (as in PEFT)"
        )
    return notes


def _visible_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The model's modules by the names a user sees and writes: without wrapper segments (`canonical_name`; a
    ``torch.compile``'d ``net`` lists its layers as ``net.0``, not ``net._orig_mod.0``, and the wrapper stands for
    the module it wraps), and with an adapter module (a LoRA layer, a ``modules_to_save`` or trainable-tokens
    wrapper) standing for the module it wraps (it is matched by its own name and adapted by adding an adapter) and
    nothing inside it listed."""
    modules = {}
    inside = ()
    for name, module in model.named_modules():
        if not name or (inside and name.startswith(inside)):
            continue
        if isinstance(module, AdapterModule):
            inside = (name + ".",)
            module = innermost(module)
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

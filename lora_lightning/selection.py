"""What a `LoRAConfig` selects in a model besides its target layers: the layer indices ``layers_to_transform`` keeps,
the parameters of ``target_parameters``, the ``modules_to_save`` copied together (tied weights) and the embedding
rows of ``trainable_token_indices``. Each is a pure function of the model's modules by name as a user sees them
(`inject._visible_modules`: a wrapper stands for the module it wraps); problems are appended to ``problems``."""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from lora_lightning.config import LoRAConfig
from lora_lightning.layers import AdapterModule, LoRALayer, ModulesToSave, TrainableTokens, innermost
from lora_lightning.modules import dotted_suffixes, name_matcher

# PEFT's layer-index rules: the first numbered segment after a list named by ``layers_pattern``, or, without one,
# after at least two segments (so ``layers.1.q_proj`` has no index, ``model.layers.1.q_proj`` has 1).
_ANY_LIST = re.compile(r".*?\.[^.]*\.(?P<idx>\d+)\.")


def select(modules: dict[str, nn.Module], pattern: list[str] | str, field: str, problems: list[str]) -> list[str]:
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


def layer_filter(config: LoRAConfig) -> Callable[[str], bool]:
    """Whether a module name that ``target_modules`` selected lies in a layer ``layers_to_transform`` keeps. As in
    PEFT, a name listed whole is kept, and one without a layer index is not."""
    wanted = config.layers_to_transform
    if wanted is None:
        return lambda name: True
    wanted = {wanted} if isinstance(wanted, int) else set(wanted)
    patterns = [config.layers_pattern] if isinstance(config.layers_pattern, str) else config.layers_pattern
    regexes = [re.compile(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.") for p in patterns] if patterns else [_ANY_LIST]
    listed = set(config.target_modules)

    def keep(name: str) -> bool:
        if name in listed:
            return True
        found = next((m for m in (regex.match(name) for regex in regexes) if m), None)
        return found is not None and int(found.group("idx")) in wanted

    return keep


def tied_partners(modules: dict[str, nn.Module]) -> dict[str, set[str]]:
    """For each module, the other modules that hold one of its own parameters (an output head tied to the input
    embeddings), found by identity."""
    holders: dict[int, set[str]] = {}
    for name, module in modules.items():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(name)
    partners: dict[str, set[str]] = {}
    for names in holders.values():
        for name in names:
            partners.setdefault(name, set()).update(names - {name})
    return partners


def saved_groups(
    saved: list[str], modules: dict[str, nn.Module], ensure_weight_tying: bool
) -> tuple[list[tuple[str, ...]], list[str]]:
    """The ``modules_to_save`` copied together (a tensor they share stays shared among the copies) and the tied
    modules left out (they keep the base weight). With ``ensure_weight_tying`` a module's tied partners join its
    group; without, as in PEFT, each module is copied on its own."""
    partners = tied_partners(modules)
    if not ensure_weight_tying:
        left_out = sorted({p for name in saved for p in partners.get(name, ())} - set(saved))
        return [(name,) for name in saved], left_out
    groups: list[tuple[str, ...]] = []
    placed: set[str] = set()
    for name in saved:
        if name in placed:
            continue
        group, todo = {name}, [name]
        while todo:
            for partner in partners.get(todo.pop(), ()):
                if partner not in group:
                    group.add(partner)
                    todo.append(partner)
        placed |= group
        groups.append(tuple(n for n in modules if n in group))
    return groups, []


def parameter_targets(
    modules: dict[str, nn.Module], entries: list[str] | None, excluded: set[str], problems: list[str]
) -> dict[str, list[str]]:
    """``{module: [parameter, ...]}`` (in the order the module registers them: PEFT's nesting order, the first
    innermost) of ``target_parameters``: a module's own
    parameter ``<module>.<name>`` matches an entry that is it or a dotted suffix of it. Modules that ``target_modules``
    adapts (``excluded``) cannot also have adapted parameters."""
    if not entries:
        return {}
    matches = name_matcher(entries)
    found: dict[str, list[str]] = {}
    covered: set[str] = set()
    for name, module in modules.items():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{name}.{param_name}"
            if matches(key):
                found.setdefault(name, []).append(param_name)
                covered.update(dotted_suffixes(key))
    unmatched = [entry for entry in entries if entry not in covered]
    if unmatched:
        problems.append(f"target_parameters: {unmatched} match no parameter of the model's modules")
    both = sorted(set(found) & excluded)
    if both:
        problems.append(
            f"target_parameters: {both} are adapted by target_modules too; a module takes one or the other (as in PEFT)"
        )
    return {name: params for name, params in found.items() if name not in excluded}


def token_targets(
    modules: dict[str, nn.Module], input_embeddings: list[str], config: LoRAConfig, problems: list[str]
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The embeddings whose rows ``trainable_token_indices`` trains (``{module: ids}``) and the modules tied to them
    (``{tied module: embedding}``), which use the same rows. The list form names the input embeddings (PEFT's
    ``get_input_embeddings()``, else modules called ``embed_tokens``)."""
    wanted = config.trainable_token_indices
    if wanted is None:
        return {}, {}
    if isinstance(wanted, list):
        names = input_embeddings or select(modules, ["embed_tokens"], "trainable_token_indices", problems)
        by_module = {name: wanted for name in names}
    else:
        by_module = {}
        for key, indices in wanted.items():
            for name in select(modules, [key], "trainable_token_indices", problems):
                by_module[name] = indices
    partners = tied_partners(modules)
    tied: dict[str, str] = {}
    for name, indices in by_module.items():
        module = modules[name]
        if not isinstance(module, nn.Embedding):
            problems.append(
                f"trainable_token_indices: {name!r} is a {type(module).__name__}; it trains rows of an nn.Embedding"
            )
            continue
        outside = sorted(i for i in indices if i >= module.num_embeddings)
        if outside:
            problems.append(
                f"trainable_token_indices: {name!r} has {module.num_embeddings} rows; ids {outside[:5]} are not among "
                "them (resize the embeddings first)"
            )
        for partner in sorted(partners.get(name, ())):
            if partner not in by_module:
                tied[partner] = name
    return by_module, tied


def overlap_problems(outer: dict[str, nn.Module], adapted: set[str], saved: set[str], tokens: set[str]) -> list[str]:
    """A module takes one of LoRA, ``modules_to_save`` and ``trainable_token_indices`` (also across adapters)."""
    roles = {"LoRA": adapted, "modules_to_save": saved, "trainable_token_indices": tokens}
    has = {LoRALayer: "LoRA", ModulesToSave: "modules_to_save", TrainableTokens: "trainable_token_indices"}
    problems = []
    for name, module in outer.items():
        wanted = [role for role, names in roles.items() if name in names]
        present = [role for kind, role in has.items() if isinstance(module, kind)]
        both = list(dict.fromkeys(wanted + present))
        if len(both) > 1:
            problems.append(
                f"{name!r} would take {' and '.join(both)}"
                + (f" (it has {', '.join(present)} from another adapter)" if present else "")
                + "; a module takes one of them (as in PEFT)"
            )
    return problems


def in_attention(modules: dict[str, nn.Module], name: str) -> bool:
    """Whether ``name`` is a projection inside an ``nn.MultiheadAttention`` (read as a weight, never called)."""
    parent = name.rpartition(".")[0]
    return parent in modules and isinstance(modules[parent], nn.MultiheadAttention)


def input_embeddings(model: nn.Module) -> list[str]:
    """The input embeddings that Hugging Face models inside ``model`` report (``get_input_embeddings()``)."""
    named = list(model.named_modules())
    found = []
    for _, module in named:
        getter = getattr(module, "get_input_embeddings", None)
        embedding = getter() if callable(getter) else None
        if isinstance(embedding, nn.Module):
            found += [
                n for n, m in named if m is embedding or (isinstance(m, AdapterModule) and innermost(m) is embedding)
            ]
    return list(dict.fromkeys(n for n in found if n))

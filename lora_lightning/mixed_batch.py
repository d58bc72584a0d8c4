"""One adapter per sample of a batch, for evaluation and serving: PEFT's mixed-batch inference (its
``model(..., adapter_names=[...])``), as a context manager that works on any model.

Hugging Face models do not pass unknown keyword arguments down to their layers, so instead of a forward argument the
names are set on every adapter module for the duration of a ``with`` block::

    with per_sample_adapters(model, ["sentiment", "__base__", "topic"]):
        logits = model(input_ids=batch).logits  # row 0 with "sentiment", row 1 without adapters, row 2 with "topic"

Each adapted layer then computes ``base(x)`` for the whole batch and adds each adapter's update to its own rows
(``"__base__"`` and adapters a layer does not hold add nothing); a ``modules_to_save`` module runs each adapter's
rows through that adapter's copy, trainable token rows look up each adapter's rows. So every sample gets what it
would get alone with its adapter active.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from lora_lightning import params
from lora_lightning.layers import BASE_ADAPTER


@contextmanager
def per_sample_adapters(model: nn.Module, adapter_names: Sequence[str]) -> Iterator[nn.Module]:
    """Run sample ``i`` of every batch (dimension 0 of each adapted layer's input, as in PEFT) with adapter
    ``adapter_names[i]`` (``"__base__"``: none) inside the ``with`` block, for a model in eval mode. Generating with
    beams (``num_beams=k``) multiplies the batch: repeat each name ``k`` times.

    Refused before anything changes, as in PEFT: a model in training mode, unknown adapter names, merged adapters,
    names of adapters that use DoRA, and adapters held by modules that cannot split a batch (an
    ``nn.MultiheadAttention`` or ``target_parameters``, which add their updates to the weights, and
    ``modules_to_save`` modules other than linear, embedding and convolution layers). A batch of another length
    than ``adapter_names`` fails in the first adapted layer. `disable_adapters` inside the block wins: the base
    model runs. (PEFT refuses a module that cannot split a batch even when no sample names its adapters; here
    it runs its base for every sample then, which is what each sample gets alone.)
    """
    names = _checked(model, adapter_names)
    modules = [module for _, module in params.adapter_modules(model)]
    for module in modules:
        module.sample_adapters = names
    try:
        yield model
    finally:
        for module in modules:
            module.sample_adapters = None


def _checked(model: nn.Module, adapter_names: Sequence[str]) -> list[str]:
    if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
        raise TypeError(
            f"per_sample_adapters(adapter_names={adapter_names!r}): give one adapter name per sample, e.g. "
            f"['a', '{BASE_ADAPTER}', 'b'] ('{BASE_ADAPTER}': no adapter)"
        )
    names = list(adapter_names)
    if model.training:
        raise ValueError("per_sample_adapters: the model is in training mode; call model.eval() first (as in PEFT)")
    held = params.adapter_names(model)
    unknown = sorted(set(names) - set(held) - {BASE_ADAPTER})
    if unknown:
        raise ValueError(f"per_sample_adapters: the model has no adapter(s) {unknown}; it has {held}")
    merged = sorted({layer.merged_adapter for _, layer in params.lora_layers(model) if layer.merged})
    if merged:
        raise ValueError(f"per_sample_adapters: adapters {merged} are merged into the base; unmerge them first")
    wanted = set(names)
    for name, module in params.adapter_modules(model):
        problem = module.sample_problem(wanted) if wanted & set(module.adapter_names) else None
        if problem:
            named = sorted(wanted & set(module.adapter_names))
            raise ValueError(f"per_sample_adapters: {name!r} holds adapters {named} of the batch: {problem}")
    return names

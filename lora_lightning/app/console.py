"""What the app prints: third-party start-up chatter filtered out, the resolved config as a tree, and one
summary line of what LoRA adapted."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import nn
from typing_extensions import override

from lora_lightning import LoRAConfig, param_summary
from lora_lightning.config import ALL_LINEAR
from lora_lightning.inject import output_heads
from lora_lightning.params import lora_layers, trained_in_full_modules

log = logging.getLogger(__name__)

# logger name -> message starts that say nothing a user can act on (optional native libraries of torchao,
# deprecations inside torch's and Lightning's own code, Lightning's advertisements), and the callback's
# summary line, which `LoRASummary` replaces by its own.
CHATTER = {
    "torchao": ("Failed to load",),
    "torchao.kernel.intmm": ("Warning: Detected no triton",),
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward",),
    "torch.utils._pytree": ("<enum",),
    "lightning.pytorch.utilities.rank_zero": ("💡 Tip:", "LoRAFinetuneCallback: "),
}
WARNING_PATTERNS = (r".*isinstance\(treespec, LeafSpec\).*",)


class _DropStarts(logging.Filter):
    def __init__(self, starts: Sequence[str]) -> None:
        super().__init__()
        self.starts = tuple(starts)

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


def quiet() -> None:
    """Filter the `CHATTER` records on their loggers, and the listed warnings; idempotent. Nothing else of
    those loggers changes."""
    for name, starts in CHATTER.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropStarts) for f in logger.filters):
            logger.addFilter(_DropStarts(starts))
    for pattern in WARNING_PATTERNS:
        warnings.filterwarnings("ignore", message=pattern)


def unquiet() -> None:
    """Take `quiet`'s logger filters off again (for a process that goes on after the app, such as a test run)."""
    for name in CHATTER:
        logger = logging.getLogger(name)
        for added in [f for f in logger.filters if isinstance(f, _DropStarts)]:
            logger.removeFilter(added)


@rank_zero_only
def print_config_tree(cfg: DictConfig) -> None:
    """The resolved config (without Hydra's own node) as a rich tree, one branch per top-level group."""
    import rich
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key in cfg:
        if key == "hydra":
            continue
        node = cfg._get_node(str(key))
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(cfg[key])
        tree.add(str(key)).add(Syntax(text.rstrip(), "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)


def lora_summary(model: nn.Module, config: LoRAConfig) -> str:
    """One line: adapted layers (by leaf name), parameter counts, what is trained in full, and, for
    ``all-linear``, the linear layers it left out."""
    layers = [name for name, _ in lora_layers(model)]
    leaves: dict[str, int] = {}
    for name in layers:
        leaf = name.rsplit(".", 1)[-1]
        leaves[leaf] = leaves.get(leaf, 0) + 1
    kinds = ", ".join(f"{leaf} x{n}" if n > 1 else leaf for leaf, n in leaves.items())
    line = f"LoRA r={config.r} alpha={config.alpha:g} on {len(layers)} layer{'s' * (len(layers) != 1)} ({kinds})"
    line += f"; {param_summary(model)}"
    full = [name for name, _ in trained_in_full_modules(model)]
    if full:
        line += f"; trained in full: {', '.join(full)}"
    if config.target_modules == ALL_LINEAR:
        left = sorted(output_heads(model))
        line += f"; all-linear left out: {', '.join(left) if left else 'nothing'}"
    return line


class LoRASummary(Callback):
    """Logs `lora_summary` once per run, at the first ``setup`` after the LoRA callback's (which injects)."""

    def __init__(self, config: LoRAConfig) -> None:
        self.config = config
        self.done = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.done and trainer.is_global_zero:
            log.info(lora_summary(pl_module, self.config))
        self.done = True

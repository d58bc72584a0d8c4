"""The library's walls: what its modules import, and that it works with torch, lightning and safetensors only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lora_lightning import LoRAConfig
from lora_lightning.peft_format import FIELDS, PEFT_KEYS, from_peft, to_peft
from tests.helpers.processes import ROOT

PACKAGE = ROOT / "lora_lightning"
APP_PACKAGES = ("hydra", "omegaconf", "wandb", "transformers")  # (torchmetrics comes with lightning)


def library_modules() -> dict[str, Path]:
    """``lora_lightning.<name>`` -> file, for every module of the library, subpackages included (the app
    excluded)."""
    modules = {}
    for file in sorted(PACKAGE.rglob("*.py")):
        parts = file.relative_to(PACKAGE).with_suffix("").parts
        if parts[0] != "app":
            modules[".".join(("lora_lightning", *parts[: -1 if parts[-1] == "__init__" else None]))] = file
    return modules


def module_level_imports(file: Path) -> list[str]:
    """The modules ``file`` imports when it is imported (not those imported inside functions)."""
    tree = ast.parse(file.read_text())
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "lora_lightning"]
    return names


def is_app_side(name: str) -> bool:
    return name.split(".")[0] in APP_PACKAGES or name == "lora_lightning.app" or name.startswith("lora_lightning.app.")


def test_no_library_module_imports_the_app_or_its_packages_at_module_level():
    leaks = {
        module: [n for n in module_level_imports(file) if is_app_side(n)] for module, file in library_modules().items()
    }
    assert not {module: names for module, names in leaks.items() if names}


def test_the_library_has_no_import_cycles():
    modules = library_modules()
    graph = {
        module: {name for name in module_level_imports(file) if name in modules and name != "lora_lightning"}
        for module, file in modules.items()
    }
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        if module in path:
            pytest.fail(f"import cycle: {' -> '.join((*path[path.index(module) :], module))}")
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


def installed_closure(roots: tuple[str, ...]) -> set[str]:
    """The distributions ``roots`` need, transitively (their default requirements, no extras)."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.distribution(name).requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def site_with_only(roots: tuple[str, ...], folder: Path) -> Path:
    """A folder of links to exactly the installed files of ``roots`` and what they require (top-level packages,
    modules and their metadata), to run Python with as if nothing else were installed."""
    folder.mkdir()
    for name in installed_closure(roots):
        dist = metadata.distribution(name)
        for top in {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


@pytest.mark.slow
def test_the_library_works_with_torch_lightning_and_safetensors_only(tmp_path):
    """In a fresh Python that sees only torch, lightning, safetensors (and what they require): inject, fit with
    the callback, save, load and merge a tiny MLP."""
    site = site_with_only(("torch", "lightning", "safetensors"), tmp_path / "site")
    assert not any((site / name).exists() for name in APP_PACKAGES)
    script = textwrap.dedent(
        f"""
        import sys

        import lightning.pytorch as pl
        import torch
        from torch import nn
        from torch.utils.data import DataLoader, TensorDataset

        from lora_lightning import LoRAConfig, LoRAFinetuneCallback, load_adapter, merge_lora, save_adapter

        class Module(pl.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))

            def training_step(self, batch, _):
                x, y = batch
                return nn.functional.cross_entropy(self.net(x), y)

            def configure_optimizers(self):
                return torch.optim.AdamW(self.parameters(), lr=1e-2)

        data = DataLoader(TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,))), batch_size=8)
        module = Module()
        callback = LoRAFinetuneCallback(LoRAConfig(r=2, alpha=4, target_modules=["0"]))
        trainer = pl.Trainer(max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir={str(tmp_path)!r}, accelerator="cpu", callbacks=[callback])
        trainer.fit(module, data)
        save_adapter(module.net, {str(tmp_path / "adapter")!r})
        fresh = Module()
        load_adapter(fresh.net, {str(tmp_path / "adapter")!r})
        x = torch.randn(4, 8)
        assert torch.allclose(fresh.net(x), module.net(x))
        assert torch.allclose(merge_lora(fresh.net)(x), module.net(x), atol=1e-6)
        print("LIBRARY OK", sorted(m for m in sys.modules if m.split(".")[0] in {APP_PACKAGES!r}))
        """
    )
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    command = [sys.executable, "-S", "-c", script]  # -S: no site-packages but the folder above
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LIBRARY OK []" in done.stdout


def test_the_peft_table_maps_every_config_field_both_ways():
    config = LoRAConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj"],
        exclude_modules=["k_proj"],
        use_rslora=True,
        modules_to_save=["head"],
        use_dora=True,
        init="pissa_niter_4",
        rank_pattern={"^a": 2},
        alpha_pattern={"^a": 3},
    )
    assert {f.ours for f in FIELDS} == set(config.to_dict()), "a LoRAConfig field is missing from the PEFT table"
    peft = to_peft(config.to_dict())
    assert set(peft) == set(PEFT_KEYS.values())
    assert peft["lora_alpha"] == 8 and peft["init_lora_weights"] == "pissa_niter_4"
    assert LoRAConfig(**from_peft(peft, PEFT_KEYS)) == config
    assert to_peft({"init": "kaiming"}) == {"init_lora_weights": True}
    assert from_peft({}, ["init", "dropout", "use_rslora", "use_dora"]) == {
        "init": "kaiming",
        "dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
    }


def test_config_suggests_our_field_for_a_peft_key():
    with pytest.raises(ValueError, match="did you mean 'alpha' for 'lora_alpha'"):
        LoRAConfig.from_dict({"lora_alpha": 16})

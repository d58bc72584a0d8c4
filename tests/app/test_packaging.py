"""The wheel carries the whole library and the app: every module, the Hydra configs of conf/ and the console
scripts, so a plain (non-editable) install runs its own app."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

import pytest

from lora_lightning.app.train import CONF_DIR
from tests.helpers.processes import ROOT

pytestmark = pytest.mark.slow


def test_every_config_group_is_listed_as_a_package_of_the_wheel():
    """setuptools ships conf/<group>/*.yaml only for groups listed in pyproject.toml: a new group must be added."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    groups = sorted(p.name for p in (ROOT / "conf").iterdir() if p.is_dir())
    assert [f"lora_lightning.app.conf.{g}" for g in groups if f"lora_lightning.app.conf.{g}" not in packages] == []


def test_the_wheel_ships_conf_and_the_console_scripts(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("lora_lightning", "conf", "hydra_plugins"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(source)]
    done = subprocess.run([*command, "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    shipped = {n.removeprefix("lora_lightning/app/conf/") for n in names if n.startswith("lora_lightning/app/conf/")}
    assert shipped == {str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("*.yaml")}
    modules = {
        str(p.relative_to(ROOT)) for p in (ROOT / "lora_lightning").rglob("*.py") if "__pycache__" not in p.parts
    }
    assert sorted(modules - names) == []  # every module of the library and the app, subpackages too
    assert "lora-lightning-train = lora_lightning.app.train:main" in entry_points
    assert "lora-lightning-sweep-report = lora_lightning.app.sweep_report:main" in entry_points
    assert "lora-lightning-eval = lora_lightning.app.eval:main" in entry_points
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "scripts/"))]

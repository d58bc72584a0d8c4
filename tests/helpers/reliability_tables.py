"""docs/reliability.md's tables, generated from the test tables so that they cannot go stale: the bad-input cases
(``CASES`` of tests/lib/test_reliability_inputs.py) and the fault tests (kill, full disk, concurrency).

    python -m tests.helpers.reliability_tables           # rewrite the generated blocks of docs/reliability.md
    python -m tests.helpers.reliability_tables --check   # exit 1 if they are out of date

A generated block lies between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; the prose around it is
written by hand. tests/lib/test_reliability_docs.py fails when a block differs from what this module renders.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import math
import re
import sys
from collections.abc import Callable

from tests.helpers.processes import ROOT

DOC = ROOT / "docs" / "reliability.md"
# The bad-input cases by the first word of their name: which API they are about.
GROUPS = {
    "config": "`LoRAConfig` (Python, a Hydra config, or a file's fields)",
    "inject": "`inject_lora` / `find_targets`",
    "load": "`load_adapter` (every message names the folder or the file in it)",
    "save": "`save_adapter`",
    "mixed": "`per_sample_adapters` (one adapter per sample of a batch)",
    "callback": "`LoRAFinetuneCallback(...)`",
    "fit": "`Trainer.fit` with the callback",
    "resume": "`Trainer.fit(ckpt_path=...)`: resuming",
}
FAULT_MODULES = {  # module -> how its tests run
    "test_reliability_crash": "worker processes killed with `SIGKILL` at a chosen point",
    "test_reliability_concurrency": "worker processes (or threads) writing and reading at once",
    "test_reliability_faults": "in-process: `RLIMIT_FSIZE` (the kernel refuses the write) or `os.fsync` failing",
}


def cases() -> dict:
    return importlib.import_module("tests.lib.test_reliability_inputs").CASES


def app_cases() -> dict:
    return importlib.import_module("tests.app.test_bad_overrides").CASES


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def code(text: str) -> str:
    return cell(f"`{text}`")


def bad_input_table() -> str:
    lines = []
    number = 0
    for prefix, title in GROUPS.items():
        rows = [(name, case) for name, case in cases().items() if name.split("_", 1)[0] == prefix]
        if not rows:
            continue
        lines += ["", f"**{title}**", "", "| # | case | error | the message says |", "|---|---|---|---|"]
        for name, case in rows:
            number += 1
            doc = inspect.getdoc(case.build)
            what = name.replace("_", " ") + (f": {doc.splitlines()[0]}" if doc else "")
            if case.model_check == "base":
                what += " (fails in `fit`, after setup)"
            said = " … ".join(code(f.replace("{tmp}", "…")) for f in case.fragments)
            lines.append(f"| {number} | {cell(what)} | `{case.error.__name__}` | {said} |")
    lines += ["", "**The Hydra app** (`python scripts/train.py <override>`, tests/app/test_bad_overrides.py)", ""]
    lines += ["| # | override | error | the message says |", "|---|---|---|---|"]
    for override, error, fragments in app_cases().values():
        number += 1
        lines.append(f"| {number} | {code(override)} | `{error.__name__}` | {' … '.join(map(code, fragments))} |")
    return "\n".join(lines[1:])


def test_functions(module_name: str) -> list[tuple[str, Callable, int]]:
    """``(name, function, number of cases)`` of a tests/lib module, a parametrized test counting each case."""
    module = importlib.import_module(f"tests.lib.{module_name}")
    found = []
    for name, function in inspect.getmembers(module, inspect.isfunction):
        if name.startswith("test_") and function.__module__ == module.__name__:
            marks = getattr(function, "pytestmark", [])
            sizes = [len(m.args[1]) for m in marks if m.name == "parametrize"]
            found.append((name, function, math.prod(sizes)))
    return sorted(found, key=lambda item: inspect.getsourcelines(item[1])[1])


def fault_table() -> str:
    lines = ["| test | cases | what it does |", "|---|---|---|"]
    for module_name in FAULT_MODULES:
        for name, function, count in test_functions(module_name):
            what = (inspect.getdoc(function) or name.replace("_", " ")).split("\n\n")[0].replace("\n", " ")
            lines.append(f"| `{module_name}.py::{name}` | {count} | {cell(what)} |")
    faults = importlib.import_module("tests.lib.test_reliability_faults")
    shown = ", ".join(f"`{name}` ({fault.message})" for name, fault in faults.FAULTS.items())
    lines += ["", f"The full-disk faults are {shown}; each meets each write: {', '.join(map(code, faults.WRITES))}."]
    return "\n".join(lines)


def numbers_table() -> str:
    faults = {m: sum(count for *_, count in test_functions(m)) for m in FAULT_MODULES}
    base = sum(case.model_check == "base" for case in cases().values())
    return "\n".join(
        [
            "| what | cases | how they run |",
            "|---|---|---|",
            f"| bad input, library (`tests/lib/test_reliability_inputs.py`) | {len(cases())} | in-process; the model "
            f"and every file snapshotted before and compared after; {base} of them inside `Trainer.fit`; a hang fails "
            "after 60 s (`SIGALRM`) |",
            f"| bad input, app (`tests/app/test_bad_overrides.py`) | {len(app_cases())} | `train(cfg)` composed as "
            "the command line would; nothing may be written |",
            f"| kill (`test_reliability_crash.py`, `multiprocess`) | {faults['test_reliability_crash']} | "
            f"{FAULT_MODULES['test_reliability_crash']} |",
            f"| concurrency (`test_reliability_concurrency.py`, `multiprocess`) | "
            f"{faults['test_reliability_concurrency']} | {FAULT_MODULES['test_reliability_concurrency']} |",
            f"| full disk (`test_reliability_faults.py`) | {faults['test_reliability_faults']} | "
            f"{FAULT_MODULES['test_reliability_faults']} |",
        ]
    )


BLOCKS = {"numbers": numbers_table, "bad-input": bad_input_table, "faults": fault_table}


def render(text: str) -> str:
    """``text`` with every generated block replaced by what the tables give now."""
    for name, table in BLOCKS.items():
        pattern = re.compile(rf"(<!-- generated: {name} -->\n)(?:.*?\n)?(<!-- end: {name} -->)", re.DOTALL)
        if not pattern.search(text):
            raise ValueError(f"{DOC} has no block <!-- generated: {name} --> ... <!-- end: {name} -->")
        text = pattern.sub(lambda m, table=table: m.group(1) + table() + "\n" + m.group(2), text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/reliability.md is out of date")
    args = parser.parse_args()
    current = DOC.read_text()
    fresh = render(current)
    if args.check:
        sys.exit(0 if fresh == current else f"{DOC} is out of date: python -m tests.helpers.reliability_tables")
    DOC.write_text(fresh)


if __name__ == "__main__":
    main()

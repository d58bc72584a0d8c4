"""The sweep report from a multirun folder: table rows and statuses, CSV, Markdown and the plot."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lora_lightning.app.sweep_report import best, collect, main, write_report


def fake_job(root: Path, name: str, r: int, alpha: float, metrics: dict | None) -> None:
    job = root / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(f"lora:\n  r: {r}\n  alpha: {alpha}\n")
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps({"r": r, "alpha": alpha, **metrics}))


def finished(metric: float, trainable: int) -> dict:
    return {
        "status": "ok", "metric": metric, "metric_name": "val/acc", "metric_mode": "max",
        "before": {"val/acc": 0.5}, "after": {"val/acc": metric}, "params": {"trainable": trainable, "total": 10**6},
        "time_per_step_s": 0.1234, "peak_memory_mib": 812.5, "memory_kind": "cpu_rss",
    }  # fmt: skip


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "2026-01-01_00-00-00"
    fake_job(root, "r4_a8", 4, 8.0, finished(0.80, 20_000))
    fake_job(root, "r8_a8", 8, 8.0, finished(0.83, 40_000))
    fake_job(root, "r4_a16", 4, 16.0, finished(0.85, 20_000))
    fake_job(root, "r8_a16", 8, 16.0, {"status": "failed", "error": "boom", "metric_name": "val/acc"})
    fake_job(root, "r16_a16", 16, 16.0, None)  # killed before writing metrics.json
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root


def test_collect_reads_every_job_with_its_status(sweep: Path) -> None:
    trials = collect(sweep)
    assert [(t.run, t.status) for t in trials] == [
        ("r4_a8", "ok"), ("r8_a8", "ok"), ("r4_a16", "ok"), ("r8_a16", "failed"), ("r16_a16", "missing"),
    ]  # fmt: skip
    assert trials[0].time_per_step_ms == 123.4 and trials[0].trainable_params == 20_000
    assert trials[-1].rank == 16 and trials[-1].alpha == 16.0  # from the job's Hydra config
    top = best(trials)
    assert top is not None and top.run == "r4_a16"


def test_the_report_files(sweep: Path, tmp_path: Path) -> None:
    paths = write_report(sweep, tmp_path / "out")
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert rows[2] == {
        "run": "r4_a16", "rank": "4", "alpha": "16", "seed": "", "trainable_params": "20000", "val/acc": "0.85",
        "tokens_per_sec": "", "time_per_step_ms": "123.4", "peak_memory_mib": "812.5", "status": "ok", "error": "",
    }  # fmt: skip
    assert rows[3]["val/acc"] == "" and rows[3]["status"] == "failed" and rows[3]["error"] == "boom"
    markdown = paths["markdown"].read_text()
    assert "Best: **r4_a16** (rank 4, alpha 16): val/acc = 0.8500." in markdown
    assert "| r4_a16 | 4 | 16 | 20,000 | 0.85 |  | 123.4 | 812.5 | ok |  |" in markdown
    assert "One seed per setting: differences cannot be told from noise" in markdown
    assert "Runs: 5 (3 ok, 1 failed, 1 missing)." in markdown
    assert "| r8_a16 | 8 | 16 |  |  |  |  |  | failed | boom |" in markdown
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000


def test_the_command_writes_into_the_multirun_folder(sweep: Path, capsys) -> None:
    assert main([str(sweep)]) == 0
    assert {p.name for p in sweep.glob("sweep_report.*")} == {"sweep_report.md", "sweep_report.csv", "sweep_report.png"}
    assert "Best: **r4_a16**" in capsys.readouterr().out


def test_a_trial_whose_process_died_is_failed_and_a_live_one_running(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    host = socket.gethostname()
    fake_job(root, "r2_a8", 2, 8.0, {"status": "running", "pid": os.getpid(), "host": host})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fake_job(root, "r4_a8", 4, 8.0, {"status": "running", "pid": dead.pid, "host": host})
    status = {t.run: (t.status, t.error) for t in collect(root)}
    assert status["r2_a8"] == ("running", "")
    assert status["r4_a8"][0] == "failed" and "killed" in status["r4_a8"][1]


def test_a_folder_without_jobs_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no job folders"):
        collect(tmp_path)


def seeded(root: Path, name: str, r: int, values: list[float], tokens_per_sec: float) -> None:
    for seed, value in enumerate(values, start=42):
        metrics = {**finished(value, 1000 * r), "seed": seed, "tokens_per_sec": tokens_per_sec}
        fake_job(root, f"{name}_seed{seed}", r, 16.0, metrics)


def test_trials_over_seeds_show_mean_spread_and_ties(tmp_path: Path) -> None:
    """r8 wins on the mean; r4 lies within twice the standard error of the difference (a tie), r2 does not."""
    root = tmp_path / "sweep"
    seeded(root, "r2_a16", 2, [0.70, 0.71, 0.72], 3000.0)
    seeded(root, "r4_a16", 4, [0.80, 0.83, 0.86], 2900.0)
    seeded(root, "r8_a16", 8, [0.84, 0.85, 0.86], 2500.0)
    paths = write_report(root, tmp_path / "out")
    markdown = paths["markdown"].read_text()
    assert "Best: **r8_a16** (rank 8, alpha 16): val/acc = 0.8500 ± 0.0100 over 3 seeds." in markdown
    assert "Within the noise of the best (tie): r4_a16." in markdown
    assert "| r8_a16 | 8 | 16 | 3/3 | 0.8500 ± 0.0100 | 2,500 | 812.5 | best |" in markdown
    assert "| r4_a16 | 4 | 16 | 3/3 | 0.8300 ± 0.0300 | 2,900 | 812.5 | tie |" in markdown
    assert "| r2_a16 | 2 | 16 | 3/3 | 0.7100 ± 0.0100 | 3,000 | 812.5 |  |" in markdown
    with open(paths["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["run"], r["seed"], r["tokens_per_sec"]) for r in rows][:2] == [
        ("r2_a16_seed42", "42", "3000"), ("r2_a16_seed43", "43", "3000"),
    ]  # fmt: skip

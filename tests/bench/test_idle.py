"""The GPU-idle analysis (benchmarks.idle): its interval arithmetic on made-up steps, and a CPU run of two rows
(host split only: a CPU has no kernels). No timing assertions."""

from __future__ import annotations

import json

import pytest

from benchmarks import idle

PHASES = [(0.0, 40.0, "forward"), (40.0, 90.0, "backward"), (90.0, 95.0, "optimizer")]


def test_idle_gaps_go_to_the_phase_running_when_the_late_kernel_started():
    kernels = [(5.0, 30.0), (35.0, 50.0), (45.0, 60.0), (70.0, 80.0), (96.0, 99.0)]
    result = idle.idle_by_phase(kernels, PHASES, [(0.0, 100.0)])
    assert result["idle_by_phase"] == {"other": 16.0, "backward": 10.0, "before": 5.0, "forward": 5.0}
    assert result["busy"] == 63.0  # the overlap of (35, 50) and (45, 60) counts once
    assert result["wall"] == 99.0 == result["busy"] + result["idle"]


def test_idle_is_a_mean_over_steps_that_ran_kernels():
    one = [(5.0, 30.0), (35.0, 50.0)]
    two = [(a + 100.0, b + 100.0) for a, b in [(1.0, 50.0)]]
    phases = PHASES + [(a + 100.0, b + 100.0, n) for a, b, n in PHASES]
    result = idle.idle_by_phase(one + two, phases, [(0.0, 100.0), (100.0, 200.0), (200.0, 300.0)])
    assert result["wall"] == (50.0 + 50.0) / 2
    assert result["busy"] == (40.0 + 49.0) / 2
    assert result["idle_by_phase"] == {"before": (5.0 + 1.0) / 2, "forward": 5.0 / 2}


def test_a_chrome_trace_gives_the_device_spans_and_this_module_s_host_ranges():
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "idle_step", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "idle_phase::forward", "ts": 0, "dur": 40},
        {"ph": "X", "cat": "user_annotation", "name": "profile_step::forward", "ts": 0, "dur": 40},  # not ours
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1, "dur": 3},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 5, "dur": 25},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 31, "dur": 2},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 34, "dur": 1},
        {"ph": "X", "cat": "gpu_user_annotation", "name": "idle_phase::forward", "ts": 5, "dur": 30},
        {"ph": "i", "cat": "kernel", "name": "an instant", "ts": 50},
    ]
    kernels, phases, steps = idle.trace_intervals(events)
    assert kernels == [(5, 30), (31, 33), (34, 35)]
    assert phases == [(0, 40, "forward")] and steps == [(0, 100)]


@pytest.mark.slow
def test_a_cpu_run_writes_the_host_split_of_each_row(tmp_path):
    argv = ["--configs", "frozen:eager", "ours:eager", "--out", str(tmp_path), "--shape=tiny", "--device=cpu"]
    assert idle.main([*argv, "--warmup=1", "--host-steps=4"]) == 0
    report = json.loads((tmp_path / "idle.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["frozen:eager", "ours:eager"]
    for row in report["rows"]:
        assert set(row["host_ms"]) == {"forward", "backward", "optimizer", "device_after"}
        assert row["host_ms"]["forward"] > 0 and row["device_ms"] is None
    assert report["rows"][0]["host_ms"]["optimizer"] < report["rows"][1]["host_ms"]["optimizer"]  # none to step
    assert "| ours:eager |" in (tmp_path / "idle.md").read_text()

"""The GPU-idle analysis (benchmarks.idle): its interval arithmetic on made-up steps, and a CPU run of two rows
(host split only: a CPU has no kernels). No timing assertions."""

from __future__ import annotations

import json

import pytest

from benchmarks import idle

PHASES = [(0.0, 40.0, "forward"), (40.0, 90.0, "backward"), (90.0, 95.0, "optimizer")]


def launched_at_start(spans):
    """Kernels whose launch call returned as they started: every gap before them is the host's."""
    return [(a, b, a) for a, b in spans]


def test_idle_gaps_go_to_the_phase_that_launched_the_late_kernel():
    kernels = launched_at_start([(5.0, 30.0), (35.0, 50.0), (45.0, 60.0), (70.0, 80.0), (96.0, 99.0)])
    result = idle.idle_by_phase(kernels, PHASES, [(0.0, 100.0)])
    assert result["idle_by_phase"] == {"other": 16.0, "backward": 10.0, "before": 5.0, "forward": 5.0}
    assert result["busy"] == 63.0  # the overlap of (35, 50) and (45, 60) counts once
    assert result["wall"] == 99.0 == result["busy"] + result["idle"]


def test_a_kernel_launched_late_in_a_phase_that_ended_before_it_started_counts_for_that_phase():
    # launched at 39.5 in forward, after the device ran dry at 30; it starts at 41, in backward's time
    result = idle.idle_by_phase([(5.0, 30.0, 5.0), (41.0, 45.0, 39.5)], PHASES, [(0.0, 100.0)])
    assert result["idle_by_phase"] == {"forward": 11.0, "before": 5.0}


def test_gaps_between_kernels_queued_before_the_device_ran_dry_are_the_device_s_own():
    # the host launched all four in forward, well ahead; the device runs them with small gaps between, while the
    # host is already in backward and then outside every phase
    kernels = [(10.0, 50.0, 2.0), (52.0, 92.0, 3.0), (93.0, 97.0, 4.0), (97.5, 99.0, 98.0)]
    result = idle.idle_by_phase(kernels, PHASES, [(0.0, 100.0)])
    assert result["idle_by_phase"] == {"before": 10.0, "queued": 3.0, "other": 0.5}


def test_idle_is_a_mean_over_steps_that_ran_kernels():
    one = launched_at_start([(5.0, 30.0), (35.0, 50.0)])
    two = launched_at_start([(101.0, 150.0)])
    phases = PHASES + [(a + 100.0, b + 100.0, n) for a, b, n in PHASES]
    result = idle.idle_by_phase(one + two, phases, [(0.0, 100.0), (100.0, 200.0), (200.0, 300.0)])
    assert result["wall"] == (50.0 + 50.0) / 2
    assert result["busy"] == (40.0 + 49.0) / 2
    assert result["idle_by_phase"] == {"before": (5.0 + 1.0) / 2, "forward": 5.0 / 2}


def test_a_chrome_trace_gives_the_device_spans_their_launches_and_this_module_s_host_ranges():
    events = [
        {"ph": "X", "cat": "user_annotation", "name": "idle_step", "ts": 0, "dur": 100},
        {"ph": "X", "cat": "user_annotation", "name": "idle_phase::forward", "ts": 0, "dur": 40},
        {"ph": "X", "cat": "user_annotation", "name": "profile_step::forward", "ts": 0, "dur": 40},  # not ours
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 1, "dur": 3},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 2, "dur": 1, "args": {"correlation": 7}},
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 5, "dur": 25, "args": {"correlation": 7}},
        {"ph": "X", "cat": "cuda_driver", "name": "cuLaunchKernelEx", "ts": 20, "dur": 2, "args": {"correlation": 8}},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "ts": 31, "dur": 2, "args": {"correlation": 8}},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 34, "dur": 1},  # no launch recorded
        {"ph": "X", "cat": "gpu_user_annotation", "name": "idle_phase::forward", "ts": 5, "dur": 30},
        {"ph": "i", "cat": "kernel", "name": "an instant", "ts": 50},
    ]
    kernels, phases, steps = idle.trace_intervals(events)
    assert kernels == [(5, 30, 3), (31, 33, 22), (34, 35, 34)]
    assert phases == [(0, 40, "forward")] and steps == [(0, 100)]


@pytest.mark.slow
def test_a_cpu_run_writes_the_host_split_of_each_row(tmp_path):
    argv = ["--configs", "frozen:eager", "ours:eager", "--out", str(tmp_path), "--shape=tiny", "--device=cpu"]
    assert idle.main([*argv, "--warmup=1", "--host-steps=4", "--threads=1"]) == 0
    report = json.loads((tmp_path / "idle.json").read_text())
    assert [r["name"] for r in report["rows"]] == ["frozen:eager", "ours:eager"]
    for row in report["rows"]:
        assert row["torch_threads"] == 1
        assert set(row["host_ms"]) == {"forward", "backward", "optimizer", "device_after"}
        assert row["host_ms"]["forward"] > 0 and row["device_ms"] is None
    assert report["rows"][0]["host_ms"]["optimizer"] < report["rows"][1]["host_ms"]["optimizer"]  # none to step
    assert "| ours:eager |" in (tmp_path / "idle.md").read_text()


@pytest.mark.slow
def test_a_failing_row_is_reported_and_the_other_rows_kept(tmp_path):
    argv = ["--configs", "ours:eager:liger", "frozen:eager", "--out", str(tmp_path), "--shape=tiny", "--device=cpu"]
    assert idle.main([*argv, "--warmup=1", "--host-steps=2"]) == 1
    rows = json.loads((tmp_path / "idle.json").read_text())["rows"]
    assert "liger" in rows[0]["error"] and rows[1]["host_ms"]["forward"] > 0
    assert "| ours:eager:liger | FAILED: " in (tmp_path / "idle.md").read_text()


@pytest.mark.parametrize("argv", [["--host-steps=0"], ["--profile-steps=-1"], ["--profile", "x"]])
def test_bad_step_counts_and_abbreviated_options_are_refused(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        idle.main(["--configs", "frozen:eager", "--out", str(tmp_path), "--device=cpu", *argv])
    assert exit_.value.code == 2
    assert ("does not take" if argv[0] == "--profile" else "must be >= 1") in capsys.readouterr().err

"""The gpu_pool Hydra launcher: fresh processes, GPU slots, failure isolation (fake GPU ids on CPU)."""

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from hydra.core.utils import JobStatus
from omegaconf import OmegaConf

from hydra_plugins.lora_lightning_launcher.gpu_pool import RESULT_FILE, GpuPoolLauncher, _app_command, _Trial
from tests.helpers.processes import WORKERS

APP = WORKERS / "launcher_app.py"
pytestmark = pytest.mark.multiprocess


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, str(APP), "-m", "hydra/launcher=gpu_pool", f"hydra.sweep.dir={tmp_path}",
        "hydra.sweep.subdir=${hydra.job.num}", *overrides,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"})


def records(tmp_path: Path) -> dict[int, dict]:
    return {int(p.parent.name): json.loads(p.read_text()) for p in tmp_path.glob("*/record.json")}


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


def test_trials_run_in_fresh_processes_on_distinct_gpu_slots(tmp_path):
    done = sweep(tmp_path, "value=1,2,3,4,5,6", "sleep=1.5", "hydra.launcher.gpus=[0,1,2]")
    assert done.returncode == 0, done.stderr
    found = records(tmp_path)
    assert sorted(found) == [0, 1, 2, 3, 4, 5]
    assert len({r["pid"] for r in found.values()}) == 6
    assert all(r["cuda_visible_devices"] in {"0", "1", "2"} and r["mode"] == "RunMode.RUN" for r in found.values())
    assert all(r["sweep_dir"] == str(tmp_path) for r in found.values())
    intervals = [(r["start"], r["end"]) for r in found.values()]
    assert max_overlap(intervals) == 3  # all slots used, never more
    for a in found.values():  # trials that overlap in time never share a GPU
        for b in found.values():
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["cuda_visible_devices"] != b["cuda_visible_devices"]
    results = {int(p.parent.name): json.loads(p.read_text()) for p in tmp_path.glob(f"*/{RESULT_FILE}")}
    assert {i: r["value"] for i, r in results.items()} == {i: 2.0 * (i + 1) for i in range(6)}


def test_multi_gpu_slots(tmp_path):
    done = sweep(tmp_path, "value=1,2", "sleep=1", "hydra.launcher.gpus=[4,5,6,7]", "hydra.launcher.gpus_per_trial=2")
    assert done.returncode == 0, done.stderr
    assert sorted(r["cuda_visible_devices"] for r in records(tmp_path).values()) == ["4,5", "6,7"]


def test_a_failing_trial_is_reported_and_the_others_go_on(tmp_path):
    done = sweep(tmp_path, "value=1,2,3", "sleep=0.2", "hydra.launcher.gpus=[0,1]", "fail=none,raise,kill")
    assert done.returncode != 0  # the sweep ends in an error naming the failed trials...
    assert "failed on purpose" in done.stderr or "failed on purpose" in done.stdout
    results = {int(p.parent.name): json.loads(p.read_text()) for p in tmp_path.glob(f"*/{RESULT_FILE}")}
    statuses = [r["status"] for r in results.values()]
    assert statuses.count("completed") == 3 and statuses.count("failed") == 3  # ...after every trial ran
    assert len(records(tmp_path)) == 9
    assert "killed by signal 9" in done.stdout + done.stderr


def test_cpu_slots_when_no_gpu(tmp_path):
    done = sweep(tmp_path, "value=1,2", "sleep=0.1", "hydra.launcher.gpus=[]", "hydra.launcher.cpu_trials=2")
    assert done.returncode == 0, done.stderr
    assert all(r["cuda_visible_devices"] == "" for r in records(tmp_path).values())


def test_results_become_job_returns(tmp_path):
    class Exited:
        returncode = 0

    config = OmegaConf.create({"hydra": {"job": {"name": "train"}}})
    trial = _Trial(0, ["value=1"], config=config, run_dir=tmp_path, process=Exited())  # type: ignore[arg-type]
    (tmp_path / RESULT_FILE).write_text(json.dumps({"status": "completed", "value": 0.91}))
    launcher = GpuPoolLauncher()
    ret = launcher._result(trial)
    assert ret.status == JobStatus.COMPLETED and ret.return_value == 0.91
    Exited.returncode = -9
    ret = launcher._result(trial)
    assert ret.status == JobStatus.FAILED
    with pytest.raises(RuntimeError, match="killed by signal 9"):
        _ = ret.return_value


def test_bad_launcher_settings_are_named():
    with pytest.raises(ValueError, match="gpus_per_trial=0"):
        GpuPoolLauncher(gpus_per_trial=0)


def test_the_trial_command_keeps_hydra_flags_and_drops_overrides(monkeypatch):
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))  # started as a script
    monkeypatch.setattr(sys, "argv", ["scripts/train.py", "-m", "--config-name", "other", "lora.r=4,8", "-cd=conf"])
    assert _app_command() == ["scripts/train.py", "--config-name", "other", "-cd=conf"]

"""A Hydra launcher that runs every trial of a sweep as a fresh process on its own GPU slot.

Why: Lightning's DDP launcher re-runs ``sys.argv`` for each extra rank, which under ``-m`` re-runs the whole
sweep (Hydra #2070, Lightning #11300). In a fresh single-run process Lightning's path is correct, so each
trial gets one: ``python <app> <trial overrides> hydra.mode=RUN hydra.run.dir=<trial dir>`` with
``CUDA_VISIBLE_DEVICES`` set to its slot. Slots are ``gpus_per_trial`` GPUs each; as many trials run at once
as there are slots. A trial that fails (exception, OOM, killed, timeout) is reported with its log and the
others go on; each trial's return value (the swept metric) goes back to the sweeper.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.experimental.callback import Callback
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)

RESULT_FILE = "trial_result.json"
TRIAL_LOG = "trial.log"
SWEEP_DIR_ENV = "LORA_LIGHTNING_SWEEP_DIR"  # set in each trial, so it can tell it belongs to a sweep


@dataclass
class GpuPoolLauncherConf:
    _target_: str = "hydra_plugins.lora_lightning_launcher.gpu_pool.GpuPoolLauncher"
    gpus: list[str] | None = None  # device ids to share out; None: CUDA_VISIBLE_DEVICES, else every GPU found
    gpus_per_trial: int = 1  # > 1: DDP inside each trial (set trainer.devices to the same number)
    cpu_trials: int = 1  # trials at once where no GPU is found
    timeout_min: float | None = None  # a trial running longer is killed and reported failed
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every trial


ConfigStore.instance().store(
    group="hydra/launcher", name="gpu_pool", node=GpuPoolLauncherConf, provider="lora_lightning"
)


class ResultWriter(Callback):
    """Hydra callback run inside a trial: writes its return value or error next to its outputs."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        ok = job_return.status == JobStatus.COMPLETED
        value = job_return._return_value
        result = {"status": "completed" if ok else "failed", "value": _jsonable(value) if ok else None}
        if not ok:
            result["error"] = f"{type(value).__name__}: {value}"
        (Path(config.hydra.runtime.output_dir) / RESULT_FILE).write_text(json.dumps(result, indent=2))


@dataclass
class _Trial:
    idx: int
    overrides: list[str]
    config: DictConfig
    run_dir: Path
    slot: int | None = None
    process: subprocess.Popen | None = None
    started: float = 0.0


class GpuPoolLauncher(Launcher):
    def __init__(self, **params: Any) -> None:
        self.params = GpuPoolLauncherConf(**params)
        if self.params.gpus_per_trial < 1 or self.params.cpu_trials < 1:
            raise ValueError(
                f"hydra.launcher: gpus_per_trial={self.params.gpus_per_trial} and cpu_trials="
                f"{self.params.cpu_trials} must both be >= 1"
            )
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        assert self.config is not None and self.hydra_context is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        slots = self._slots()
        trials = [self._plan(initial_job_idx + i, list(o)) for i, o in enumerate(job_overrides)]
        where = f"{len(slots)} slots of GPUs {slots}" if slots[0] else f"{len(slots)} CPU slot(s)"
        log.info(f"gpu_pool: {len(trials)} trials on {where}")
        waiting, running, done = list(trials), [], []
        try:
            while waiting or running:
                free = [i for i in range(len(slots)) if all(t.slot != i for t in running)]
                while waiting and free:
                    trial, trial.slot = waiting.pop(0), free.pop(0)
                    self._start(trial, slots[trial.slot])
                    running.append(trial)
                time.sleep(0.2)
                for trial in [t for t in running if self._finished(t)]:
                    running.remove(trial)
                    done.append(trial)
        finally:
            for trial in running:  # interrupted: take the trials' process groups down with us
                _kill(trial.process)
        return [self._result(t) for t in sorted(done, key=lambda t: t.idx)]

    def _slots(self) -> list[list[str] | None]:
        gpus = list(self.params.gpus) if self.params.gpus is not None else _visible_gpus()
        if not gpus:
            return [None] * self.params.cpu_trials
        k = self.params.gpus_per_trial
        if len(gpus) < k:
            raise ValueError(f"hydra.launcher.gpus_per_trial={k} but only GPUs {gpus} are available")
        return [[str(g) for g in gpus[i : i + k]] for i in range(0, len(gpus) - k + 1, k)]

    def _plan(self, idx: int, overrides: list[str]) -> _Trial:
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = idx
            config.hydra.job.num = idx
        HydraConfig.instance().set_config(config)
        run_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)
        return _Trial(idx, overrides, config, run_dir)

    def _start(self, trial: _Trial, slot: list[str] | None) -> None:
        assert self.config is not None
        trial.run_dir.mkdir(parents=True, exist_ok=True)
        (trial.run_dir / RESULT_FILE).unlink(missing_ok=True)
        command = [
            sys.executable,
            *_app_command(),
            *trial.overrides,
            "hydra.mode=RUN",
            f"hydra.run.dir={trial.run_dir}",
            f"hydra.job.num={trial.idx}",
            f"hydra.job.id={trial.idx}",
            "+hydra.callbacks.lora_lightning_result._target_="
            "hydra_plugins.lora_lightning_launcher.gpu_pool.ResultWriter",
        ]
        env = {**os.environ, **self.params.env, SWEEP_DIR_ENV: str(self.config.hydra.sweep.dir)}
        env["CUDA_VISIBLE_DEVICES"] = ",".join(slot) if slot else ""
        for leaked in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(leaked, None)  # never hand a parent's rank setup to a fresh trial
        where = f"GPUs {','.join(slot)}" if slot else "CPU"
        log.info(f"\t#{trial.idx} on {where}: {' '.join(filter_overrides(trial.overrides))}")
        with open(trial.run_dir / TRIAL_LOG, "ab") as out:
            trial.process = subprocess.Popen(
                command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        trial.started = time.monotonic()

    def _finished(self, trial: _Trial) -> bool:
        assert trial.process is not None
        limit = self.params.timeout_min
        if trial.process.poll() is None and limit is not None and time.monotonic() - trial.started > 60 * limit:
            log.error(f"\t#{trial.idx} ran past timeout_min={limit}: killed")
            _kill(trial.process)
            trial.process.wait()
        return trial.process.poll() is not None

    def _result(self, trial: _Trial) -> JobReturn:
        assert trial.process is not None
        code = trial.process.returncode
        saved = trial.run_dir / RESULT_FILE
        result = json.loads(saved.read_text()) if saved.is_file() else {}
        ret = JobReturn(
            overrides=trial.overrides,
            cfg=trial.config,
            hydra_cfg=trial.config,
            working_dir=str(trial.run_dir),
            task_name=str(trial.config.hydra.job.name),
        )
        if code == 0 and result.get("status") == "completed":
            ret.status, ret.return_value = JobStatus.COMPLETED, result.get("value")
            return ret
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        error = result.get("error") or "no result written"
        log.error(f"\t#{trial.idx} failed: it {how} ({error}); log: {trial.run_dir / TRIAL_LOG}")
        ret.status = JobStatus.FAILED
        ret.return_value = RuntimeError(f"trial #{trial.idx} {how}: {error}; see {trial.run_dir / TRIAL_LOG}")
        return ret


def _app_command() -> list[str]:
    """How this process was started (script or ``-m module``) with its Hydra flags, minus its overrides."""
    argv = list(sys.argv)
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    head = ["-m", spec.name] if spec is not None and spec.name != "__main__" else [argv[0]]
    flags, rest = [], argv[1:]
    value_flags = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
    while rest:
        arg = rest.pop(0)
        if arg in value_flags and rest:
            flags += [arg, rest.pop(0)]
        elif arg.split("=", 1)[0] in value_flags:
            flags.append(arg)
    return head + flags


def _visible_gpus() -> list[str]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g.strip() for g in visible.split(",") if g.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def _kill(process: subprocess.Popen | None) -> None:
    if process is not None and process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # the trial and any DDP ranks it started


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
        return value
    except TypeError:
        return float(value) if hasattr(value, "__float__") else str(value)

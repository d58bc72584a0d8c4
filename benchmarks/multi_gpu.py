"""Multi-GPU measurements (issue 4), each phase in fresh processes:

    ddp     DDP tokens/s on 2 GPUs against 1 GPU: a Lightning Trainer with LoRAFinetuneCallback on the benchmark
            model (benchmarks.shapes; llama-1b: Llama-3.2-1B shape, bf16, batch 4 x 2048 per GPU,
            r=16 alpha=32 on every linear layer of the blocks). Step time is the median interval between
            consecutive ``on_train_batch_end`` calls on rank 0 (device synchronised) after the warm-up steps;
            tokens/s counts the tokens of all ranks.
    packed  4 single-GPU trials at once through the gpu_pool Hydra launcher (one fresh process per GPU slot,
            benchmarks/multi_gpu_trial.py) against 1 trial alone through the same launcher: the ratio of the
            sweeps' wall times (1.0: packing is free) and of the trials' own tokens/s.
    tests   pytest tests/lib/test_fsdp.py -m gpu (FSDP1, FSDP1 + activation checkpointing, FSDP2, DDP + gradient
            checkpointing on 2 GPUs).

``--tiny`` runs the same code paths on CPU in a few minutes: the tiny shape in fp32, DDP over gloo, fake GPU ids
for the launcher's slots, and the GPU tests collected (and skipped). Writes ``multi_gpu.json`` and
``multi_gpu.md`` into ``--out`` after every phase, so a run cut short keeps what it measured.

    python scripts/multi_gpu_bench.py --out outputs/multi_gpu            # on a machine with 4 GPUs
    python scripts/multi_gpu_bench.py --tiny --out outputs/multi_gpu-tiny
    python -m benchmarks.multi_gpu --tiny --out outputs/multi_gpu-tiny   # the same, from the repository root
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from benchmarks.environment import REPO_ROOT, environment
from benchmarks.memory import cuda_peak_bytes
from benchmarks.multi_gpu_report import render_markdown, write_report
from benchmarks.rows import LEARNING_RATE, make_optimizer
from benchmarks.shapes import SHAPES, TARGET_MODULES, build_model
from benchmarks.timing import clock, median_ms

TRIAL_FILE = "trial.json"
PHASES = ("ddp", "packed", "tests")
# NVLink multicast stays off on shared hosts, also in processes started with their own environment.
NCCL_SAFETY = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass
class RunSpec:
    """One training run of the benchmark model; the same fields are the trial app's Hydra config."""

    shape: str = "llama-1b"
    dtype: str = "bf16"
    precision: str = "bf16-true"
    accelerator: str = "gpu"
    batch_size: int = 4
    seq_len: int = 2048
    steps: int = 20
    warmup: int = 5
    r: int = 16
    alpha: float = 32.0

    def overrides(self) -> list[str]:
        return [f"{f.name}={getattr(self, f.name)}" for f in fields(self)]


def gpu_spec() -> RunSpec:
    return RunSpec()


def tiny_spec() -> RunSpec:
    return RunSpec(
        shape="tiny", dtype="fp32", precision="32-true", accelerator="cpu", batch_size=2, seq_len=64, steps=3, warmup=1
    )


# ---------------------------------------------------------------------------------------------------------------
# One training run (DDP when devices > 1); also what every trial of the packed phase runs
# ---------------------------------------------------------------------------------------------------------------


def train(spec: RunSpec, devices: int) -> dict[str, Any] | None:
    """Fit the benchmark model for ``warmup + steps`` steps; rank 0 returns its record, other ranks None."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, TensorDataset

    from lora_lightning import LoRAConfig, LoRAFinetuneCallback

    shape = SHAPES[spec.shape]

    class BenchModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model: torch.nn.Module | None = None
            self.losses: list[torch.Tensor] = []

        def configure_model(self) -> None:  # built on its device, in the precision's dtype
            if self.model is None:
                device = self.trainer.strategy.root_device
                self.model = build_model(shape.model, seq_len=spec.seq_len, dtype=spec.dtype, device=device)

        def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
            (tokens,) = batch
            loss = self.model(input_ids=tokens, labels=tokens, use_cache=False).loss
            self.losses.append(loss.detach())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer, _ = make_optimizer([p for p in self.parameters() if p.requires_grad], LEARNING_RATE)
            assert optimizer is not None
            return optimizer

    class StepTimer(Callback):
        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            if not self.marks:
                self.marks.append(clock(trainer.strategy.root_device))

        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            self.marks.append(clock(trainer.strategy.root_device))

    total = spec.warmup + spec.steps
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, shape.vocab_size, (total * spec.batch_size * devices, spec.seq_len), generator=generator)
    loader = DataLoader(TensorDataset(tokens), batch_size=spec.batch_size, shuffle=False)
    timer = StepTimer()
    config = LoRAConfig(r=spec.r, alpha=spec.alpha, target_modules=list(TARGET_MODULES))
    with tempfile.TemporaryDirectory(prefix="multi-gpu-bench-") as root:
        trainer = pl.Trainer(
            accelerator=spec.accelerator,
            devices=devices,
            strategy="ddp" if devices > 1 else "auto",
            precision=spec.precision,
            max_steps=total,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            default_root_dir=root,
            callbacks=[LoRAFinetuneCallback(config), timer],
        )
        module = BenchModule()
        trainer.fit(module, loader)
    if not trainer.is_global_zero:
        return None
    device = trainer.strategy.root_device
    step_s = [b - a for a, b in zip(timer.marks[:-1], timer.marks[1:], strict=True)]
    step_ms = median_ms(step_s[spec.warmup :])
    return {
        "devices": devices,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "strategy": type(trainer.strategy).__name__,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "step_ms": [1e3 * s for s in step_s],
        "median_step_ms": step_ms,
        "tokens_per_s": 1e3 * devices * spec.batch_size * spec.seq_len / step_ms,
        "peak_memory_bytes": cuda_peak_bytes(device),
        "loss_first": float(module.losses[0]),
        "loss_last": float(module.losses[-1]),
    }


# ---------------------------------------------------------------------------------------------------------------
# The phases, each in fresh processes
# ---------------------------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """This environment for a fresh process: the checkout importable, no rank variables of ours leaking in."""
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_PORT")}
    paths = env.get("PYTHONPATH", "").split(os.pathsep)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *[p for p in paths if p and p != str(REPO_ROOT)]])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {**NCCL_SAFETY, **env}


def run_process(command: list[str], timeout_s: float, log: Path) -> tuple[int | None, float]:
    """Run ``command``, its output to ``log``; returns its exit code (None: timed out) and wall seconds. On a
    timeout its process group gets SIGINT (the gpu_pool launcher then stops its trials), then SIGKILL."""
    start = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=child_env(), cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code: int | None = process.wait(timeout=max(timeout_s, 1.0))
        except subprocess.TimeoutExpired:
            code = None
            for sig, grace in ((signal.SIGINT, 15.0), (signal.SIGKILL, None)):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(timeout=grace)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
    return code, time.perf_counter() - start


def failure(code: int | None, log: Path, timeout_s: float) -> str:
    """Why a process failed, with the end of its log."""
    how = f"timed out after {timeout_s:g} s" if code is None else f"exit code {code}"
    tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-6:]) if log.exists() else ""
    return f"{how}: {tail[-1500:]}"


def phase_ddp(spec: RunSpec, out: Path, timeout_s: float) -> dict[str, Any]:
    runs = []
    for devices in (1, 2):
        record_file = out / f"ddp_{devices}.json"
        record_file.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "benchmarks.multi_gpu",
            f"--train-devices={devices}",
            f"--train-out={record_file}",
            f"--spec={json.dumps(asdict(spec))}",
        ]
        code, wall = run_process(command, timeout_s, out / f"ddp_{devices}.log")
        if code == 0 and record_file.exists():
            runs.append({**json.loads(record_file.read_text()), "ok": True, "process_wall_s": wall})
        else:
            error = failure(code, out / f"ddp_{devices}.log", timeout_s)
            runs.append({"devices": devices, "ok": False, "error": error})
    result: dict[str, Any] = {"runs": runs}
    if all(r["ok"] for r in runs):
        result["speedup_2_over_1"] = runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"]
        result["scaling_efficiency"] = result["speedup_2_over_1"] / 2
    return result


def phase_packed(spec: RunSpec, gpus: list[str], out: Path, timeout_s: float) -> dict[str, Any]:
    sweeps = {}
    for name, slots in (("alone", gpus[:1]), ("packed", gpus)):
        sweep_dir = out / f"packed_{name}"
        command = [
            sys.executable,
            "-m",
            "benchmarks.multi_gpu_trial",
            "-m",
            f"trial={','.join(str(i) for i in range(len(slots)))}",
            *spec.overrides(),
            "hydra/launcher=gpu_pool",
            f"hydra.launcher.gpus=[{','.join(slots)}]",
            f"hydra.sweep.dir={sweep_dir}",
            "hydra.sweep.subdir=trial${hydra.job.num}",
        ]
        code, wall = run_process(command, timeout_s, out / f"packed_{name}.log")
        trials = [json.loads(p.read_text()) for p in sorted(sweep_dir.glob(f"trial*/{TRIAL_FILE}"))]
        ok = code == 0 and len(trials) == len(slots)
        sweeps[name] = {"trials": len(slots), "gpus": slots, "ok": ok, "sweep_wall_s": wall, "trial_records": trials}
        if ok:
            sweeps[name]["mean_trial_tokens_per_s"] = statistics.mean(t["tokens_per_s"] for t in trials)
            sweeps[name]["mean_trial_wall_s"] = statistics.mean(t["wall_s"] for t in trials)
        else:
            sweeps[name]["error"] = failure(code, out / f"packed_{name}.log", timeout_s)
    result: dict[str, Any] = {"sweeps": sweeps}
    if all(s["ok"] for s in sweeps.values()):
        alone, packed = sweeps["alone"], sweeps["packed"]
        result["wall_ratio_packed_over_alone"] = packed["sweep_wall_s"] / alone["sweep_wall_s"]
        result["trial_tokens_per_s_ratio"] = packed["mean_trial_tokens_per_s"] / alone["mean_trial_tokens_per_s"]
        result["speedup_over_one_after_another"] = len(gpus) * alone["sweep_wall_s"] / packed["sweep_wall_s"]
    return result


def phase_tests(out: Path, timeout_s: float) -> dict[str, Any]:
    junit = out / "test_fsdp.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "tests/lib/test_fsdp.py",
        "-m",
        "gpu",
        "-v",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
    ]
    junit.unlink(missing_ok=True)
    code, wall = run_process(command, timeout_s, out / "test_fsdp.log")
    cases = []
    if not junit.exists():  # killed: what the verbose log says of the tests that finished
        for line in (out / "test_fsdp.log").read_text(errors="replace").splitlines():
            found = re.match(r"\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR)", line)
            if found:
                cases.append({"test": found[1], "outcome": found[2].lower(), "seconds": 0.0, "detail": ""})
    else:
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            detail = next((c.get("message", "") for c in case if c.tag in ("failure", "error", "skipped")), "")
            cases.append(
                {
                    "test": case.get("name"),
                    "outcome": outcome,
                    "seconds": float(case.get("time", 0)),
                    "detail": detail[:500],
                }
            )
    result: dict[str, Any] = {"exit_code": code, "wall_s": wall, "cases": cases}
    if code != 0:
        result["error"] = failure(code, out / "test_fsdp.log", timeout_s)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/multi_gpu"), help="folder for the JSON and Markdown")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny model, gloo, fake GPU ids")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--trials", type=int, default=4, help="trials packed at once, one GPU each")
    parser.add_argument("--steps", type=int, help="timed steps of a DDP run (default: 20; --tiny: 3)")
    parser.add_argument("--trial-steps", type=int, help="timed steps of a packed trial (default: 60; --tiny: 3)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per run (default: 5; --tiny: 1)")
    parser.add_argument("--phase-timeout", type=float, default=200.0, help="seconds before a process is killed")
    parser.add_argument(
        "--budget", type=float, default=520.0, help="seconds for all phases: later processes get what is left"
    )
    parser.add_argument("--train-devices", type=int, help=argparse.SUPPRESS)  # internal: one training run
    parser.add_argument("--train-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.train_devices:  # a run process of the ddp phase (and, for rank 1, Lightning's re-run of it)
        record = train(RunSpec(**json.loads(args.spec)), args.train_devices)
        if record is not None:
            args.train_out.write_text(json.dumps(record, indent=2))
        return 0
    spec = tiny_spec() if args.tiny else gpu_spec()
    spec = replace(spec, steps=args.steps or spec.steps, warmup=args.warmup or spec.warmup)
    trial_spec = replace(spec, steps=args.trial_steps or (spec.steps if args.tiny else 60))
    deadline = time.perf_counter() + args.budget
    found = 0 if args.tiny else torch.cuda.device_count()
    gpus = [str(i) for i in range(args.trials if args.tiny else min(args.trials, found))]
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda", 0) if found else torch.device("cpu")
    report: dict[str, Any] = {
        "schema_version": 1,
        "tiny": args.tiny,
        "gpus_found": found,
        "environment": environment(device),
        "spec": asdict(spec),
        "trial_spec": asdict(trial_spec),
        "phases": {},
    }
    for phase in args.phases:
        print(f"[multi_gpu_bench] {phase} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        left = deadline - start
        if left < 30:
            report["phases"][phase] = {"skipped": f"--budget {args.budget:g} s spent"}
        elif phase == "ddp" and (args.tiny or found >= 2):
            report["phases"]["ddp"] = phase_ddp(spec, args.out, min(args.phase_timeout, left / 2))
        elif phase == "packed" and gpus:
            report["phases"]["packed"] = phase_packed(trial_spec, gpus, args.out, min(args.phase_timeout, left / 2))
        elif phase == "tests":
            report["phases"]["tests"] = phase_tests(args.out, left)
        else:
            report["phases"][phase] = {"skipped": f"{found} GPUs found"}
        print(f"[multi_gpu_bench] {phase} took {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        write_report(report, args.out)
    print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

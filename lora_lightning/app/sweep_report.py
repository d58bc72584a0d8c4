"""Summarise a Hydra multirun folder of training runs: a Markdown and a CSV table, and a plot of the metric
against LoRA rank with one line per alpha. Trials repeated over seeds (``sweep.seeds=N``) are pooled per
setting: mean and spread, a band in the plot, ties within the noise marked (`sweep_stats`).

    python scripts/sweep_report.py logs/train/multiruns/2026-01-01_12-00-00
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lora_lightning.app.sweep_stats import Setting, rank_settings, settings

REPORT_NAME = "sweep_report"
COLUMNS = (
    "run", "rank", "alpha", "seed", "trainable_params", "metric", "tokens_per_sec", "time_per_step_ms",
    "peak_memory_mib", "status", "error",
)  # fmt: skip


@dataclass
class Trial:
    run: str
    rank: int | None
    alpha: float | None
    trainable_params: int | None
    metric: float | None
    metric_name: str
    metric_mode: str
    before: float | None
    time_per_step_ms: float | None
    peak_memory_mib: float | None
    memory_kind: str
    status: str
    error: str = ""
    seed: int | None = None
    tokens_per_sec: float | None = None


def collect(multirun_dir: str | Path) -> list[Trial]:
    """One `Trial` per job folder (a folder holding Hydra's ``.hydra``), sorted by alpha then rank. Status:
    ``ok``; ``failed`` (it raised, or its process died mid-run); ``running`` (its process is still alive);
    ``missing`` (no ``metrics.json``: the job never started training)."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder")
    trials = [_trial(job.parent) for job in sorted(root.glob("*/.hydra")) if job.is_dir()]
    if not trials:
        raise FileNotFoundError(f"no job folders (with a .hydra folder) under {str(root)!r}; is it a multirun folder?")
    return sorted(trials, key=lambda t: (_num(t.alpha), _num(t.rank), t.run))


def _trial(job: Path) -> Trial:
    metrics: dict[str, Any] = {}
    if (job / "metrics.json").is_file():
        metrics = json.loads((job / "metrics.json").read_text())
    lora = _job_lora(job)
    name = metrics.get("metric_name") or "metric"
    step = metrics.get("time_per_step_s")
    status = metrics.get("status", "missing")
    trial = Trial(
        run=job.name,
        rank=metrics.get("r", lora.get("r")),
        alpha=metrics.get("alpha", lora.get("alpha")),
        trainable_params=(metrics.get("params") or {}).get("trainable"),
        metric=metrics.get("metric") if status == "ok" else None,
        metric_name=name,
        metric_mode=metrics.get("metric_mode", "max"),
        before=(metrics.get("before") or {}).get(name),
        time_per_step_ms=None if step is None else round(1000 * step, 1),
        peak_memory_mib=metrics.get("peak_memory_mib"),
        memory_kind=metrics.get("memory_kind", ""),
        status=status,
        error=metrics.get("error", ""),
        seed=metrics.get("seed"),
        tokens_per_sec=metrics.get("tokens_per_sec"),
    )
    if status == "running" and not _alive(metrics.get("pid"), metrics.get("host")):
        trial.status, trial.error = "failed", "the trial's process ended without finishing (killed?)"
    return trial


def _alive(pid: Any, host: Any) -> bool:
    """Whether the process that wrote a ``running`` status still runs (only known on the same machine)."""
    if not isinstance(pid, int) or host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _job_lora(job: Path) -> dict[str, Any]:
    config = job / ".hydra" / "config.yaml"
    if not config.is_file():
        return {}
    lora = OmegaConf.load(config).get("lora") or {}
    return {k: lora.get(k) for k in ("r", "alpha")}


def best(trials: Sequence[Trial]) -> Trial | None:
    done = [t for t in trials if t.metric is not None and not math.isnan(t.metric)]
    if not done:
        return None
    sign = -1.0 if done[0].metric_mode == "min" else 1.0
    return max(done, key=lambda t: sign * t.metric)


def write_csv(trials: Sequence[Trial], path: Path) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        metric = trials[0].metric_name if trials else "metric"
        writer.writerow([metric if c == "metric" else c for c in COLUMNS])  # the metric column is named after it
        for t in trials:
            writer.writerow([_cell(getattr(t, c)) for c in COLUMNS])
    return path


def write_markdown(trials: Sequence[Trial], path: Path, title: str) -> Path:
    metric = trials[0].metric_name if trials else "metric"
    memory = {t.memory_kind for t in trials if t.memory_kind}
    memory_note = {
        "cpu_rss": "resident memory of the process (trials run one after another in one process also count what "
        "earlier trials left behind)",
        "cuda_allocated": "CUDA memory allocated (peak, reset for each trial)",
    }
    lines = [f"# LoRA sweep: {title}", ""]
    groups = settings(trials)
    top = rank_settings(groups, trials[0].metric_mode if trials else "max")
    if top is not None:
        spread = f" ± {top.std:.4f} over {len(top.values)} seeds" if top.std is not None else ""
        lines.append(
            f"Best: **{top.name}** (rank {top.first.rank}, alpha {_cell(top.first.alpha)}): "
            f"{metric} = {top.mean:.4f}{spread}."
        )
        ties = [g.name for g in groups if g.tie]
        if ties:
            lines.append(f"Within the noise of the best (tie): {', '.join(ties)}.")
        elif top.std is None and len(groups) > 1:
            lines.append("One seed per setting: differences cannot be told from noise (repeat with sweep.seeds=3).")
    befores = [t.before for t in trials if t.before is not None]
    if befores:
        lines.append(f"Before training: {metric} = {sum(befores) / len(befores):.4f} (mean over runs).")
    counts = {s: sum(t.status == s for t in trials) for s in ("ok", "failed", "running", "missing")}
    lines += [f"Runs: {len(trials)} ({', '.join(f'{n} {s}' for s, n in counts.items() if n)}).", ""]
    if any(len(g.trials) > 1 for g in groups):
        lines += [*_settings_table(groups, top, metric), ""]
    header = ["run", "rank", "alpha", "trainable params", metric, "tokens/s", "time/step (ms)", "peak memory (MiB)"]
    header.append("status")
    show_errors = any(t.error for t in trials)
    header += ["error"] if show_errors else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for t in trials:
        cells = [t.run, t.rank, t.alpha, t.trainable_params, t.metric, _rate(t.tokens_per_sec), t.time_per_step_ms,
                 t.peak_memory_mib, t.status]  # fmt: skip
        row = [_cell(c, thousands=i == 3) for i, c in enumerate(cells)]
        if show_errors:
            row.append(" ".join(t.error.split())[:200].replace("|", "/"))
        lines.append("| " + " | ".join(row) + " |")
    if memory:
        lines += ["", "Peak memory: " + ", ".join(memory_note.get(m, m) for m in sorted(memory)) + "."]
    path.write_text("\n".join(lines) + "\n")
    return path


def _settings_table(groups: Sequence[Setting], top: Setting | None, metric: str) -> list[str]:
    """One row per setting: seeds finished, mean ± sample std of the metric, mean tokens/s, peak memory."""
    header = ["setting", "rank", "alpha", "seeds", f"{metric} mean ± std", "tokens/s", "peak memory (MiB)", ""]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        value = "" if g.mean is None else f"{g.mean:.4f}" + (f" ± {g.std:.4f}" if g.std is not None else "")
        note = "best" if g is top else "tie" if g.tie else ""
        peak = max((t.peak_memory_mib for t in g.trials if t.peak_memory_mib is not None), default=None)
        cells = [g.name, _cell(g.first.rank), _cell(g.first.alpha), f"{len(g.values)}/{len(g.trials)}", value,
                 _rate(g.mean_of("tokens_per_sec")), _cell(peak), note]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return lines


def plot(trials: Sequence[Trial], path: Path, title: str) -> Path:
    """Metric against rank (log2 axis, trainable parameters under each rank), one line per alpha through the
    settings' means, a band of ± one standard deviation over seeds; the best setting starred, failed or missing
    runs crossed on the rank axis, the pre-training level in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = trials[0].metric_name if trials else "metric"
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    groups = settings(trials)
    top = rank_settings(groups, trials[0].metric_mode if trials else "max")
    alphas = sorted({t.alpha for t in trials if t.alpha is not None})
    palette = plt.get_cmap("tab10")
    for index, alpha in enumerate(alphas):
        points = sorted((g.first.rank, g.mean, g.std or 0.0) for g in groups
                        if g.first.alpha == alpha and g.mean is not None and g.first.rank)  # fmt: skip
        if points:
            ranks, means, stds = zip(*points, strict=True)
            color = palette(index % 10)
            ax.plot(ranks, means, marker="o", lw=2.2, ms=7, color=color, label=f"alpha = {alpha:g}")
            if any(stds):
                low = [m - s for m, s in zip(means, stds, strict=True)]
                high = [m + s for m, s in zip(means, stds, strict=True)]
                ax.fill_between(ranks, low, high, color=color, alpha=0.18, lw=0)
    failed = [t for t in trials if t.metric is None and t.rank and t.status != "running"]
    if failed:  # on the rank axis: they have no value to plot
        colors = [palette(alphas.index(t.alpha) % 10) if t.alpha in alphas else "crimson" for t in failed]
        ax.scatter([t.rank for t in failed], [0.03] * len(failed), transform=ax.get_xaxis_transform(), marker="x",
                   s=70, lw=2.5, c=colors, label="failed / missing run (its alpha's color)", zorder=3)  # fmt: skip
    if top is not None and top.first.rank:
        ax.scatter([top.first.rank], [top.mean], marker="*", s=380, color="gold", edgecolor="black", zorder=4,
                   label=f"best: r={top.first.rank}, alpha={top.first.alpha:g} ({top.mean:.4g})")  # fmt: skip
    ranks = sorted({t.rank for t in trials if t.rank})
    if ranks:
        params = {t.rank: t.trainable_params for t in trials if t.trainable_params}
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [f"{r}\n{_short(params[r])} params" if r in params else str(r) for r in ranks])
        ax.minorticks_off()
        ax.set_xlim(ranks[0] / 1.4, ranks[-1] * 1.4)
    mode = trials[0].metric_mode if trials else "max"
    seeds = max((len(g.trials) for g in groups), default=1)
    band = f", band: ± 1 std over {seeds} seeds" if seeds > 1 else ""
    ax.set_xlabel("LoRA rank r (trainable parameters)")
    ax.set_ylabel(f"held-out {metric} after training ({'higher' if mode == 'max' else 'lower'} is better)")
    befores = [t.before for t in trials if t.before is not None]
    before = f"; before training: {sum(befores) / len(befores):.4g}" if befores else ""
    ax.set_title(f"{metric} vs LoRA rank, one line per alpha{band}\n{title}{before}", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f}"


def _short(count: int) -> str:
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if count >= size:
            return f"{count / size:.3g}{suffix}"
    return str(count)


def write_report(multirun_dir: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Collect the runs and write ``sweep_report.{md,csv,png}`` into ``out_dir`` (default: the multirun folder)."""
    trials = collect(multirun_dir)
    out = Path(out_dir or multirun_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = Path(multirun_dir).resolve().name
    return {
        "markdown": write_markdown(trials, out / f"{REPORT_NAME}.md", title),
        "csv": write_csv(trials, out / f"{REPORT_NAME}.csv"),
        "plot": plot(trials, out / f"{REPORT_NAME}.png", title),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("multirun_dir", help="a Hydra multirun folder, e.g. logs/train/multiruns/<time>")
    parser.add_argument("--out", default=None, help="where to write the report (default: the multirun folder)")
    args = parser.parse_args(argv)
    paths = write_report(args.multirun_dir, args.out)
    print((paths["markdown"]).read_text())
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _num(value: Any) -> float:
    return math.inf if value is None else float(value)


def _cell(value: Any, thousands: bool = False) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
        return f"{value:.4f}".rstrip("0") if abs(value) < 100 else f"{value:.1f}"
    if thousands and isinstance(value, int):
        return f"{value:,}"
    return str(value)

"""A sweep's settings over seeds: the trials of one setting (the same run name but for ``seed``) pooled into a
mean and a spread, and the settings whose difference from the best lies within the noise marked as ties.

Noise: with ``n`` seeds a setting's mean has standard error ``s / sqrt(n)`` (``s`` the sample standard deviation
over seeds). Two settings tie when their means differ by at most twice the standard error of the difference,
``2 sqrt(s1^2 / n1 + s2^2 / n2)`` (about a 95% band). A setting run with one seed has no spread, so no tie is
claimed for it, nor a win over a tie.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

SEED_PART = re.compile(r"(^|_)seed-?\d+(?=_|$)")


def setting_name(run: str) -> str:
    """``r8_a16_seed43`` -> ``r8_a16``: the run's name without its seed."""
    return SEED_PART.sub("", run).strip("_") or run


@dataclass
class Setting:
    """The trials of one setting; ``values`` are the finished trials' metrics."""

    name: str
    trials: list[Any]
    values: list[float] = field(default_factory=list)
    tie: bool = False

    @property
    def first(self) -> Any:
        return self.trials[0]

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    def mean_of(self, attribute: str) -> float | None:
        found = [getattr(t, attribute) for t in self.trials if getattr(t, attribute) is not None]
        return statistics.fmean(found) if found else None


def settings(trials: Sequence[Any]) -> list[Setting]:
    """Trials grouped by `setting_name`, in the trials' order."""
    groups: dict[str, Setting] = {}
    for trial in trials:
        group = groups.setdefault(setting_name(trial.run), Setting(setting_name(trial.run), []))
        group.trials.append(trial)
        if trial.metric is not None and not math.isnan(trial.metric):
            group.values.append(trial.metric)
    return list(groups.values())


def within_noise(a: Setting, b: Setting) -> bool:
    """Whether the two settings' means differ by no more than twice the standard error of the difference."""
    if a.std is None or b.std is None or a.mean is None or b.mean is None:
        return False
    band = 2 * math.sqrt(a.std**2 / len(a.values) + b.std**2 / len(b.values))
    return abs(a.mean - b.mean) <= band


def rank_settings(groups: Sequence[Setting], mode: str) -> Setting | None:
    """The best setting by mean (``mode``: ``max`` or ``min``); marks the others within its noise as ties."""
    done = [g for g in groups if g.mean is not None]
    if not done:
        return None
    sign = -1.0 if mode == "min" else 1.0
    top = max(done, key=lambda g: sign * g.mean)
    for group in done:
        group.tie = group is not top and within_noise(top, group)
    return top

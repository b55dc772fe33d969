"""Statistics of a study: per-seed summaries, t-based confidence intervals, paired tests, bytes to target.

Every function takes plain lists (one value per seed) or a run's metrics rows (``metrics.jsonl``:
round 0 = the untrained model), so the numbers in a results table can be recomputed by hand:

* :func:`mean_std`: mean and the sample standard deviation (``n - 1`` in the denominator);
* :func:`t_interval`: ``mean ± t_{0.975, n-1} · std / √n``, the 95 % confidence interval of the mean
  under a t distribution with ``n - 1`` degrees of freedom;
* :func:`paired_test`: the per-seed differences ``a_i - b_i`` (same seed = same partition, data order
  and initialisation for both methods), their mean, std and t interval, the paired t-test
  (:func:`scipy.stats.ttest_rel`, two-sided; the headline) and the Wilcoxon signed-rank test
  (:func:`scipy.stats.wilcoxon`, two-sided, exact for small n; reported beside it);
* :func:`final_value`, :func:`last_k_mean`: a run's metric in its last round, and its mean over the
  last ``k`` rounds;
* :func:`bytes_to_target`: the cumulative bytes (up + down) when a run's metric first reaches a
  target (for a lower-is-better metric: first falls to it).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "PairedResult",
    "Summary",
    "bytes_to_target",
    "final_value",
    "last_k_mean",
    "mean_std",
    "paired_test",
    "summarise_values",
    "t_interval",
]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)``; the std is 0 for a single value. Raises ValueError for no values."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_std of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The ``level`` confidence interval of the mean: ``mean ± t_{(1+level)/2, n-1} std / sqrt(n)``.

    ``(nan, nan)`` for fewer than two values (no spread to estimate).
    """
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (scipy)
    from scipy import stats

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean, std = mean_std(values)
    half = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


@dataclass
class Summary:
    """One number per seed, summarised: ``n``, mean, std, the 95 % t interval, min and max."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    min: float
    max: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise_values(values: Sequence[float], level: float = 0.95) -> Summary:
    mean, std = mean_std(values)
    lo, hi = t_interval(values, level)
    return Summary(len(values), mean, std, lo, hi, min(values), max(values))


@dataclass
class PairedResult:
    """``a - b`` paired by seed: the differences, their summary and two paired tests (two-sided)."""

    seeds: list[int]
    differences: list[float]
    mean: float
    std: float
    ci_low: float
    ci_high: float
    t: float  # paired t statistic (nan when n < 2 or all differences are equal: no spread)
    p_t: float  # its two-sided p-value (scipy.stats.ttest_rel); the headline test
    p_wilcoxon: float  # two-sided Wilcoxon signed-rank p-value (nan when it is undefined)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_test(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> PairedResult | None:
    """Compare ``a`` and ``b`` (``{seed: value}``) on the seeds both have; None when they share none.

    The paired t-test is :func:`scipy.stats.ttest_rel` (``t = mean(d) / (std(d) / sqrt(n))`` with
    ``n - 1`` degrees of freedom); the Wilcoxon signed-rank test is :func:`scipy.stats.wilcoxon`
    (nan when all differences are zero or n < 2).
    """
    # lazy: florg.cli.main imports this module: keeps florg --help under 1 s (scipy)
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    xa = [float(a[s]) for s in seeds]
    xb = [float(b[s]) for s in seeds]
    d = [x - y for x, y in zip(xa, xb, strict=True)]
    mean, std = mean_std(d)
    lo, hi = t_interval(d, level)
    t = p = pw = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties / small samples; the p-values are still defined
        if len(d) >= 2 and std > 1e-12 * max(abs(mean), 1e-12):  # constant differences: no t statistic
            res = stats.ttest_rel(xa, xb)
            t, p = float(res.statistic), float(res.pvalue)
        if len(d) >= 2 and any(x != 0 for x in d):
            pw = float(stats.wilcoxon(xa, xb).pvalue)
    return PairedResult(seeds, d, mean, std, lo, hi, t, p, pw)


def _rounds(rows: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if key in r and r[key] is not None]


def final_value(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    """``key`` in the last row that has it (the final round)."""
    have = _rounds(rows, key)
    if not have:
        raise KeyError(f"no round reports '{key}'")
    return float(have[-1][key])


def last_k_mean(rows: Sequence[Mapping[str, Any]], key: str, k: int = 3) -> float:
    """Mean of ``key`` over the last ``k`` rounds that report it, round 0 (the untrained model) excluded
    (fewer rounds than ``k``: all trained rounds)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    have = [r for r in _rounds(rows, key) if int(r.get("round", 1)) > 0]
    if not have:
        raise KeyError(f"no trained round reports '{key}'")
    tail = have[-k:]
    return math.fsum(float(r[key]) for r in tail) / len(tail)


def bytes_to_target(rows: Sequence[Mapping[str, Any]], key: str, target: float,
                    higher_is_better: bool = True) -> int | None:
    """``bytes_total_cum`` in the first round whose ``key`` reaches ``target`` (None: never reached).

    Reaching means ``>= target`` when higher is better, ``<= target`` otherwise (e.g. a loss).
    """
    for row in rows:
        value = row.get(key)
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return int(row.get("bytes_total_cum", 0))
    return None

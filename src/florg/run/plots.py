"""PNG plots of runs' metrics (matplotlib, Agg backend).

One figure per view, one line per row (a method, or a run), the mean over the row's seeds with a
±1 std band when a row has several seeds:

* ``<metric>_vs_round.png``: the task's primary metric (accuracy, F1, loss, ...) against the round,
  round 0 (the untrained model) included;
* ``<metric>_vs_bytes.png``: the same metric against the cumulative bytes (uplink + downlink, all
  clients) on a linear MB axis that starts at round 0 (0 MB);
* ``loss_vs_round.png``: the test loss against the round (when the primary metric is not the loss).

A row may plot another key than ``test_<metric>`` (FedSA-LoRA's headline is its personalised
accuracy, ``personal_accuracy``); its global model's ``test_<metric>`` is then drawn dashed beside it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["Series", "mean_band", "plot_rows", "plot_runs"]

Rows = Sequence[Mapping[str, Any]]


@dataclass
class Series:
    """One line of a plot: the runs (one per seed) of a row, and the key to draw."""

    label: str
    runs: list[Rows]
    key: str  # the headline key, e.g. "test_accuracy" or "personal_accuracy"
    extra_key: str | None = None  # drawn dashed beside it (e.g. a personalised row's global test metric)
    extra_label: str = ""
    style: dict[str, Any] = field(default_factory=dict)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """``(mean, sample std)`` (``n - 1``; 0 for one value): :func:`florg.study.stats.mean_std`, which the
    run layer does not import (the study layer sits above it)."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def mean_band(runs: Sequence[Rows], key: str, x_key: str = "round") -> tuple[list[float], list[float], list[float]]:
    """``(x, mean, std)`` of ``key`` over runs, per round present in every run (x: mean of ``x_key``).

    The std is the sample std (n - 1); 0 for a single run. ``x_key = "bytes_total_cum"`` gives the
    x position in bytes (0 at round 0).
    """
    if not runs:
        return [], [], []
    by_round = [{int(r["round"]): r for r in run if key in r and r[key] is not None} for run in runs]
    rounds = sorted(set.intersection(*(set(b) for b in by_round)))
    xs, means, stds = [], [], []
    for rnd in rounds:
        rows = [b[rnd] for b in by_round]
        x = [float(r.get(x_key, 0) if x_key != "round" else rnd) for r in rows]
        m, s = _mean_std([float(r[key]) for r in rows])
        xs.append(math.fsum(x) / len(x))
        means.append(m)
        stds.append(s)
    return xs, means, stds


def _draw(ax, runs: Sequence[Rows], key: str, x_key: str, label: str, scale: float, **style: Any):  # noqa: ANN001, ANN202
    xs, ys, sd = mean_band(runs, key, x_key)
    if not xs:
        return None
    xs = [x * scale for x in xs]
    (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=label, **style)
    if len(runs) > 1:
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd, strict=True)], [y + s for y, s in zip(ys, sd, strict=True)],
                        color=line.get_color(), alpha=0.15, linewidth=0)
    return line


def _figure(series: Sequence[Series], out: Path, fname: str, *, key_of, x_key: str, xlabel: str,  # noqa: ANN001
            ylabel: str, title: str, scale: float = 1.0, extras: bool = True) -> Path | None:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for s in series:
        line = _draw(ax, s.runs, key_of(s), x_key, s.label, scale, **s.style)
        drawn |= line is not None
        if extras and line is not None and s.extra_key and key_of(s) == s.key:
            _draw(ax, s.runs, s.extra_key, x_key, s.extra_label or f"{s.label} ({s.extra_key})", scale,
                  color=line.get_color(), linestyle="--")
    if not drawn:
        plt.close(fig)
        return None
    if x_key != "round":
        ax.set_xlim(left=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / fname
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rows(series: Sequence[Series], out_dir: str | Path, metric: str = "accuracy", title: str = "",
              loss_key: str | None = "test_loss") -> list[Path]:
    """The three views of :mod:`florg.run.plots` for ``series``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    band = " (mean ± std over seeds)" if any(len(s.runs) > 1 for s in series) else ""
    paths = [
        _figure(series, out, f"{metric}_vs_round.png", key_of=lambda s: s.key, x_key="round", xlabel="round",
                ylabel=f"{metric}{band}", title=title),
        _figure(series, out, f"{metric}_vs_bytes.png", key_of=lambda s: s.key, x_key="bytes_total_cum",
                xlabel="cumulative communication, MB (uplink + downlink, all clients)", ylabel=f"{metric}{band}",
                title=title, scale=1e-6),
    ]
    if loss_key and loss_key != f"test_{metric}":
        paths.append(_figure(series, out, "loss_vs_round.png", key_of=lambda s: loss_key, x_key="round",
                             xlabel="round", ylabel=f"global test loss{band}", title=title, extras=False))
    return [p for p in paths if p is not None]


def plot_runs(runs: Mapping[str, Rows], out_dir: str | Path, title: str = "", metric: str = "accuracy",
              key: str | None = None) -> list[Path]:
    """One run per label (a run directory's own plots): ``key`` (default ``test_<metric>``) against the
    round and against cumulative MB from round 0, and the test loss; a run whose rows carry
    ``personal_<metric>`` (the clients' own models) shows it dashed beside the global metric."""
    series = []
    pkey = f"personal_{metric}"
    for label, rows in runs.items():
        personal = key != pkey and any(pkey in r for r in rows)
        series.append(Series(label, [rows], key or f"test_{metric}", pkey if personal else None,
                             f"{label} (personalised)"))
    return plot_rows(series, out_dir, metric=metric, title=title)

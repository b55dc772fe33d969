"""PNG plots of a run's metrics (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_runs"]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str = "",
              metric: str = "accuracy") -> list[Path]:
    """``metric`` (the task family's primary one, ``test_<metric>`` in the rows) vs round and vs cumulative
    bytes (log x), one line per run label: ``<metric>_vs_round.png`` and ``<metric>_vs_bytes.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    key = f"test_{metric}"
    for xkey, fname, xlabel, logx in (
        ("round", f"{metric}_vs_round.png", "round", False),
        ("bytes_total_cum", f"{metric}_vs_bytes.png", "cumulative bytes (up + down)", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in runs.items():
            pts = [(r[xkey], r[key]) for r in rows if xkey in r and key in r]
            if logx:
                pts = [(x, y) for x, y in pts if x > 0]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"global test {metric.replace('_', ' ')}")
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

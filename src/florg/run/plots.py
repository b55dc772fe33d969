"""PNG plots of a run's metrics (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

__all__ = ["plot_runs"]


def plot_runs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | Path, title: str = "") -> list[Path]:
    """Accuracy vs round and accuracy vs cumulative bytes (log x), one line per run label."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for xkey, fname, xlabel, logx in (
        ("round", "accuracy_vs_round.png", "round", False),
        ("bytes_total_cum", "accuracy_vs_bytes.png", "cumulative bytes (up + down)", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, rows in runs.items():
            pts = [(r[xkey], r["test_accuracy"]) for r in rows if xkey in r and "test_accuracy" in r]
            if logx:
                pts = [(x, y) for x, y in pts if x > 0]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", markersize=3, label=label)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("global test accuracy")
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

"""Plots: mean ± std bands over seeds, the bytes axis from round 0, the single-run views."""

import math

import pytest

from florg.run.plots import Series, mean_band, plot_rows, plot_runs


def _run(accs, personal=None):
    rows = []
    for i, a in enumerate(accs):
        row = {"round": i, "test_accuracy": a, "test_loss": 2.0 - a, "bytes_total_cum": 1_500_000 * i}
        if personal is not None and i:
            row["personal_accuracy"] = personal[i]
        rows.append(row)
    return rows


def test_mean_band_over_seeds_starts_at_round_zero():
    runs = [_run([0.2, 0.6, 0.7]), _run([0.4, 0.8, 0.7])]
    xs, mean, std = mean_band(runs, "test_accuracy", "bytes_total_cum")
    assert xs == [0.0, 1_500_000.0, 3_000_000.0]  # round 0 sits at 0 bytes
    assert mean == pytest.approx([0.3, 0.7, 0.7]) and std == pytest.approx([math.sqrt(0.02), math.sqrt(0.02), 0.0])
    xs, _, _ = mean_band(runs, "test_accuracy")
    assert xs == [0.0, 1.0, 2.0]
    # only rounds every run reports (e.g. a key evaluated in some rounds only)
    sparse = [_run([0.2, 0.6, 0.7]), [{"round": 0, "test_accuracy": 0.3}, {"round": 2, "test_accuracy": 0.9}]]
    assert mean_band(sparse, "test_accuracy")[0] == [0.0, 2.0]
    assert mean_band([], "test_accuracy") == ([], [], [])


def test_plot_files(tmp_path):
    series = [Series("FLoRG", [_run([0.2, 0.6, 0.7]), _run([0.4, 0.8, 0.7])], "test_accuracy"),
              Series("FedSA-LoRA", [_run([0.2, 0.5, 0.6], [0, 0.8, 0.9])], "personal_accuracy", "test_accuracy")]
    paths = plot_rows(series, tmp_path / "a", metric="accuracy", title="t")
    assert sorted(p.name for p in paths) == ["accuracy_vs_bytes.png", "accuracy_vs_round.png", "loss_vs_round.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
    # a lower-is-better primary metric: no separate loss figure when the metric is the loss itself
    loss = plot_rows([Series("x", [_run([0.2, 0.5])], "test_loss")], tmp_path / "b", metric="loss")
    assert sorted(p.name for p in loss) == ["loss_vs_bytes.png", "loss_vs_round.png"]
    single = plot_runs({"fedsa-lora": _run([0.2, 0.5, 0.6], [0, 0.8, 0.9])}, tmp_path / "c")
    assert len(single) == 3

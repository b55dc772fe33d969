"""The embedded Flower simulation end to end on a tiny configuration (3 clients, 2 rounds)."""

import json
import math

import pytest

from florg.config import load_config
from florg.fl.simulation import run_simulation_engine
from florg.run.rundir import RunDir


def _run(tiny_overrides, tmp_path, name, extra=()):
    cfg = load_config(None, [*tiny_overrides, f"out_dir={tmp_path}", f"name={name}", *extra])
    run_dir = RunDir.create(cfg)
    summary = run_simulation_engine(cfg, run_dir, reporter=lambda row: None)
    return run_dir, summary


def _deterministic(rows):
    return [{k: v for k, v in row.items() if k != "timing"} for row in rows]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_overrides):
    tmp = tmp_path_factory.mktemp("sim")
    return _run(tiny_overrides, tmp, "a"), _run(tiny_overrides, tmp, "b")


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_run_directory_contents(two_runs):
    (run_dir, summary), _ = two_runs
    p = run_dir.path
    for name in ("config.toml", "environment.json", "status.json", "partitions.json", "metrics.jsonl", "summary.json"):
        assert (p / name).is_file(), name
    assert json.loads((p / "status.json").read_text())["status"] == "complete"
    env = json.loads((p / "environment.json").read_text())
    assert env["seed"] == 0 and env["versions"]["flwr"].startswith("1.42")
    assert (p / "plots" / "accuracy_vs_round.png").stat().st_size > 1000
    assert (p / "plots" / "accuracy_vs_bytes.png").stat().st_size > 1000
    assert (p / "adapter" / "adapter_config.json").is_file()
    assert (p / "adapter_lora" / "adapter_config.json").is_file()
    assert json.loads((p / "adapter_lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    parts = json.loads((p / "partitions.json").read_text())
    assert len(parts) == 3 and sum(x["size"] for x in parts) == 240


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_metrics_rows(two_runs):
    (run_dir, summary), _ = two_runs
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    for r in rows[1:]:
        assert r["participants"] == 3 and r["failures"] == 0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
        # Exact Gram aggregation: the aggregate carries no error beyond rounding.
        assert r["agg_rel_error_max"] < 1e-10
        assert math.isfinite(r["train_loss"])
    assert rows[2]["bytes_up_cum"] == rows[1]["bytes_up"] + rows[2]["bytes_up"]
    assert summary["bytes_total"] == rows[-1]["bytes_total_cum"]
    assert summary["accuracy_after"] == rows[-1]["test_accuracy"]


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_bytes_match_payload_sizes(two_runs):
    """Uplink per client = r*k*4 bytes per adapted layer + the head, plus small per-array headers."""
    (run_dir, _), _ = two_runs
    row = run_dir.read_metrics()[1]
    adapter_bytes_per_client = (row["bytes_up"] - row["bytes_up_head"]) / 3
    layers, r, k = 12, 4, 384  # MiniLM: 6 layers x (query, value)
    names = [f"A/bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]
    assert adapter_bytes_per_client == layers * (r * k * 4 + 128) + sum(len(n) for n in names)


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_same_seed_same_metrics(two_runs):
    (a, _), (b, _) = two_runs
    assert _deterministic(a.read_metrics()) == _deterministic(b.read_metrics())


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_bfloat16_wire(tmp_path, tiny_overrides):
    run_dir, summary = _run(tiny_overrides, tmp_path, "bf16", ["federation.wire_dtype=bfloat16"])
    row = run_dir.read_metrics()[1]
    names = [f"A/bert.encoder.layer.{i}.attention.self.{m}" for i in range(6) for m in ("query", "value")]
    per_client = (row["bytes_up"] - row["bytes_up_head"]) / 3
    assert per_client == 12 * (4 * 384 * 2 + 128 + len("#bf16")) + sum(len(n) for n in names)
    assert row["bytes_down"] == row["bytes_up"]
    assert summary["accuracy_after"] is not None and row["agg_rel_error_max"] < 1e-10

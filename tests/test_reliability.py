"""Broken, hostile and dropping clients in a real simulation (fault injection via a ClientApp mod)."""

import json
import logging

import pytest

from florg.config import load_config
from florg.fl.simulation import run_simulation_engine
from florg.rundir import RunDir

BASE = [
    "train.local_steps=2",
    "train.batch_size=8",
    "data.max_train_examples=400",
    "data.max_test_examples=60",
    "model.max_length=24",
    "federation.min_train_nodes=2",
    "federation.min_available_nodes=2",
    "data.partition=iid",
]


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(tmp_path, name, extra):
    cfg = load_config(None, BASE + [f"out_dir={tmp_path}", f"name={name}", *extra])
    cap = _Capture()
    logging.getLogger("flwr").addHandler(cap)
    try:
        run_dir = RunDir.create(cfg)
        run_simulation_engine(cfg, run_dir, reporter=lambda row: None)
    finally:
        logging.getLogger("flwr").removeHandler(cap)
    return run_dir, cap.lines


def test_invalid_replies_are_dropped_with_reasons(tmp_path):
    faults = "nan@0,inf@1,shape@2,missing@3,dtype@4,norm@5,examples@6,error@7"
    run_dir, logs = _run(tmp_path, "bad", ["data.num_clients=10", "train.rounds=2", f"federation.faults={faults}"])
    rows = run_dir.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2]
    for r in rows[1:]:
        assert r["sampled"] == 10
        assert r["participants"] == 2  # partitions 8 and 9
        assert r["rejected"] == 7
        assert r["failures"] == 1
        assert r["failed"] is False
        assert r["agg_rel_error_max"] < 1e-10
    text = "\n".join(logs)
    for needle in ("contains NaN or Inf", "shape (5, 384), expected (4, 384)", ": missing", "differs from",
                   "exceeds", "num-examples must be a positive integer", "injected failure of partition 7"):
        assert needle in text, needle
    assert "A/bert.encoder" in text  # the layer is named
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"


def test_round_with_no_valid_reply_keeps_the_global_adapter(tmp_path):
    run_dir, _ = _run(tmp_path, "allbad", ["data.num_clients=3", "train.rounds=1",
                                            "federation.faults=nan@0,error@1,shape@2"])
    r0, r1 = run_dir.read_metrics()
    assert r1["failed"] is True and r1["participants"] == 0
    assert r1["test_accuracy"] == r0["test_accuracy"] and r1["test_loss"] == r0["test_loss"]
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_dropouts_with_partial_participation(tmp_path):
    run_dir, _ = _run(tmp_path, "drop", ["data.num_clients=10", "train.rounds=3", "federation.fraction_train=0.6",
                                          "federation.min_train_nodes=4", "federation.min_available_nodes=8",
                                          "federation.faults=dropout:0.3"])
    rows = run_dir.read_metrics()[1:]
    assert len(rows) == 3
    for r in rows:
        assert r["sampled"] == 6  # 60 % of 10, above min_train_nodes = 4
        assert r["participants"] + r["failures"] == r["sampled"]
        assert r["participants"] >= 1 and r["failed"] is False
    assert sum(r["failures"] for r in rows) > 0

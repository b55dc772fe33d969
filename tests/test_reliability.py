"""Broken, hostile and dropping clients in a real simulation.

Faults are injected by the test-only ClientApp ``florg.fl.faults.app``; florg's production
ClientApp ignores ``federation.faults`` (last tests).
"""

import json
import logging

import pytest

from florg.config import load_config
from florg.fl import faults
from florg.fl.simulation import run_simulation_engine
from florg.run.rundir import RunDir

# Deviations from the tiny configuration; every run sets its own client and round counts.
RELIABILITY = ("data.max_train_examples=400", "data.max_test_examples=60", "data.partition=iid")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _run(tiny_overrides, tmp_path, name, extra, client_app=faults.app):
    cfg = load_config(None, [*tiny_overrides, *RELIABILITY, f"out_dir={tmp_path}", f"name={name}", *extra])
    cap = _Capture()
    logging.getLogger("flwr").addHandler(cap)
    try:
        run_dir = RunDir.create(cfg)
        run_simulation_engine(cfg, run_dir, reporter=lambda row: None, client_app=client_app)
    finally:
        logging.getLogger("flwr").removeHandler(cap)
    return run_dir, cap.lines


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_invalid_replies_are_dropped_with_reasons(tmp_path, tiny_overrides):
    faults = "nan@0,inf@1,shape@2,missing@3,dtype@4,norm@5,examples@6,error@7"
    run_dir, logs = _run(tiny_overrides, tmp_path, "bad",
                         ["data.num_clients=10", "train.rounds=2", f"federation.faults={faults}"])
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


@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_round_with_no_valid_reply_keeps_the_global_adapter(tmp_path, tiny_overrides):
    run_dir, _ = _run(tiny_overrides, tmp_path, "allbad", ["data.num_clients=3", "train.rounds=1",
                                                           "federation.faults=nan@0,error@1,shape@2"])
    r0, r1 = run_dir.read_metrics()
    assert r1["failed"] is True and r1["participants"] == 0
    assert r1["test_accuracy"] == r0["test_accuracy"] and r1["test_loss"] == r0["test_loss"]
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_dropouts_with_partial_participation(tmp_path, tiny_overrides):
    run_dir, _ = _run(tiny_overrides, tmp_path, "drop", ["data.num_clients=10", "train.rounds=3",
                                                         "federation.fraction_train=0.6", "federation.min_train_nodes=4",
                                                         "federation.min_available_nodes=8", "federation.faults=dropout:0.3"])
    rows = run_dir.read_metrics()[1:]
    assert len(rows) == 3
    for r in rows:
        assert r["sampled"] == 6  # 60 % of 10, above min_train_nodes = 4
        assert r["participants"] + r["failures"] == r["sampled"]
        assert r["participants"] >= 1 and r["failed"] is False
    assert sum(r["failures"] for r in rows) > 0


# ----------------------------------------------------------------- the production ClientApp ignores faults
@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_production_client_app_ignores_faults_set_by_the_server(tmp_path, tiny_overrides):
    run_dir, logs = _run(tiny_overrides, tmp_path, "prod", ["data.num_clients=3", "train.rounds=1",
                                                            "federation.faults=nan@0,error@1,shape@2"], client_app=None)
    r0, r1 = run_dir.read_metrics()
    assert (r1["sampled"], r1["participants"], r1["rejected"], r1["failures"], r1["failed"]) == (3, 3, 0, 0, False)
    assert r1["test_loss"] != r0["test_loss"]  # the round trained on every client's reply
    text = "\n".join(logs)
    assert "fault injection is off on the client" in text
    assert "injected failure" not in text and "dropped the reply" not in text


def _train_message(tiny_overrides, faults_spec):
    from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

    from florg.fl.records import CONFIG_KEY, to_record
    from florg.run.experiment import get_experiment

    cfg = load_config(None, [*tiny_overrides, *RELIABILITY, "data.num_clients=2", "train.rounds=6", "train.local_steps=1",
                             f"federation.faults={faults_spec}"])  # one message: the round count is the default
    exp = get_experiment(cfg)
    content = RecordDict({"arrays": to_record(exp.initial_state),
                          "config": ConfigRecord({"server-round": 1, "lr": 1e-3, CONFIG_KEY: cfg.to_json()})})
    msg = Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN)
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    return msg, context


def test_fault_injection_is_a_client_side_choice(flower_task, tiny_overrides):
    """The same server message: the test-only ClientApp fails as told, the production one trains and warns."""
    from florg.fl.client_app import app as production

    msg, context = _train_message(tiny_overrides, "error@0")
    with pytest.raises(faults.InjectedFault, match="partition 0"):
        faults.app(msg, context)
    cap = _Capture()
    logging.getLogger("flwr").addHandler(cap)
    try:
        reply = production(msg, context)
    finally:
        logging.getLogger("flwr").removeHandler(cap)
    assert not reply.has_error()
    assert reply.content["metrics"]["partition-id"] == 0 and reply.content["metrics"]["num-examples"] > 0
    assert len(reply.content["arrays"]) > 0
    warnings = [line for line in cap.lines if "fault injection is off on this client" in line]
    assert len(warnings) == 1 and "federation.faults=error@0" in warnings[0]

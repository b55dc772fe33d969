"""What a thousand clients need, in small: empty clients sit a round out, the partition-id query waits
long enough, and the per-client state kept between rounds stays bounded (benchmarks/bench_scale.py runs
the real thing)."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from florg.config import load_config
from florg.fl.records import CONFIG_KEY, to_record
from florg.fl.strategy import AdapterStrategy
from florg.methods import FLoRGMethod


def _train_msg(cfg, node=7, message_type=MessageType.TRAIN):
    content = RecordDict({"arrays": ArrayRecord(), "config": ConfigRecord(
        {"server-round": 1, "lr": 1e-3, CONFIG_KEY: cfg.to_json()})})
    return Message(content=content, dst_node_id=node, message_type=message_type)


class _NoDevice:
    """An experiment whose client 0 has no examples; anything past the empty check fails the test."""

    partitions = [[], [0, 1, 2]]

    def use_device(self, device):
        raise AssertionError("an empty client must not build or train its model")


@pytest.mark.parametrize("message_type", [MessageType.TRAIN, MessageType.EVALUATE])
def test_a_client_without_examples_sits_the_round_out_with_a_clear_reason(flower_task, monkeypatch, message_type):
    from florg.fl import client_app

    monkeypatch.setattr(client_app, "get_experiment", lambda cfg: _NoDevice())
    cfg = load_config(None, ["data.num_clients=2"])
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    reply = client_app.app(_train_msg(cfg, message_type=message_type), context)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith(client_app.EMPTY_CLIENT) and not reason.startswith(client_app.SETTING_ERROR)
    assert "partition 0 has no training examples" in reason and "data.max_train_examples" in reason
    assert len(context.state) == 0


def _uploads(n, k=32, r=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    current = {"A/l0": torch.randn(r, k, generator=g), "head/classifier.weight": torch.zeros(3, k)}
    ups = [{"A/l0": torch.randn(r, k, generator=g), "head/classifier.weight": torch.randn(3, k, generator=g)}
           for _ in range(n)]
    return ups, current


def _strategy(**kwargs):
    cfg = load_config(None, [])
    return AdapterStrategy(FLoRGMethod(cfg), lr_fn=lambda r: 0.1, run_config_json=cfg.to_json(),
                           min_train_nodes=1, min_available_nodes=1, **kwargs)


def _reply(node, pid, upload=None, error=None):
    ins = Message(content=RecordDict(), dst_node_id=node, message_type=MessageType.TRAIN)
    if error is not None:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=error), reply_to=ins)
    metrics = MetricRecord({"num-examples": 5, "train_loss": 1.0, "partition-id": pid})
    return Message(RecordDict({"arrays": to_record(upload), "metrics": metrics}), reply_to=ins)


def test_the_server_skips_empty_clients_and_aggregates_the_others(flower_task):
    from florg.fl.client_app import EMPTY_CLIENT

    s = _strategy()
    ups, current = _uploads(2)
    s._current = current
    replies = [_reply(11, 0, ups[0]), _reply(12, 1, error=f"{EMPTY_CLIENT}partition 1 has no training examples"),
               _reply(13, 2, ups[1])]
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    row = s.round_log.get(1)
    assert (row["participants"], row["failures"], row["rejected"], row["empty_clients"]) == (2, 0, 0, 1)
    assert not row["failed"]

    only_empty = _strategy()
    only_empty._current = current
    assert only_empty.aggregate_train(1, [_reply(12, 1, error=f"{EMPTY_CLIENT}partition 1 ...")]) == (None, None)
    row = only_empty.round_log.get(1)
    assert row["failed"] and row["empty_clients"] == 1 and row["failures"] == 0
    # no empty client, no key: the rows of ordinary runs are unchanged
    plain = _strategy()
    plain._current = current
    plain.aggregate_train(1, [_reply(11, 0, ups[0])])
    assert "empty_clients" not in plain.round_log.get(1)


class _QueryGrid:
    """A Grid that answers partition-id queries (odd nodes never do) and records each call's size and timeout."""

    def __init__(self, ids):
        self.ids, self.calls = ids, []

    def get_node_ids(self):
        return list(self.ids)

    def send_and_receive(self, msgs, timeout=None):
        msgs = list(msgs)
        self.calls.append((len(msgs), timeout))
        return [Message(RecordDict({"metrics": MetricRecord({"partition-id": self.ids[m.metadata.dst_node_id]})}),
                        reply_to=m) for m in msgs if m.metadata.dst_node_id % 2 == 0]


def test_the_partition_id_query_goes_out_in_batches_that_may_take_a_round(flower_task):
    from florg.fl.strategy import QUERY_BATCH

    ids = {n: n // 2 for n in range(150)}
    s = _strategy(round_timeout=900.0)
    grid = _QueryGrid(ids)
    pids = s._partition_ids(grid, sorted(ids))
    # 150 queries in batches (Flower's simulation scans all undelivered messages per node: quadratic in one go),
    # each allowed a round's time (was one call with a fixed 60 s: too short for 1000 nodes on 2 cores)
    assert grid.calls == [(QUERY_BATCH, 900.0), (QUERY_BATCH, 900.0), (150 - 2 * QUERY_BATCH, 900.0)]
    assert all(pids[n] == ids[n] for n in ids if n % 2 == 0) and all(pids[n] == 1 << 40 for n in ids if n % 2)
    grid.calls.clear()
    s._partition_ids(grid, sorted(ids))  # known nodes are not asked again; the silent ones are
    assert grid.calls == [(QUERY_BATCH, 900.0), (75 - QUERY_BATCH, 900.0)]
    assert _strategy(round_timeout=5.0)._partition_ids(_QueryGrid({0: 0}), [0]) == {0: 0}


def test_server_state_kept_between_rounds_does_not_grow_with_the_clients_sampled(flower_task):
    """Many rounds with fresh clients each: the strategy keeps per round a fixed-size log, and per node
    only the partition id (bounded by the number of nodes); the uploads of a round are not retained."""
    import gc
    import weakref

    s = _strategy()
    ups, current = _uploads(1)
    s._current = current
    refs = []
    for rnd in range(1, 31):
        round_ups, _ = _uploads(4, seed=rnd)
        for u in round_ups:
            refs.append(weakref.ref(u["A/l0"]))
        replies = [_reply(1000 * rnd + i, 100 * rnd + i, u) for i, u in enumerate(round_ups)]
        del round_ups, u
        arrays, _ = s.aggregate_train(rnd, replies)
        assert arrays is not None
        del replies, arrays
    gc.collect()
    assert sum(r() is not None for r in refs) == 0  # no upload tensor of any round is still alive
    assert len(s.round_log.rounds) == 30 and all(len(v) < 60 for v in s.round_log.rounds.values())
    assert s._node_partition == {}  # aggregation never adds per-node entries; only the query does


def _tiny_rounds(cfg, context, rounds=2):
    """Train partition 0 of the tiny run for ``rounds`` rounds from the initial state; the last upload."""
    from florg.fl import client_app
    from florg.fl.records import from_record
    from florg.run.experiment import get_experiment

    exp = get_experiment(cfg)
    for rnd in range(1, rounds + 1):
        msg = Message(content=RecordDict({"arrays": to_record(exp.initial_state), "config": ConfigRecord(
            {"server-round": rnd, "lr": 1e-3, CONFIG_KEY: cfg.to_json()})}), dst_node_id=7,
            message_type=MessageType.TRAIN)
        reply = client_app.app(msg, context)
        assert not reply.has_error(), reply.error.reason
    return exp, from_record(reply.content["arrays"])


def _context():
    return Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(),
                   run_config={})


def test_per_client_state_in_the_context_is_nothing_by_default(flower_task, tiny_overrides, monkeypatch):
    """Flower's simulation keeps one Context per node, all in the driver process. With
    ``train.reset_optimizer`` (the default) florg's client stores nothing there."""
    from florg.fl.client_state import STATE_DIR_ENV

    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    context = _context()
    _tiny_rounds(load_config(None, [*tiny_overrides]), context, rounds=1)
    assert len(context.state) == 0


def test_kept_optimizer_state_goes_to_disk_in_the_simulation_and_changes_nothing(flower_task, tiny_overrides,
                                                                                 monkeypatch, tmp_path):
    """With ``train.reset_optimizer=false`` each client keeps its AdamW moments between rounds: in its Context
    (a deployment) or, with FLORG_CLIENT_STATE_DIR set as the embedded simulation does, in a file per client,
    so that the driver's memory does not grow with the clients sampled. Same uploads either way."""
    from florg.fl.client_state import STATE_DIR_ENV

    cfg = load_config(None, [*tiny_overrides, "train.reset_optimizer=false"])
    monkeypatch.delenv(STATE_DIR_ENV, raising=False)
    in_memory = _context()
    exp, upload_memory = _tiny_rounds(cfg, in_memory)
    (record,) = list(in_memory.state.values())
    trainable = sum(p.numel() for p in exp.model.parameters() if p.requires_grad)
    assert record.count_bytes() < 2 * 4 * trainable * 1.1 + 4096  # the two AdamW moments, float32

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    on_disk = _context()
    _, upload_disk = _tiny_rounds(cfg, on_disk)
    assert len(on_disk.state) == 0
    assert [p.name for p in (tmp_path / "0").iterdir()] == ["florg.optimizer.safetensors"]
    assert upload_disk.keys() == upload_memory.keys()
    assert all(torch.equal(upload_disk[k], upload_memory[k]) for k in upload_memory)
    # the kept state mattered: without it round 2 differs
    monkeypatch.delenv(STATE_DIR_ENV)
    _, upload_reset = _tiny_rounds(load_config(None, [*tiny_overrides]), _context())
    assert any(not torch.equal(upload_reset[k], upload_memory[k]) for k in upload_memory)


def test_run_all_renders_the_scale_section_from_the_committed_json(tmp_path):
    """``bench_scale.py`` is too long for ``run_all.py``; run_all re-renders its section from the committed JSON,
    keeping the rest of the report."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "benchmarks" / "results" / "scale.json").is_file():
        pytest.skip("no committed benchmarks/results/scale.json")
    out = tmp_path / "RESULTS.md"
    out.write_text("# results\n\nkept text\n")
    code = f"from benchmarks.run_all import scale_section; from pathlib import Path; scale_section(Path({str(out)!r}))"
    for _ in range(2):  # the second call replaces the section
        proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# results\n\nkept text\n") and text.count("<!-- section:scale -->") == 1
    assert "## A thousand clients on one machine" in text and "What broke at 1000 clients" in text


def test_the_simulation_waits_for_every_node_before_the_first_round():
    """Flower registers the simulated nodes in a thread of its own while the ServerApp starts: with 1000 clients
    the first get_node_ids saw 928, and round 1 sampled from whichever nodes happened to be there."""
    import threading
    import time

    from florg.fl.simulation import wait_for_nodes

    class _Registering:
        def __init__(self):
            self.count = 0

        def get_node_ids(self):
            self.count = min(self.count + 7, 50)  # more nodes appear with every look
            return list(range(self.count))

    grid = _Registering()
    wait_for_nodes(grid, 50, timeout=30.0)
    assert len(grid.get_node_ids()) == 50
    t0 = time.monotonic()
    wait_for_nodes(_FixedGrid(3), 5, timeout=0.2)  # never complete: gives up after the timeout
    assert 0.2 <= time.monotonic() - t0 < 5
    stop = threading.Event()
    stop.set()
    t0 = time.monotonic()
    wait_for_nodes(_FixedGrid(3), 5, timeout=30.0, stop=stop)  # a stop request ends the wait at once
    assert time.monotonic() - t0 < 1


class _FixedGrid:
    def __init__(self, n):
        self.n = n

    def get_node_ids(self):
        return list(range(self.n))

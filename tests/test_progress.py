"""Feedback inside a round: ProgressGrid's reply reports and stop request, the live display, the log noise."""

import io
import json
import os
import subprocess
import sys
import threading
from types import SimpleNamespace

import pytest
from rich.console import Console

from florg.cli.live import LiveProgress
from florg.config import load_config
from florg.fl.progress import ProgressGrid, ReplyProgress, RunInterrupted
from florg.fl.simulation import run_simulation_engine
from florg.run.rundir import RunDir


# ------------------------------------------------------------------ ProgressGrid on a fake Grid
class _FakeGrid:
    """Push returns ids; each pull returns the next batch of replies (lists of message ids)."""

    pull_interval = 0.0

    def __init__(self, batches):
        self.batches = list(batches)
        self.pulls = 0

    def push_messages(self, messages):
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids):
        self.pulls += 1
        batch = self.batches.pop(0) if self.batches else []
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i)) for i in batch]


def _messages(n, kind="train", server_round=4):
    content = SimpleNamespace(config_records={"config": {"server-round": server_round, "lr": 0.1}})
    return [SimpleNamespace(metadata=SimpleNamespace(message_type=kind), content=content) for _ in range(n)]


def test_progress_grid_reports_each_new_reply():
    events = []
    grid = ProgressGrid(_FakeGrid([[], ["m1"], [], ["m0", "m2"]]), events.append)
    replies = grid.send_and_receive(_messages(3))
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    assert [(e.replied, e.total, e.done) for e in events] == [(0, 3, False), (1, 3, False), (3, 3, True)]
    assert {(e.kind, e.server_round) for e in events} == {("train", 4)}
    assert all(b.elapsed >= a.elapsed for a, b in zip(events, events[1:]))


def test_progress_grid_timeout_returns_what_arrived():
    events = []
    grid = ProgressGrid(_FakeGrid([["m1"]]), events.append, poll_interval=0.01)
    replies = grid.send_and_receive(_messages(2, kind="evaluate", server_round=1), timeout=0.1)
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1"]
    assert events[-1] == ReplyProgress("evaluate", 1, 1, 2, events[-1].elapsed, done=True)
    assert events[-1].elapsed >= 0.1


def test_progress_grid_stop_raises_at_the_next_poll():
    stop = threading.Event()
    fake = _FakeGrid([[], [], []])

    def on_progress(event):
        stop.set()  # asked to stop while waiting for the first replies

    grid = ProgressGrid(fake, on_progress, stop, poll_interval=0.01)
    with pytest.raises(RunInterrupted):
        grid.send_and_receive(_messages(2))
    assert fake.pulls == 0  # asked to stop before the first poll: no poll
    with pytest.raises(RunInterrupted):  # nothing more is sent once stopped
        grid.send_and_receive(_messages(2))


def test_progress_grid_without_messages_sends_nothing():
    events = []
    assert list(ProgressGrid(_FakeGrid([]), events.append).send_and_receive([])) == []
    assert events == []


# ------------------------------------------------------------------ the hook in a real (tiny) simulation
@pytest.mark.slow  # an in-process simulation (the fast lane: -m "not slow")
def test_simulation_reports_replies_and_stops_on_request(tmp_path, tiny_overrides):
    cfg = load_config(None, [*tiny_overrides, "train.rounds=3", f"out_dir={tmp_path}", "name=progress"])
    run_dir = RunDir.create(cfg)
    events, rows = [], []
    stop = threading.Event()

    def on_progress(event):
        events.append(event)
        if event.server_round == 2:
            stop.set()  # as Ctrl-C would: round 2 was sent, the run must end before it finishes

    with pytest.raises(RunInterrupted, match="florg run --resume"):
        run_simulation_engine(cfg, run_dir, reporter=rows.append, on_progress=on_progress, stop=stop)

    round1 = [e for e in events if e.kind == "train" and e.server_round == 1]
    assert round1[0].replied == 0 and not round1[0].done
    assert round1[-1].done and round1[-1].replied == round1[-1].total == 3
    counts = [e.replied for e in round1]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)  # one report per new reply count
    assert [r["round"] for r in rows] == [0, 1]
    assert json.loads((run_dir.path / "status.json").read_text())["status"] == "interrupted"
    assert [json.loads(line)["round"] for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# ------------------------------------------------------------------ the live display
def _render(live):
    out = Console(file=io.StringIO(), width=160, record=True)
    out.print(live.progress.get_renderable())
    return out.export_text()


def test_live_progress_shows_rounds_and_clients_replied():
    live = LiveProgress(Console(file=io.StringIO()), total_rounds=5, done_rounds=1)
    live.on_row({"round": 2})
    live.on_reply(ReplyProgress("train", 3, 0, 4, 0.0))
    live.on_reply(ReplyProgress("train", 3, 3, 4, 12.0))
    text = _render(live)
    assert "rounds" in text and "2/5" in text
    assert "round 3/5 training" in text and "3/4" in text and "clients replied" in text
    assert "~" not in text  # no earlier round to estimate from


def test_live_progress_estimates_a_round_from_the_previous_one():
    live = LiveProgress(Console(file=io.StringIO()), total_rounds=5)
    live.on_reply(ReplyProgress("train", 1, 0, 4, 0.0))
    live.on_reply(ReplyProgress("train", 1, 4, 4, 600.0, done=True))  # round 1 took 10 minutes
    live.on_reply(ReplyProgress("train", 2, 0, 4, 0.0))
    text = _render(live)
    assert "round 2/5 training" in text and "0/4" in text
    assert "~0:09:" in text or "~0:10:00" in text  # about 10 minutes left (minus the instant elapsed)


def test_live_progress_estimates_the_rounds_left_from_the_mean_round(monkeypatch):
    live = LiveProgress(Console(file=io.StringIO()), total_rounds=4)
    task = live.progress.tasks[0]
    for server_round, elapsed in ((0, 5.0), (1, 65.0), (2, 125.0)):  # a minute per round after round 0
        monkeypatch.setattr(type(task), "elapsed", property(lambda self, e=elapsed: e))
        live.on_row({"round": server_round})
    text = _render(live)
    assert "2/4" in text and "~0:02:00" in text  # two rounds left at a minute each


# ------------------------------------------------------------------ log noise
_NOISE = ("INFO ", "DEBUG ", "[ROUND", "Starting AdapterStrategy", "configure_train", "Started a local Ray instance")


@pytest.mark.slow
def test_default_output_is_quiet_and_verbose_shows_flower_and_ray(tmp_path, tiny_overrides):
    def run(name, *flags):
        sets = [a for s in [*tiny_overrides, "train.rounds=1", f"out_dir={tmp_path}", f"name={name}"] for a in ("--set", s)]
        return subprocess.run([sys.executable, "-m", "florg.cli.main", "run", *sets, *flags], env=dict(os.environ),
                              capture_output=True, text=True, timeout=600)

    quiet = run("quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    text = quiet.stdout + quiet.stderr
    assert "round   1/1" in text
    assert not [marker for marker in _NOISE if marker in text], text[-3000:]

    loud = run("loud", "--verbose", "--progress")
    assert loud.returncode == 0, loud.stderr[-3000:]
    text = loud.stdout + loud.stderr
    assert "[ROUND 1/1]" in text and "configure_train" in text  # Flower's INFO log
    assert "Initialising: RayBackend" in text  # Flower's DEBUG log of the Ray backend
    assert "Started a local Ray instance" in text  # Ray's own INFO log

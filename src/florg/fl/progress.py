"""Feedback inside a round and a clean stop: a Grid wrapper that reports replies as they arrive.

Flower's ``Grid.send_and_receive`` pushes a round's messages and returns only when every reply is
in (or the round's timeout has passed), so a round is silent until it ends. :class:`ProgressGrid`
wraps any Grid (the simulation's in-memory one, a deployment's) and implements
``send_and_receive`` with the Grid's own ``push_messages`` / ``pull_messages``, calling
``on_progress`` with a :class:`ReplyProgress` once the messages are out and again whenever new
replies arrive. It also watches a ``stop`` event: once it is set, the next poll raises
:class:`RunInterrupted` in the ServerApp, so a run stops between two polls rather than after the
round.

Any strategy works unchanged on top of it (the strategy only sees a Grid); florg's ServerApp
wraps its Grid in one when ``florg run`` shows progress or can be interrupted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO

from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

__all__ = ["ProgressGrid", "ReplyProgress", "RunInterrupted", "log_progress"]


class RunInterrupted(Exception):
    """The run was asked to stop (Ctrl-C or SIGTERM); ``status.json`` says ``interrupted``."""


@dataclass(frozen=True)
class ReplyProgress:
    """Where one exchange of messages stands.

    ``kind`` is the message type (``train``, ``evaluate``, ``query``); ``server_round`` the run's
    round from the messages' config (``server-round``), when they carry one; ``replied`` of
    ``total`` nodes have answered (an error reply counts as an answer); ``elapsed`` seconds since
    the messages were pushed; ``done`` is true for the last report of the exchange (all replied or
    the timeout passed).
    """

    kind: str
    server_round: int | None
    replied: int
    total: int
    elapsed: float
    done: bool = False


ProgressFn = Callable[[ReplyProgress], None]


def _round_of(message: Message) -> int | None:
    for record in message.content.config_records.values():
        if "server-round" in record:
            return int(record["server-round"])
    return None


class ProgressGrid(Grid):
    """A Grid that reports replies as they arrive and stops when ``stop`` is set.

    Parameters
    ----------
    grid : Grid
        The Grid to wrap; every other call goes to it unchanged.
    on_progress : callable, optional
        Receives a :class:`ReplyProgress` after the push (``replied=0``) and after each poll
        that brought new replies. It runs on the ServerApp's thread: keep it quick.
    stop : threading.Event, optional
        Once set, ``send_and_receive`` raises :class:`RunInterrupted` at its next poll.
    poll_interval : float
        Seconds between two pulls (default: the wrapped Grid's ``pull_interval``, else 0.25 s).
    """

    def __init__(self, grid: Grid, on_progress: ProgressFn | None = None, stop: threading.Event | None = None,
                 poll_interval: float | None = None) -> None:
        self.grid = grid
        self.on_progress = on_progress
        self.stop = stop
        self.poll_interval = float(poll_interval if poll_interval is not None
                                   else getattr(grid, "pull_interval", 0.25))

    # ------------------------------------------------------------------ delegated
    def set_run(self, run) -> None:  # noqa: ANN001 - flwr's Run
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - flwr's Run
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201 - flwr's NodeInfo iterable
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self.check_stop()
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    # ------------------------------------------------------------------ progress + stop
    def check_stop(self) -> None:
        """Raise :class:`RunInterrupted` when the stop event is set."""
        if self.stop is not None and self.stop.is_set():
            raise RunInterrupted("the run was interrupted")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.check_stop()
        if not messages:
            return []
        kind = str(messages[0].metadata.message_type).split(".")[0]
        server_round = _round_of(messages[0])
        pending = set(self.grid.push_messages(messages))
        total = len(pending)
        del messages
        t0 = time.monotonic()
        replies: list[Message] = []

        def report(done: bool = False) -> None:
            if self.on_progress is not None:
                self.on_progress(ReplyProgress(kind, server_round, len(replies), total, time.monotonic() - t0, done))

        report()
        while True:
            self.check_stop()
            got = list(self.grid.pull_messages(pending))
            if got:
                replies.extend(got)
                pending.difference_update(m.metadata.reply_to_message_id for m in got)
            timed_out = timeout is not None and time.monotonic() - t0 >= timeout
            if not pending or timed_out:
                report(done=True)
                return replies
            if got:
                report()
            if self.stop is not None:
                self.stop.wait(self.poll_interval)
            else:
                time.sleep(self.poll_interval)


def log_progress(event: ReplyProgress) -> None:
    """A ``on_progress`` that logs each report at INFO (for deployments, where there is no terminal)."""
    where = f"round {event.server_round}: " if event.server_round is not None else ""
    log(INFO, "%s%s: %d/%d clients replied (%.1f s)", where, event.kind, event.replied, event.total, event.elapsed)

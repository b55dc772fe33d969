"""The live progress display of ``florg run``: rounds done of all, and inside a round the clients that replied.

Two rich progress bars under the per-round lines: ``rounds`` (i/R, elapsed, estimated time
left) and the current exchange (``round i/R training``: m/N clients replied, elapsed,
estimated time left: rich's estimate from the replies so far or, before the first reply, the
previous round's duration minus the time elapsed, marked ``~``). They are fed by
:class:`florg.fl.progress.ReplyProgress` events (from the ServerApp's thread) and by the
metrics rows of the run's reporter.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from florg.fl.progress import ReplyProgress

__all__ = ["LiveProgress"]

class _TimeLeft(TimeRemainingColumn):
    """Time left: ``expected`` (seconds from the task's start) minus elapsed, where rich has no estimate yet
    (before a round's first reply) or the task prefers it (``rounds``: the mean round time so far)."""

    def render(self, task: Task) -> Text:
        expected = task.fields.get("expected")
        prefer = task.fields.get("prefer_expected", False)
        if (prefer or task.time_remaining is None) and expected is not None and not task.finished:
            left = max(expected - (task.elapsed or 0.0), 0.0)
            minutes, seconds = divmod(int(left), 60)
            hours, minutes = divmod(minutes, 60)
            return Text(f"~{hours:d}:{minutes:02d}:{seconds:02d}", style="progress.remaining")
        return super().render(task)


_KIND = {"train": "training", "evaluate": "client evaluation", "query": "asking partition ids"}


class LiveProgress:
    """Context manager: the live display while it is open; :meth:`on_reply` and :meth:`on_row` feed it."""

    def __init__(self, console: Console, total_rounds: int, done_rounds: int = 0) -> None:
        self.total_rounds = total_rounds
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            _TimeLeft(),
            console=console,
            transient=True,
            speed_estimate_period=24 * 3600.0,  # rounds can take minutes: estimate from the whole run
        )
        self.rounds: TaskID = self.progress.add_task("rounds", total=total_rounds, completed=done_rounds,
                                                     unit="rounds", expected=None, prefer_expected=True)
        self._first_row: tuple[int, float] | None = None  # (round, elapsed) of the first row seen
        self.clients: TaskID | None = None
        self.durations: dict[str, float] = {}  # the last complete exchange of each kind: the next one's estimate

    def __enter__(self) -> LiveProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def on_reply(self, event: ReplyProgress) -> None:
        """A :class:`ReplyProgress` from the ServerApp: m/N clients replied in the current exchange."""
        where = f"round {event.server_round}/{self.total_rounds} " if event.server_round is not None else ""
        description = f"{where}{_KIND.get(event.kind, event.kind)}"
        expected = self.durations.get(event.kind)
        if self.clients is None:
            self.clients = self.progress.add_task(description, total=event.total, unit="clients replied",
                                                  expected=expected)
        if event.replied == 0 and not event.done:  # a new exchange: restart the clock and the estimate
            self.progress.reset(self.clients, total=event.total, completed=0, description=description,
                                unit="clients replied", expected=expected)  # (reset replaces all fields)
        else:
            self.progress.update(self.clients, total=event.total, completed=event.replied, description=description)
        if event.done and event.replied == event.total:
            self.durations[event.kind] = event.elapsed

    def on_row(self, row: dict[str, Any]) -> None:
        """A round's metrics row: that round is done."""
        server_round = int(row["round"])
        elapsed = next(t for t in self.progress.tasks if t.id == self.rounds).elapsed or 0.0
        expected = None
        if self._first_row is None:
            self._first_row = (server_round, elapsed)
        elif server_round > self._first_row[0]:  # rounds left x the mean round time since the first row
            per_round = (elapsed - self._first_row[1]) / (server_round - self._first_row[0])
            expected = elapsed + per_round * (self.total_rounds - server_round)
        self.progress.update(self.rounds, completed=server_round, expected=expected)

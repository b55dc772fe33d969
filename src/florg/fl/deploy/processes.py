"""Processes of a local deployment: free ports, the process environment, pids and process trees.

Everything here identifies processes by pid and kernel start time (``/proc`` on Linux, ``ps``
elsewhere), so that a reused pid is never signalled.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from florg.env import OFFLINE_ENV

__all__ = ["BASE_ENV", "deployment_env", "find_free_port", "find_free_ports", "pid_alive"]

#: Environment every process of a florg deployment gets.
BASE_ENV = {**OFFLINE_ENV, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------------- ports
def find_free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now (the OS picks them)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def find_free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now."""
    return find_free_ports(1, host)[0]


def _port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------------------- processes
def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state, ppid, ...), or None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (guards against signalling a reused pid)."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie, i.e. exited but not yet reaped, counts as gone)."""
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[0] != "Z"
    if Path("/proc/self").exists():
        return False
    try:  # no /proc (macOS): signal 0 only checks existence
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids of all processes visible now."""
    children: dict[int, list[int]] = {}
    if Path("/proc/self").exists():
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (fields := _proc_stat(int(entry.name))) is not None:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
        return children
    try:  # no /proc: ask ps
        out = subprocess.run(["ps", "-A", "-o", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return children
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    return children


def _descendants(roots: Sequence[int]) -> list[int]:
    """All live descendants of ``roots`` (children, grandchildren, ...), roots excluded."""
    children = _children_map()
    found: list[int] = []
    todo = list(roots)
    while todo and len(found) < 10_000:
        for child in children.get(todo.pop(), []):
            if child not in found and child not in roots:
                found.append(child)
                todo.append(child)
    return found


def _session_members(sessions: Mapping[int, str]) -> list[int]:
    """Live processes in the sessions ``sid -> start time of the session leader`` (Linux only).

    Only processes that started no earlier than the leader count; together with the caller's
    check that the leader's pid was not reused, this keeps unrelated sessions out.
    """
    found: list[int] = []
    if not sessions or not Path("/proc/self").exists():
        return found
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields is None or len(fields) <= 19 or fields[0] == "Z" or not fields[3].isdigit():
            continue
        leader_start = sessions.get(int(fields[3]))
        if leader_start is not None and int(fields[19]) >= int(leader_start):
            found.append(int(entry.name))
    return found


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    log_fh: IO[bytes]
    start_time: str | None = None


def deployment_env(flwr_home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for one deployment process: ``os.environ`` + :data:`BASE_ENV` + ``FLWR_HOME``.

    The folder of the running Python is put first on ``PATH``: Flower starts its helper
    commands (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) through ``PATH``.
    """
    env = dict(os.environ)
    env.update(BASE_ENV)
    env["FLWR_HOME"] = str(Path(flwr_home).resolve())
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env



def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass

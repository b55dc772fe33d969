"""Start a local multi-process Flower deployment: one SuperLink, N SuperNodes, then ``flwr run``.

This is the deployment runtime (the same ServerApp and ClientApp as the simulation, but every
piece is its own process talking over the network), on one machine and on loopback ports. It is
meant for integration tests and for trying a deployment before spreading it over machines::

    from florg.fl.deploy import LocalDeployment

    with LocalDeployment("work", num_supernodes=2) as dep:
        result = dep.run(overrides=["data.num_clients=2", "train.rounds=2"], run_dir="work/run")
        print(result.status)              # "finished:completed"

or from a shell: ``python -m florg.fl.deploy --supernodes 2 --workdir work -- train.rounds=2``.

Every process gets free loopback ports, its own ``FLWR_HOME`` under the work folder and a log
file in ``<workdir>/logs``. Runtime dependency installation and Flower's update check are turned
off, and the Hugging Face offline flags are set. Leaving the ``with`` block (also on errors or
Ctrl-C) stops exactly the processes this object started, and the helper processes they spawned
(SuperExec, ServerApp, ClientApp), by process id. TLS is used when ``tls`` is given
(see ``scripts/make_certs.sh``); without it the deployment runs with ``--insecure``, which is
for testing only.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "APP_DIR",
    "DeploymentError",
    "LocalDeployment",
    "RunResult",
    "TLSFiles",
    "deployment_env",
    "find_free_port",
    "find_free_ports",
    "pid_alive",
]

#: The Flower App folder shipped with florg (its components are florg's ServerApp/ClientApp).
APP_DIR = Path(__file__).resolve().parent / "app"

#: Environment every process of a florg deployment gets.
BASE_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

_SUPERNODE_READY = "SuperNode ID"  # logged once a SuperNode is registered with the SuperLink
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """A process did not start, did not become ready in time, or a CLI call failed."""


@dataclass(frozen=True)
class TLSFiles:
    """Certificate files for a TLS deployment (``scripts/make_certs.sh`` writes all three)."""

    ca_cert: Path  #: CA certificate that signed the server certificate (clients trust it)
    server_cert: Path  #: the SuperLink's certificate (SANs must cover the address used)
    server_key: Path  #: the SuperLink's private key

    @classmethod
    def from_dir(cls, folder: str | Path) -> TLSFiles:
        """``ca.crt``, ``server.pem`` and ``server.key`` in ``folder``."""
        folder = Path(folder).resolve()
        files = cls(folder / "ca.crt", folder / "server.pem", folder / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"missing certificate files: {', '.join(missing)} (run scripts/make_certs.sh)")
        return files


@dataclass
class RunResult:
    """What ``flwr run`` returned and the final status of the run on the SuperLink."""

    returncode: int
    run_id: int | None
    status: str | None  #: e.g. "finished:completed", "finished:failed"
    output: str  #: the streamed output of ``flwr run`` (also in ``log``)
    log: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and bool(self.status) and self.status.endswith("completed")


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid TOML basic string


class LocalDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes as separate processes on loopback ports.

    Parameters
    ----------
    workdir : folder for the FLWR_HOMEs (``flwr/<component>``), the logs (``logs/``) and the
        run config files; it is also the working directory of every process, so relative run
        directories (``out_dir=runs``) end up in it.
    num_supernodes : number of SuperNodes; SuperNode ``i`` gets the node config
        ``partition-id=i num-partitions=<num_supernodes>`` unless ``node_configs`` is given.
    tls : certificate files; ``None`` runs everything with ``--insecure`` (testing only).
    ready_timeout : seconds to wait for the SuperLink and for each SuperNode to become ready.
    stop_timeout : seconds to wait after SIGTERM before SIGKILL.
    env : extra environment variables for all processes.
    """

    def __init__(
        self,
        workdir: str | Path,
        num_supernodes: int = 2,
        *,
        tls: TLSFiles | None = None,
        node_configs: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        connection_name: str = "florg-local",
        ready_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError("num_supernodes must be >= 1")
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError("node_configs needs one entry per SuperNode")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.tls = tls
        self.node_configs = list(node_configs) if node_configs is not None else [
            f"partition-id={i} num-partitions={num_supernodes}" for i in range(num_supernodes)
        ]
        self.host = host
        self.connection_name = connection_name
        self.ready_timeout = float(ready_timeout)
        self.stop_timeout = float(stop_timeout)
        self.extra_env = dict(env or {})
        self.log_dir = self.workdir / "logs"
        self.flwr_home = self.workdir / "flwr" / "cli"  #: FLWR_HOME of the flwr CLI (config.toml)
        self.superlink_port: int | None = None
        self.supernode_ports: list[int] = []
        self._procs: list[_Proc] = []
        self._helpers: dict[int, str | None] = {}  # descendants seen (pid -> start time)
        self._flwr_calls = 0

    # -------------------------------------------------------------------------- public
    @property
    def address(self) -> str:
        """The SuperLink address (Fleet, Control and Runtime API share it in Flower 1.42)."""
        if self.superlink_port is None:
            raise DeploymentError("the deployment is not started")
        return f"{self.host}:{self.superlink_port}"

    @property
    def pids(self) -> list[int]:
        """PIDs of the processes started directly (SuperLink first, then the SuperNodes)."""
        return [p.popen.pid for p in self._procs]

    def all_pids(self) -> list[int]:
        """Started PIDs plus the helper processes (SuperExec, ServerApp, ClientApp) seen so far."""
        self._note_helpers()
        return self.pids + [pid for pid in self._helpers if pid not in self.pids]

    def logs(self) -> dict[str, Path]:
        """Log file of every process started so far, by name."""
        return {p.name: p.log for p in self._procs}

    def __enter__(self) -> LocalDeployment:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, wait until it listens, start the SuperNodes, wait until registered.

        On any failure (or Ctrl-C) the processes started so far are stopped before re-raising.
        """
        if self._procs:
            raise DeploymentError("this LocalDeployment was already started (use a new one)")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        self._start_superlink()
        self._write_cli_config()
        ports = find_free_ports(self.num_supernodes, self.host)
        for i, port in enumerate(ports):
            self._start_supernode(i, port)
        deadline = time.monotonic() + self.ready_timeout
        for i, port in enumerate(self.supernode_ports):
            proc = self._procs[1 + i]

            def ready(p: int = port, pr: _Proc = proc) -> bool:
                return _port_open(self.host, p) and self._log_has(pr, _SUPERNODE_READY)

            self._wait(proc, deadline, ready)
        self._note_helpers()

    def run(
        self,
        app_dir: str | Path | None = None,
        *,
        overrides: Sequence[str] | str | None = None,
        run_dir: str | Path | None = None,
        config_file: str | Path | None = None,
        run_config: Mapping[str, Any] | None = None,
        timeout: float = 600.0,
        echo: bool = False,
    ) -> RunResult:
        """``flwr run <app_dir> <connection> --stream`` and the run's final status.

        ``overrides`` (florg ``key=value`` settings), ``run_dir`` and ``config_file`` fill the
        florg app's run config keys ``overrides``, ``run-dir`` and ``config-file``; ``run_config``
        sets any other key of the app's ``[tool.flwr.app.config]``. ``echo`` copies the streamed
        output to stdout. Raises :class:`DeploymentError` when ``flwr run`` exceeds ``timeout``.
        """
        if not self._procs:
            raise DeploymentError("start the deployment first")
        rc: dict[str, Any] = dict(run_config or {})
        if overrides is not None:
            rc["overrides"] = overrides if isinstance(overrides, str) else shlex.join(overrides)
        if run_dir is not None:
            rc["run-dir"] = str(Path(run_dir).resolve())
        if config_file is not None:
            rc["config-file"] = str(Path(config_file).resolve())
        self._flwr_calls += 1
        cmd = [self._bin("flwr"), "run", str(Path(app_dir or APP_DIR).resolve()), self.connection_name, "--stream"]
        if rc:
            rc_file = self.workdir / f"run-config-{self._flwr_calls}.toml"
            rc_file.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in rc.items()))
            cmd += ["--run-config", str(rc_file)]
        log = self.log_dir / f"flwr-run-{self._flwr_calls}.log"
        returncode, output = self._run_cli(cmd, log, timeout, echo)
        match = _RUN_ID.search(output)
        run_id = int(match.group(1)) if match else None
        status = self.run_status(run_id) if run_id is not None else None
        return RunResult(returncode, run_id, status, output, log)

    def run_status(self, run_id: int, timeout: float = 30.0) -> str | None:
        """Status of ``run_id`` from ``flwr list`` (waits, bounded, until it is ``finished:*``)."""
        deadline = time.monotonic() + timeout
        status = None
        for _ in range(30):
            log = self.log_dir / "flwr-list.log"
            cmd = [self._bin("flwr"), "list", self.connection_name, "--run-id", str(run_id), "--format", "json"]
            _, output = self._run_cli(cmd, log, max(1.0, deadline - time.monotonic()), False)
            try:
                runs = json.loads(output[output.index("{"):]).get("runs", [])
                status = str(runs[0]["status"]) if runs else None
            except (ValueError, KeyError, IndexError):
                status = None
            if (status or "").startswith("finished") or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        return status

    def stop(self) -> None:
        """Stop every process started here and the helpers they spawned, by PID; bounded in time.

        SIGTERM to each started process group and each known helper, then SIGKILL to whatever
        is still alive after ``stop_timeout`` seconds. Safe to call more than once.
        """
        self._note_helpers()
        targets = {pid: st for pid, st in self._helpers.items()}
        for proc in self._procs:
            targets[proc.popen.pid] = proc.start_time
        own = {p.popen.pid: p for p in self._procs}

        def signal_all(sig: int) -> None:
            for pid, st in targets.items():
                if pid in own:
                    if own[pid].popen.poll() is None:
                        _killpg(pid, sig)  # started with its own session: pgid == pid
                elif pid_alive(pid) and _start_time(pid) == st:
                    _kill(pid, sig)

        signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline and any(self._alive(pid, st, own) for pid, st in targets.items()):
            time.sleep(0.1)
        if any(self._alive(pid, st, own) for pid, st in targets.items()):
            signal_all(signal.SIGKILL)
        for proc in self._procs:
            try:
                proc.popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
            proc.log_fh.close()
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(self._alive(pid, st, own) for pid, st in targets.items()):
            time.sleep(0.1)

    # ------------------------------------------------------------------------- internals
    def _bin(self, name: str) -> str:
        path = Path(sys.executable).parent / name
        return str(path) if path.exists() else name

    def _env(self, component: str) -> dict[str, str]:
        home = self.workdir / "flwr" / component
        home.mkdir(parents=True, exist_ok=True)
        return deployment_env(home, self.extra_env)

    def _spawn(self, name: str, cmd: list[str], component: str) -> _Proc:
        log = self.log_dir / f"{name}.log"
        fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        try:
            popen = subprocess.Popen(
                cmd, cwd=self.workdir, env=self._env(component), stdin=subprocess.DEVNULL,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True,
            )
        except BaseException:
            fh.close()
            raise
        proc = _Proc(name, popen, log, fh, _start_time(popen.pid))
        self._procs.append(proc)
        return proc

    def _start_superlink(self, attempts: int = 3) -> None:
        """Start the SuperLink on a free port; retry on a new port if that port was taken meanwhile."""
        for attempt in range(attempts):
            port = find_free_port(self.host)
            cmd = [self._bin("flower-superlink"), "--host", self.host, "--port", str(port),
                   "--disable-runtime-dependency-installation"]
            if self.tls is None:
                cmd.append("--insecure")
            else:
                cmd += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                        "--ssl-keyfile", str(self.tls.server_key)]
            proc = self._spawn("superlink", cmd, "superlink")
            deadline = time.monotonic() + self.ready_timeout
            try:
                self._wait(proc, deadline, lambda p=port: _port_open(self.host, p))
            except DeploymentError:
                port_taken = "address already in use" in _tail(proc.log).lower()
                if proc.popen.poll() is None or not port_taken or attempt == attempts - 1:
                    raise
                proc.log_fh.close()
                self._procs.remove(proc)  # the port was taken between choosing and binding it: try again
                continue
            self.superlink_port = port
            return

    def _start_supernode(self, index: int, port: int) -> None:
        cmd = [self._bin("flower-supernode"), "--superlink", self.address, "--host", self.host,
               "--port", str(port), "--node-config", self.node_configs[index]]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.tls.ca_cert)]
        self._spawn(f"supernode-{index}", cmd, f"supernode-{index}")
        self.supernode_ports.append(port)

    def _write_cli_config(self) -> None:
        """``$FLWR_HOME/config.toml`` of the flwr CLI with this deployment as the default connection."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        name = self.connection_name
        lines = ["[superlink]", f"default = {_toml_value(name)}", "", f"[superlink.{name}]",
                 f"address = {_toml_value(self.address)}"]
        if self.tls is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {_toml_value(str(Path(self.tls.ca_cert).resolve()))}")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def _run_cli(self, cmd: list[str], log: Path, timeout: float, echo: bool) -> tuple[int, str]:
        """Run a flwr CLI command with the CLI's FLWR_HOME; output to ``log`` (and stdout if echo)."""
        chunks: list[str] = []
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"$ {shlex.join(cmd)}\n")
            popen = subprocess.Popen(
                cmd, cwd=self.workdir, env=deployment_env(self.flwr_home, self.extra_env),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", start_new_session=True,
            )

            def pump() -> None:
                assert popen.stdout is not None
                for line in popen.stdout:
                    chunks.append(line)
                    fh.write(line)
                    fh.flush()
                    if echo:
                        sys.stdout.write(line)
                        sys.stdout.flush()

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _killpg(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
                what = " ".join(Path(cmd[0]).name if i == 0 else c for i, c in enumerate(cmd[:2]))
                raise DeploymentError(f"'{what}' did not finish within {timeout:.0f} s; see {log}") from None
            finally:
                reader.join(timeout=10)
        return popen.returncode, "".join(chunks)

    def _wait(self, proc: _Proc, deadline: float, ready: Callable[[], bool]) -> None:
        """Poll ``ready()`` until true; fail if the process exits or the deadline passes."""
        while True:
            if proc.popen.poll() is not None:
                raise DeploymentError(
                    f"{proc.name} exited with code {proc.popen.returncode} while starting; log {proc.log}:\n"
                    + _tail(proc.log)
                )
            if ready():
                return
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"{proc.name} not ready after {self.ready_timeout:.0f} s; log {proc.log}:\n" + _tail(proc.log)
                )
            time.sleep(0.2)

    @staticmethod
    def _log_has(proc: _Proc, text: str) -> bool:
        try:
            return text in proc.log.read_text(errors="replace")
        except OSError:
            return False

    def _note_helpers(self) -> None:
        """Remember the live descendants of the started processes (they may be re-parented later)."""
        roots = [p.popen.pid for p in self._procs if p.popen.poll() is None]
        if roots:
            for pid in _descendants(roots):
                self._helpers.setdefault(pid, _start_time(pid))

    @staticmethod
    def _alive(pid: int, start_time: str | None, own: Mapping[int, _Proc]) -> bool:
        if pid in own:
            return own[pid].popen.poll() is None
        return pid_alive(pid) and _start_time(pid) == start_time


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


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ------------------------------------------------------------------------------------ CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m florg.fl.deploy [options] [-- key=value ...]``: one local deployment run."""
    parser = argparse.ArgumentParser(
        prog="python -m florg.fl.deploy",
        description="Run florg on a local Flower deployment (SuperLink + SuperNodes as processes).",
    )
    parser.add_argument("overrides", nargs="*", help="florg config overrides key=value")
    parser.add_argument("--supernodes", type=int, default=2,
                        help="number of SuperNodes (default 2); data.num_clients is set to match "
                        "unless an override sets it")
    parser.add_argument("--workdir", default="deployment", help="logs, FLWR_HOMEs (default ./deployment)")
    parser.add_argument("--config", default=None, help="florg TOML config file")
    parser.add_argument("--run-dir", default=None, help="run directory (default <workdir>/run-<time>)")
    parser.add_argument("--tls-dir", default=None, help="folder from scripts/make_certs.sh; default: insecure")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir).resolve()
    run_dir = args.run_dir or str(workdir / time.strftime("run-%Y%m%d-%H%M%S"))
    overrides = list(args.overrides)
    if not any(o.startswith("data.num_clients=") for o in overrides):
        overrides.append(f"data.num_clients={args.supernodes}")
    tls = TLSFiles.from_dir(args.tls_dir) if args.tls_dir else None
    with LocalDeployment(workdir, args.supernodes, tls=tls) as dep:
        print(f"SuperLink at {dep.address}, {args.supernodes} SuperNodes; logs in {dep.log_dir}", flush=True)
        result = dep.run(overrides=overrides, run_dir=run_dir, config_file=args.config, timeout=args.timeout, echo=True)
    print(f"run {result.run_id}: {result.status}; run directory {run_dir}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

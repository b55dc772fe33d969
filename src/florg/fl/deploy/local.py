"""``LocalDeployment``: a SuperLink and N SuperNodes as processes on loopback ports, then ``flwr run``."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .credentials import NodeKey, TLSFiles, make_node_keys, make_throwaway_certs
from .processes import (
    _descendants,
    _kill,
    _killpg,
    _port_open,
    _Proc,
    _session_members,
    _start_time,
    deployment_env,
    find_free_port,
    find_free_ports,
    pid_alive,
)

__all__ = ["APP_DIR", "DeploymentError", "LocalDeployment", "RunResult"]

#: The Flower App folder shipped with florg (its components are florg's ServerApp/ClientApp).
APP_DIR = Path(__file__).resolve().parents[1] / "app"

_SUPERNODE_READY = "SuperNode ID"  # logged once a SuperNode is registered with the SuperLink
_SUPERNODE_REFUSED = "Failed to initialize the connection to the SuperLink"  # logged when a SuperNode gives up
_RUN_ID = re.compile(r"Successfully started run (\d+)")


class DeploymentError(RuntimeError):
    """A process did not start, did not become ready in time, or a CLI call failed."""


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
    tls : certificate files (``scripts/make_certs.sh``, :meth:`TLSFiles.from_dir`); ``None``
        creates a throwaway CA and server certificate in ``<workdir>/throwaway-certs`` at start.
    insecure : run without TLS (``--insecure`` everywhere). Testing only; it must be asked for
        explicitly and cannot be combined with ``tls`` or ``supernode_auth``.
    supernode_auth : start the SuperLink with ``--enable-supernode-auth``, register the public
        key of every SuperNode with ``flwr supernode register`` before it starts, and start each
        SuperNode with ``--auth-supernode-private-key``. Needs TLS (Flower refuses it otherwise).
    node_keys : one :class:`NodeKey` per SuperNode (``supernode_auth`` only); ``None`` creates
        throwaway keys in ``<workdir>/throwaway-keys`` at start.
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
        insecure: bool = False,
        supernode_auth: bool = False,
        node_keys: Sequence[NodeKey] | None = None,
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
        if insecure and tls is not None:
            raise ValueError("insecure=True runs without TLS: do not pass tls as well")
        if insecure and supernode_auth:
            raise ValueError("SuperNode authentication needs TLS: it cannot be combined with insecure=True")
        if node_keys is not None and not supernode_auth:
            raise ValueError("node_keys are only used with supernode_auth=True")
        if node_keys is not None and len(node_keys) != num_supernodes:
            raise ValueError("node_keys needs one key per SuperNode")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.tls = tls  #: certificate files (set at start when throwaway ones are created)
        self.insecure = bool(insecure)
        self.supernode_auth = bool(supernode_auth)
        self.node_keys: list[NodeKey] = list(node_keys or [])  #: keys of the SuperNodes (auth only)
        self.registered: dict[str, int] = {}  #: public key file -> node id from ``flwr supernode register``
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
        self._prepare_credentials()
        self._start_superlink()
        self._write_cli_config()
        if self.supernode_auth:
            self._register_all([key.public_key for key in self.node_keys])
        ports = find_free_ports(self.num_supernodes, self.host)
        started = [self._start_supernode(f"supernode-{i}", port, self.node_configs[i],
                                         self.node_keys[i] if self.supernode_auth else None)
                   for i, port in enumerate(ports)]
        deadline = time.monotonic() + self.ready_timeout
        for proc, port in zip(started, ports):
            self._wait_supernode(proc, port, deadline)
        self._note_helpers()

    def _prepare_credentials(self) -> None:
        """Throwaway certificates (unless insecure or given) and SuperNode keys (auth, unless given)."""
        if not self.insecure and self.tls is None:
            extra = [] if self.host in ("127.0.0.1", "localhost", "::1") else [self.host]
            self.tls = make_throwaway_certs(self.workdir / "throwaway-certs", extra_sans=extra)
        if self.supernode_auth and not self.node_keys:
            names = [f"supernode-{i}" for i in range(self.num_supernodes)]
            self.node_keys = make_node_keys(self.workdir / "throwaway-keys", names, overwrite=True)

    def register_supernode(self, public_key: str | Path, timeout: float = 60.0) -> int:
        """``flwr supernode register <public_key>``: allow the SuperNode with that key; its node id.

        Only meaningful with ``supernode_auth``: the SuperLink then accepts a SuperNode only if
        its public key was registered before it connects.
        """
        if self.superlink_port is None:
            raise DeploymentError("start the deployment first")
        public_key = Path(public_key).resolve()
        log = self.log_dir / f"flwr-supernode-register-{public_key.name.removesuffix('.pub')}.log"
        cmd = [self._bin("flwr"), "supernode", "register", str(public_key), self.connection_name, "--format", "json"]
        returncode, output = self._run_cli(cmd, log, timeout, False)
        reply = _last_json(output)
        node_id = reply.get("node-id") if reply else None
        if returncode != 0 or not reply or not reply.get("success") or node_id is None:
            raise DeploymentError(f"could not register SuperNode key {public_key} (rc={returncode}); log {log}:\n"
                                  + _tail(log))
        self.registered[str(public_key)] = int(node_id)
        return int(node_id)

    def _register_all(self, public_keys: Sequence[Path]) -> None:
        """Register the keys concurrently (each ``flwr`` call spends most of its time starting up)."""
        errors: list[BaseException] = []

        def register(key: Path) -> None:
            try:
                self.register_supernode(key)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=register, args=(key,), daemon=True) for key in public_keys]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def add_supernode(
        self,
        node_config: str,
        *,
        auth_key: NodeKey | None = None,
        register: bool = False,
        wait: bool = True,
        name: str | None = None,
    ) -> str:
        """Start one more SuperNode (same SuperLink, TLS settings and clean-up); its process name.

        ``auth_key`` is passed as ``--auth-supernode-private-key``; ``register`` registers its
        public key first. ``wait=False`` returns right after starting the process, e.g. for a
        SuperNode that the SuperLink is expected to refuse (see :meth:`wait_for_exit`).
        """
        if self.superlink_port is None:
            raise DeploymentError("start the deployment first")
        name = name or f"supernode-{len(self._procs) - 1}"
        if name in self.logs():
            raise ValueError(f"a process named {name!r} exists already")
        if register:
            if auth_key is None:
                raise ValueError("register=True needs an auth_key")
            self.register_supernode(auth_key.public_key)
        port = find_free_port(self.host)
        proc = self._start_supernode(name, port, node_config, auth_key)
        if wait:
            self._wait_supernode(proc, port, time.monotonic() + self.ready_timeout)
        self._note_helpers()
        return name

    def wait_for_exit(self, name: str, timeout: float) -> int | None:
        """Exit code of the started process ``name``, or ``None`` if it still runs after ``timeout`` s."""
        proc = self._proc(name)
        try:
            return proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def list_supernodes(self, timeout: float = 60.0) -> list[dict[str, Any]]:
        """``flwr supernode list --verbose``: every node the SuperLink knows (``node-id``, ``status``, ...)."""
        if self.superlink_port is None:
            raise DeploymentError("start the deployment first")
        log = self.log_dir / "flwr-supernode-list.log"
        cmd = [self._bin("flwr"), "supernode", "list", self.connection_name, "--format", "json", "--verbose"]
        returncode, output = self._run_cli(cmd, log, timeout, False)
        reply = _last_json(output)
        if returncode != 0 or not reply or not reply.get("success"):
            raise DeploymentError(f"flwr supernode list failed (rc={returncode}); log {log}:\n" + _tail(log))
        return list(reply.get("nodes", []))

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
            if self.supernode_auth:
                cmd.append("--enable-supernode-auth")
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

    def _start_supernode(self, name: str, port: int, node_config: str, auth_key: NodeKey | None) -> _Proc:
        cmd = [self._bin("flower-supernode"), "--superlink", self.address, "--host", self.host,
               "--port", str(port), "--node-config", node_config]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.tls.ca_cert)]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(auth_key.private_key).resolve())]
        proc = self._spawn(name, cmd, name)
        self.supernode_ports.append(port)
        return proc

    def _wait_supernode(self, proc: _Proc, port: int, deadline: float) -> None:
        """Wait until the SuperNode serves its port and has a node id from the SuperLink."""

        def ready() -> bool:
            return _port_open(self.host, port) and self._log_has(proc, _SUPERNODE_READY)

        try:
            self._wait(proc, deadline, ready)
        except DeploymentError as exc:
            if self._log_has(proc, _SUPERNODE_REFUSED):
                hint = " (with SuperNode authentication, is its public key registered?)" if self.supernode_auth else ""
                raise DeploymentError(f"the SuperLink refused {proc.name}{hint}: {exc}") from None
            raise

    def _proc(self, name: str) -> _Proc:
        for proc in self._procs:
            if proc.name == name:
                return proc
        raise KeyError(f"no process named {name!r} (started: {', '.join(p.name for p in self._procs)})")

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
        """Remember the helpers of the started processes (they may be re-parented later).

        The live descendants of the running ones, plus the processes left in the session of a
        started process that has already exited (e.g. the SuperExec of a SuperNode the SuperLink
        refused: it is re-parented when the SuperNode exits and only stops once Flower notices).
        """
        roots = [p.popen.pid for p in self._procs if p.popen.poll() is None]
        if roots:
            for pid in _descendants(roots):
                self._helpers.setdefault(pid, _start_time(pid))
        sessions = {p.popen.pid: p.start_time for p in self._procs
                    if p.start_time is not None and _start_time(p.popen.pid) in (None, p.start_time)}
        for pid in _session_members(sessions):
            if pid not in sessions:
                self._helpers.setdefault(pid, _start_time(pid))

    @staticmethod
    def _alive(pid: int, start_time: str | None, own: Mapping[int, _Proc]) -> bool:
        if pid in own:
            return own[pid].popen.poll() is None
        return pid_alive(pid) and _start_time(pid) == start_time



def _last_json(output: str) -> dict[str, Any] | None:
    """The last JSON object in ``output`` that starts at the beginning of a line.

    ``flwr ... --format json`` prints one (pretty-printed over several lines), possibly after
    other output.
    """
    decoder = json.JSONDecoder()
    starts = [0] if output.startswith("{") else []
    starts += [m.start() + 1 for m in re.finditer(r"\n\{", output)]
    for start in reversed(starts):
        try:
            value, _ = decoder.raw_decode(output, start)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"

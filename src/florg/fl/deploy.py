"""Start a local multi-process Flower deployment: one SuperLink, N SuperNodes, then ``flwr run``.

This is the deployment runtime (the same ServerApp and ClientApp as the simulation, but every
piece is its own process talking over the network), on one machine and on loopback ports. It is
meant for integration tests and for trying a deployment before spreading it over machines::

    from florg.fl.deploy import LocalDeployment

    with LocalDeployment("work", num_supernodes=2, supernode_auth=True) as dep:
        result = dep.run(overrides=["data.num_clients=2", "train.rounds=2"], run_dir="work/run")
        print(result.status)              # "finished:completed"

or from a shell: ``python -m florg.fl.deploy --supernodes 2 --workdir work --supernode-auth -- train.rounds=2``.

Every process gets free loopback ports, its own ``FLWR_HOME`` under the work folder and a log
file in ``<workdir>/logs``. Runtime dependency installation and Flower's update check are turned
off, and the Hugging Face offline flags are set. Leaving the ``with`` block (also on errors or
Ctrl-C) stops exactly the processes this object started, and the helper processes they spawned
(SuperExec, ServerApp, ClientApp), by process id.

Security: TLS is the default. Pass certificate files with ``tls`` (see ``scripts/make_certs.sh``)
or let the deployment create a throwaway CA and server certificate in
``<workdir>/throwaway-certs``. With ``supernode_auth=True`` the SuperLink only accepts SuperNodes
whose public keys were registered with ``flwr supernode register`` before they connect (keys from
``scripts/make_node_keys.sh`` or throwaway ones in ``<workdir>/throwaway-keys``). Plain-text
``--insecure`` mode needs an explicit ``insecure=True`` (``--insecure`` on the command line) and is
for testing only.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
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
    "NodeKey",
    "RunResult",
    "TLSFiles",
    "deployment_env",
    "find_free_port",
    "find_free_ports",
    "load_node_keys",
    "make_node_keys",
    "make_throwaway_certs",
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
_SUPERNODE_REFUSED = "Failed to initialize the connection to the SuperLink"  # logged when a SuperNode gives up
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


@dataclass(frozen=True)
class NodeKey:
    """A SuperNode's key pair for SuperNode authentication (an EC key on a NIST curve, P-384).

    Flower 1.42 reads both files in OpenSSH format, as written by ``ssh-keygen -t ecdsa -b 384``
    (``scripts/make_node_keys.sh``) or :func:`make_node_keys`.
    """

    private_key: Path  #: ``-----BEGIN OPENSSH PRIVATE KEY-----`` file (``--auth-supernode-private-key``)
    public_key: Path  #: ``ecdsa-sha2-nistp384 AAAA...`` line (``flwr supernode register``)

    @classmethod
    def from_file(cls, private_key: str | Path) -> NodeKey:
        """The key pair ``private_key`` + ``private_key.pub`` (the ``ssh-keygen`` naming)."""
        private = Path(private_key).resolve()
        key = cls(private, private.with_name(private.name + ".pub"))
        missing = [str(p) for p in (key.private_key, key.public_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"missing SuperNode key files: {', '.join(missing)} (run scripts/make_node_keys.sh)")
        return key


def load_node_keys(folder: str | Path, count: int, prefix: str = "supernode-") -> list[NodeKey]:
    """``<folder>/<prefix>0`` ... ``<prefix><count-1>`` (and their ``.pub``), one per SuperNode."""
    return [NodeKey.from_file(Path(folder) / f"{prefix}{i}") for i in range(count)]


def _write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` readable by the owner only (mode 0600 from the start)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_node_keys(
    folder: str | Path, names: Sequence[str] = ("supernode-0", "supernode-1"), *, overwrite: bool = False
) -> list[NodeKey]:
    """Create one SuperNode key pair per name: ``<folder>/<name>`` (private) and ``<name>.pub``.

    EC P-384 keys in OpenSSH format, the same as ``ssh-keygen -t ecdsa -b 384 -N ""``. Raises
    :class:`FileExistsError` instead of replacing an existing key unless ``overwrite``.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    keys = []
    for name in names:
        key = NodeKey(out / name, out / f"{name}.pub")
        if not overwrite and (key.private_key.exists() or key.public_key.exists()):
            raise FileExistsError(f"SuperNode key {key.private_key} exists (remove it or pass overwrite=True)")
        private = ec.generate_private_key(ec.SECP384R1())
        _write_secret(key.private_key, private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
        public = private.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        key.public_key.write_bytes(public + f" {name}\n".encode())
        keys.append(key)
    return keys


def _san_entry(value: str) -> Any:
    from cryptography import x509

    kind, _, name = value.partition(":")
    if kind == "IP":
        return x509.IPAddress(ipaddress.ip_address(name))
    if kind == "DNS":
        return x509.DNSName(name)
    try:  # a bare name: an IP address or a host name
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def make_throwaway_certs(folder: str | Path, extra_sans: Sequence[str] = (), days: int = 30) -> TLSFiles:
    """A throwaway CA and a SuperLink certificate in ``folder`` (like ``scripts/make_certs.sh``).

    Writes ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``; the server certificate is
    valid for ``localhost``, ``127.0.0.1``, ``::1`` and ``extra_sans`` (``DNS:name``, ``IP:addr``
    or a bare name/address). For tests only: the CA key is stored unencrypted next to the
    certificates. Existing files are replaced.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    def pem_key(key: rsa.RSAPrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "florg test CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[Any] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                       x509.IPAddress(ipaddress.ip_address("::1"))]
    for extra in extra_sans:
        entry = _san_entry(extra)
        if entry not in sans:
            sans.append(entry)
    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=False)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    files = TLSFiles(out / "ca.crt", out / "server.pem", out / "server.key")
    _write_secret(out / "ca.key", pem_key(ca_key))
    _write_secret(files.server_key, pem_key(server_key))
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
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
    security = parser.add_argument_group(
        "security", "TLS is on by default (throwaway certificates in <workdir>/throwaway-certs unless --tls-dir)")
    security.add_argument("--tls-dir", default=None,
                          help="folder with ca.crt, server.pem, server.key (scripts/make_certs.sh)")
    security.add_argument("--supernode-auth", action="store_true",
                          help="only registered SuperNodes may join (--enable-supernode-auth + flwr supernode "
                          "register); throwaway keys in <workdir>/throwaway-keys unless --node-keys-dir")
    security.add_argument("--node-keys-dir", default=None,
                          help="folder with supernode-<i> / supernode-<i>.pub key pairs "
                          "(scripts/make_node_keys.sh); implies --supernode-auth")
    security.add_argument("--insecure", action="store_true",
                          help="no TLS, no authentication: for local testing only")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    args = parser.parse_args(argv)
    supernode_auth = args.supernode_auth or args.node_keys_dir is not None
    if args.insecure and (args.tls_dir or supernode_auth):
        parser.error("--insecure turns TLS off; it cannot be combined with --tls-dir, --supernode-auth "
                     "or --node-keys-dir")

    workdir = Path(args.workdir).resolve()
    run_dir = args.run_dir or str(workdir / time.strftime("run-%Y%m%d-%H%M%S"))
    overrides = list(args.overrides)
    if not any(o.startswith("data.num_clients=") for o in overrides):
        overrides.append(f"data.num_clients={args.supernodes}")
    tls = TLSFiles.from_dir(args.tls_dir) if args.tls_dir else None
    keys = load_node_keys(args.node_keys_dir, args.supernodes) if args.node_keys_dir else None
    if args.insecure:
        print("WARNING: --insecure: no TLS and no SuperNode authentication (for local testing only)", flush=True)
    with LocalDeployment(workdir, args.supernodes, tls=tls, insecure=args.insecure,
                         supernode_auth=supernode_auth, node_keys=keys) as dep:
        mode = "insecure" if args.insecure else "TLS" + (" + SuperNode authentication" if supernode_auth else "")
        print(f"SuperLink at {dep.address} ({mode}), {args.supernodes} SuperNodes; logs in {dep.log_dir}", flush=True)
        result = dep.run(overrides=overrides, run_dir=run_dir, config_file=args.config, timeout=args.timeout, echo=True)
    print(f"run {result.run_id}: {result.status}; run directory {run_dir}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

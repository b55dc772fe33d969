"""Secure deployment: TLS everywhere and SuperNode authentication (``--enable-supernode-auth``).

The slow test starts one deployment with certificates from ``scripts/make_certs.sh`` and two
SuperNodes whose keys (``scripts/make_node_keys.sh``) are registered with ``flwr supernode
register``. Alongside it start two SuperNodes the SuperLink must refuse: one with a key that was
never registered and one without any key (which would register itself if authentication were
off). The registered pair runs the tiny config for 2 rounds; the refused ones must exit with the
authentication error (Flower does not retry it) and never appear in ``flwr supernode list``. The
fast tests check the key and certificate files against Flower's own loaders and the rule that
insecure mode needs an explicit flag.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key

from florg.fl import deploy
from florg.fl.deploy import (
    APP_DIR,
    LocalDeployment,
    NodeKey,
    TLSFiles,
    load_node_keys,
    make_node_keys,
    make_throwaway_certs,
    pid_alive,
)
from helpers import RUN_TIMEOUT

ROOT = Path(__file__).resolve().parents[1]
REFUSAL_TIMEOUT = 60.0  # a refused SuperNode exits a few seconds after it starts; this only bounds the wait


def _script(name: str, *args: str | Path) -> None:
    env = dict(os.environ, PYTHON=sys.executable)  # make_node_keys.sh falls back to Python without ssh-keygen
    subprocess.run(["bash", str(ROOT / "scripts" / name), *map(str, args)], check=True, timeout=60,
                   capture_output=True, env=env)


def _session_members(sessions: set[int]) -> list[int]:
    """Live processes in the given sessions (every started process leads its own session; Linux only)."""
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc/self").exists() else []:
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.name.isdigit() and fields[0] != "Z" and int(fields[3]) in sessions:
            found.append(int(entry.name))
    return found


def _check_key(key: NodeKey) -> None:
    """The pair loads the way Flower 1.42 loads it (CLI: public key, SuperNode: private key)."""
    assert len(try_load_public_key(key.public_key)) > 0
    private = load_ssh_private_key(key.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert key.private_key.stat().st_mode & 0o077 == 0  # owner-only


# ------------------------------------------------------------------------------ fast checks
def test_make_node_keys_script(tmp_path):
    _script("make_node_keys.sh", tmp_path, "supernode-0", "supernode-1")
    keys = load_node_keys(tmp_path, 2)
    for key in keys:
        _check_key(key)
    assert keys[0].public_key.read_text() != keys[1].public_key.read_text()
    before = keys[0].private_key.read_bytes()
    with pytest.raises(subprocess.CalledProcessError):  # never replaces an existing key
        _script("make_node_keys.sh", tmp_path, "supernode-0")
    assert keys[0].private_key.read_bytes() == before


def test_make_node_keys_python(tmp_path):
    keys = make_node_keys(tmp_path, ["a", "b"])
    assert [k.private_key.name for k in keys] == ["a", "b"]
    for key in keys:
        _check_key(key)
    with pytest.raises(FileExistsError):
        make_node_keys(tmp_path, ["a"])
    old = keys[0].public_key.read_text()
    assert make_node_keys(tmp_path, ["a"], overwrite=True)[0].public_key.read_text() != old
    with pytest.raises(FileNotFoundError, match="make_node_keys.sh"):
        NodeKey.from_file(tmp_path / "missing")


def test_make_throwaway_certs(tmp_path):
    files = make_throwaway_certs(tmp_path, extra_sans=["my-host", "IP:10.0.0.5"])
    assert files == TLSFiles.from_dir(tmp_path)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    ips = {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert names == {"localhost", "my-host"} and ips == {"127.0.0.1", "::1", "10.0.0.5"}
    assert (tmp_path / "server.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_tls_is_the_default_and_insecure_needs_the_flag(tmp_path):
    dep = LocalDeployment(tmp_path / "d")
    assert not dep.insecure and not dep.supernode_auth
    keys = make_node_keys(tmp_path / "keys", ["k0", "k1"])
    certs = TLSFiles(tmp_path / "ca.crt", tmp_path / "s.pem", tmp_path / "s.key")
    with pytest.raises(ValueError, match="insecure"):
        LocalDeployment(tmp_path / "d", tls=certs, insecure=True)
    with pytest.raises(ValueError, match="needs TLS"):
        LocalDeployment(tmp_path / "d", insecure=True, supernode_auth=True)
    with pytest.raises(ValueError, match="supernode_auth"):
        LocalDeployment(tmp_path / "d", node_keys=keys)
    with pytest.raises(ValueError, match="one key per SuperNode"):
        LocalDeployment(tmp_path / "d", num_supernodes=3, supernode_auth=True, node_keys=keys)
    for flags in (["--insecure", "--supernode-auth"], ["--insecure", "--tls-dir", str(tmp_path)],
                  ["--insecure", "--node-keys-dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as err:
            deploy.main(["--workdir", str(tmp_path / "cli"), *flags])
        assert err.value.code == 2
    assert not (tmp_path / "cli").exists()  # refused before anything started


def test_last_json_reads_pretty_printed_cli_output():
    out = 'Loading...\n{\n  "success": true,\n  "nodes": [\n    {\n      "node-id": "7"\n    }\n  ]\n}\n'
    assert deploy._last_json(out) == {"success": True, "nodes": [{"node-id": "7"}]}
    assert deploy._last_json("no json here") is None


# ------------------------------------------------------------------------- live deployment
@pytest.mark.slow
def test_tls_and_supernode_auth(tmp_path, deployments, tiny_overrides):
    certs, keys_dir, other_keys = tmp_path / "certs", tmp_path / "keys", tmp_path / "other-keys"
    _script("make_certs.sh", certs)
    _script("make_node_keys.sh", keys_dir, "supernode-0", "supernode-1")
    _script("make_node_keys.sh", other_keys, "unknown")
    unknown = NodeKey.from_file(other_keys / "unknown")

    dep = deployments(num_supernodes=2, tls=TLSFiles.from_dir(certs), supernode_auth=True,
                      node_keys=load_node_keys(keys_dir, 2))
    run_dir = tmp_path / "run"
    try:
        with dep:
            # The SuperLink enforces authentication over TLS; both registered SuperNodes are in.
            superlink_cmd = dep.logs()["superlink"].read_text().splitlines()[0]
            assert "--enable-supernode-auth" in superlink_cmd and "--ssl-certfile" in superlink_cmd
            assert "--insecure" not in superlink_cmd
            for i in range(2):
                assert "--auth-supernode-private-key" in dep.logs()[f"supernode-{i}"].read_text().splitlines()[0]
            assert "root-certificates" in (dep.flwr_home / "config.toml").read_text()
            registered = set(dep.registered.values())
            assert len(registered) == 2

            # Two SuperNodes the SuperLink must refuse; they try to join while the run goes on.
            refused = {
                dep.add_supernode("partition-id=0 num-partitions=2", auth_key=unknown, wait=False,
                                  name="supernode-unknown-key"): "[code: 2004] Failed to activate SuperNode",
                dep.add_supernode("partition-id=1 num-partitions=2", wait=False,
                                  name="supernode-no-key"): "[code: 2001] SuperNode authentication is enabled",
            }

            overrides = [*tiny_overrides, "data.num_clients=2", "data.max_train_examples=200",
                         "data.max_test_examples=100", "federation.round_timeout=90"]
            result = dep.run(APP_DIR, overrides=overrides, run_dir=run_dir, timeout=RUN_TIMEOUT)
            logs = "\n".join(f"--- {name}: {path}" for name, path in dep.logs().items())
            assert result.ok, (f"flwr run: rc={result.returncode} status={result.status}\n"
                               f"{result.output[-4000:]}\n{logs}")

            for name, error in refused.items():
                code = dep.wait_for_exit(name, REFUSAL_TIMEOUT)
                log = dep.logs()[name].read_text(errors="replace")
                assert code is not None and code != 0, f"{name} was not refused (exit code {code}):\n{log[-2000:]}"
                assert "Failed to initialize the connection to the SuperLink" in log and error in log, log[-2000:]
                assert "SuperNode ID" not in log  # it never got a node id
            superlink_log = dep.logs()["superlink"].read_text(errors="replace")
            assert "No SuperNode found with the given public key" in superlink_log

            # The SuperLink knows exactly the registered nodes (--verbose lists deleted ones too).
            nodes = dep.list_supernodes()
            assert {int(n["node-id"]) for n in nodes} == registered, nodes
            assert all(n["status"] == "online" for n in nodes), nodes
            pids = dep.all_pids()
    finally:
        dep.stop()
    assert not [pid for pid in pids if pid_alive(pid)]
    assert not [pid for pid in dep.all_pids() if pid_alive(pid)]
    assert not _session_members(set(dep.pids))  # no orphaned helper (e.g. a refused SuperNode's SuperExec)

    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "complete", status
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [row["round"] for row in rows] == [0, 1, 2]
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
    for row in rows[1:]:
        assert row["participants"] == 2  # the two registered SuperNodes, nobody else
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0

"""Credentials of a local deployment: TLS certificate files and SuperNode authentication keys."""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["NodeKey", "TLSFiles", "load_node_keys", "make_node_keys", "make_throwaway_certs"]


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
    out = Path(folder).resolve()
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
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

#!/usr/bin/env bash
# Create SuperNode key pairs for Flower SuperNode authentication (SuperLink started with
# --enable-supernode-auth). Each SuperNode gets its own pair; the SuperLink operator registers the
# public keys (flwr supernode register KEY.pub CONNECTION) before the SuperNodes connect.
#
# Usage: scripts/make_node_keys.sh OUT_DIR [NAME ...]     (default names: supernode-0 supernode-1)
#
# Writes into OUT_DIR, for every NAME:
#   NAME      the private key (give it to that SuperNode only: --auth-supernode-private-key NAME)
#   NAME.pub  the public key (register it: flwr supernode register NAME.pub <connection>)
#
# Format (what Flower 1.42 reads): an EC key on the NIST P-384 curve, both files in OpenSSH format,
# i.e. `ssh-keygen -t ecdsa -b 384 -N ""`. The private keys are not encrypted: keep them on the
# SuperNode's machine, readable by its user only (this script writes them with mode 600).
# Without ssh-keygen the keys are made with Python's `cryptography` package (a Flower dependency)
# from $PYTHON (default: python3).
# Existing files are never replaced: remove them first to make a new pair.
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: $0 OUT_DIR [NAME ...]   (default names: supernode-0 supernode-1)" >&2
  exit 2
fi

OUT="$1"
shift
if [ "$#" -eq 0 ]; then
  set -- supernode-0 supernode-1
fi

for name in "$@"; do
  case "$name" in
    ""|*/*|.*) echo "invalid key name: '$name' (no slashes, no leading dot)" >&2; exit 2 ;;
  esac
  if [ -e "$OUT/$name" ] || [ -e "$OUT/$name.pub" ]; then
    echo "$OUT/$name or $OUT/$name.pub exists; remove it to create a new key pair" >&2
    exit 1
  fi
done

mkdir -p "$OUT"
for name in "$@"; do
  if command -v ssh-keygen >/dev/null 2>&1; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$OUT/$name" </dev/null
  else
    "${PYTHON:-python3}" - "$OUT/$name" "$name" <<'EOF'
import os
import sys

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

path, comment = sys.argv[1], sys.argv[2]
key = ec.generate_private_key(ec.SECP384R1())
private = key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
)
public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
with os.fdopen(fd, "wb") as fh:
    fh.write(private)
with open(path + ".pub", "wb") as fh:
    fh.write(public + b" " + comment.encode() + b"\n")
EOF
  fi
  chmod 600 "$OUT/$name"
done
echo "wrote $(printf "$OUT/%s{,.pub} " "$@")(EC P-384, OpenSSH format)"

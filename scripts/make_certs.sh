#!/usr/bin/env bash
# Create a throwaway certificate authority and a server certificate for a local Flower
# deployment (SuperLink on 127.0.0.1 / localhost), for testing TLS. Not for production use:
# the CA key is written unencrypted next to the certificates.
#
# Usage: scripts/make_certs.sh OUT_DIR [EXTRA_SAN ...]
#   EXTRA_SAN: more subject alternative names, e.g. DNS:my-host or IP:10.0.0.5
#
# Writes into OUT_DIR:
#   ca.crt      the CA certificate: give it to SuperNodes (--root-certificates), to the SuperLink
#               (--ssl-ca-certfile) and to the flwr CLI (root-certificates in config.toml)
#   ca.key      the CA private key (only needed to sign more certificates)
#   server.pem  the SuperLink's certificate (--ssl-certfile), valid for 127.0.0.1, ::1, localhost
#   server.key  the SuperLink's private key (--ssl-keyfile)
#
# TLS is also what SuperNode authentication (--enable-supernode-auth) builds on; the SuperNodes'
# key pairs come from scripts/make_node_keys.sh. See docs/deployment.md.
set -euo pipefail

if [ "$#" -lt 1 ]; then
  echo "usage: $0 OUT_DIR [EXTRA_SAN ...]   (e.g. $0 certs DNS:my-host IP:10.0.0.5)" >&2
  exit 2
fi
command -v openssl >/dev/null 2>&1 || { echo "openssl not found" >&2; exit 1; }

OUT="$1"
shift
DAYS="${CERT_DAYS:-30}"
SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for extra in "$@"; do
  SAN="$SAN,$extra"
done

mkdir -p "$OUT"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

# Certificate authority (self-signed).
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days "$DAYS" \
  -subj "/CN=florg test CA" \
  -addext "basicConstraints=critical,CA:TRUE" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null

# Server key and certificate signed by the CA.
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
  -keyout "$OUT/server.key" -out "$TMP/server.csr" 2>/dev/null
cat > "$TMP/server.ext" <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth
subjectAltName=$SAN
EOF
openssl x509 -req -sha256 -days "$DAYS" -in "$TMP/server.csr" \
  -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial -CAserial "$TMP/ca.srl" \
  -extfile "$TMP/server.ext" -out "$OUT/server.pem" 2>/dev/null

chmod 600 "$OUT/ca.key" "$OUT/server.key"
openssl verify -CAfile "$OUT/ca.crt" "$OUT/server.pem" >/dev/null
echo "wrote $OUT/ca.crt, $OUT/ca.key, $OUT/server.pem, $OUT/server.key (SAN: $SAN, valid $DAYS days)"

#!/usr/bin/env bash
# Test certificates and SuperNode keys for a TLS + node-authenticated Flower deployment.
#
#   scripts/make_certs.sh OUT_DIR [--nodes N] [--host NAME_OR_IP]...
#
# Writes into OUT_DIR:
#   ca.key, ca.crt            a throw-away certificate authority (give ca.crt to every SuperNode
#                             and to the machine that runs `flwr`)
#   server.key, server.pem    the SuperLink's TLS key and certificate, signed by the CA, valid for
#                             localhost, 127.0.0.1, ::1 and every --host given
#   node-K, node-K.pub        K = 1..N: one ECDSA P-384 key pair per SuperNode, in OpenSSH format
#                             (what `flower-supernode --auth-supernode-private-key` and
#                             `flwr supernode register` read)
#
# These are for tests and trials. In production use certificates from your own PKI and create
# each SuperNode's key on the SuperNode's machine, so the private key never travels.
set -euo pipefail

usage() { echo "usage: $0 OUT_DIR [--nodes N] [--host NAME_OR_IP]..." >&2; exit 2; }

[ $# -ge 1 ] || usage
out=$1; shift
nodes=2
hosts=()
while [ $# -gt 0 ]; do
  case $1 in
    --nodes) [ $# -ge 2 ] || usage; nodes=$2; shift 2 ;;
    --host) [ $# -ge 2 ] || usage; hosts+=("$2"); shift 2 ;;
    *) usage ;;
  esac
done
case $nodes in ''|*[!0-9]*) echo "--nodes must be a number" >&2; exit 2 ;; esac
command -v openssl >/dev/null || { echo "openssl is required" >&2; exit 1; }

mkdir -p "$out"
cd "$out"

# Subject alternative names: TLS clients check the address they dial against these.
san="DNS:localhost,IP:127.0.0.1,IP:::1"
for h in "${hosts[@]+"${hosts[@]}"}"; do
  if [[ $h =~ ^[0-9.]+$ || $h == *:* ]]; then san+=",IP:$h"; else san+=",DNS:$h"; fi
done

openssl req -x509 -newkey rsa:2048 -sha256 -days 30 -nodes -subj "/CN=fedpeptao test CA" \
  -keyout ca.key -out ca.crt 2>/dev/null

openssl req -newkey rsa:2048 -sha256 -nodes -subj "/CN=fedpeptao superlink" \
  -keyout server.key -out server.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > server.ext
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl

# SuperNode identities. ssh-keygen writes the OpenSSH format Flower reads; without it, Python's
# `cryptography` (a Flower dependency; set PYTHON to the environment's interpreter) writes the same.
for k in $(seq 1 "$nodes"); do
  rm -f "node-$k" "node-$k.pub"
  if command -v ssh-keygen >/dev/null; then
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "node-$k"
  else
    "${PYTHON:-python3}" - "node-$k" <<'EOF'
import sys
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP384R1())
path = sys.argv[1]
with open(path, "wb") as fh:
    fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                               serialization.NoEncryption()))
with open(path + ".pub", "wb") as fh:
    fh.write(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
EOF
  fi
done
chmod 600 ca.key server.key node-* 2>/dev/null || true
chmod 644 ca.crt server.pem node-*.pub

echo "wrote CA, SuperLink certificate ($san) and $nodes SuperNode key pair(s) to $(pwd)"

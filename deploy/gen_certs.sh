#!/usr/bin/env bash
# Generate a private CA and a SuperLink server certificate signed by it.
#
#   bash deploy/gen_certs.sh [OUT_DIR] [SAN ...]
#
# OUT_DIR (default deploy/certificates) receives ca.crt, server.pem and
# server.key (what the SuperLink and the SuperNodes need); the CA's private key
# goes to a separate directory, CA_DIR (default OUT_DIR/../ca-private), which
# should not stay on the SuperLink machine: whoever holds it can mint
# certificates the nodes trust. Private keys are created under umask 077.
# The server certificate is valid for localhost, 127.0.0.1 and ::1
# plus every extra SAN given (host names, or IP addresses of the machine the
# SuperLink runs on), e.g.:  bash deploy/gen_certs.sh certs superlink.example.org 10.0.0.5
# Flower's clients check the address they dial against the certificate's SANs,
# so the SuperLink's address must be among them.
set -euo pipefail
OUT="${1:-$(dirname "$0")/certificates}"
shift || true
umask 077
CA_DIR="${CA_DIR:-$(dirname "$OUT")/ca-private}"
mkdir -p "$OUT" "$CA_DIR"
SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then SAN="$SAN,IP:$name"; else SAN="$SAN,DNS:$name"; fi
done
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=flwr-gkt CA" \
    -keyout "$CA_DIR/ca.key" -out "$OUT/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=localhost" \
    -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$SAN" > "$OUT/server.ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$CA_DIR/ca.key" -CAcreateserial \
    -days 365 -extfile "$OUT/server.ext" -out "$OUT/server.pem" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 600 "$CA_DIR/ca.key" "$OUT/server.key"
chmod 644 "$OUT/ca.crt" "$OUT/server.pem"   # public: the nodes need ca.crt
echo "certificates in $OUT (server SANs: $SAN); CA key in $CA_DIR (keep it off the SuperLink)"

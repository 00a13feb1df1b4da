#!/usr/bin/env bash
# Generate a private CA and a SuperLink server certificate signed by it.
#
#   bash deploy/gen_certs.sh [OUT_DIR] [SAN ...]
#
# OUT_DIR (default deploy/certificates) receives ca.crt, ca.key, server.pem,
# server.key. The server certificate is valid for localhost, 127.0.0.1 and ::1
# plus every extra SAN given (host names, or IP addresses of the machine the
# SuperLink runs on), e.g.:  bash deploy/gen_certs.sh certs superlink.example.org 10.0.0.5
# Flower's clients check the address they dial against the certificate's SANs,
# so the SuperLink's address must be among them.
set -euo pipefail
OUT="${1:-$(dirname "$0")/certificates}"
shift || true
mkdir -p "$OUT"
SAN="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
    if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then SAN="$SAN,IP:$name"; else SAN="$SAN,DNS:$name"; fi
done
openssl req -x509 -newkey rsa:4096 -nodes -days 365 -subj "/CN=flwr-gkt CA" \
    -keyout "$OUT/ca.key" -out "$OUT/ca.crt" 2>/dev/null
openssl req -newkey rsa:4096 -nodes -subj "/CN=localhost" \
    -keyout "$OUT/server.key" -out "$OUT/server.csr" 2>/dev/null
printf "subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n" "$SAN" > "$OUT/server.ext"
openssl x509 -req -in "$OUT/server.csr" -CA "$OUT/ca.crt" -CAkey "$OUT/ca.key" -CAcreateserial \
    -days 365 -extfile "$OUT/server.ext" -out "$OUT/server.pem" 2>/dev/null
rm -f "$OUT/server.csr" "$OUT/server.ext" "$OUT/ca.srl"
chmod 600 "$OUT/ca.key" "$OUT/server.key"
echo "certificates in $OUT (server SANs: $SAN)"

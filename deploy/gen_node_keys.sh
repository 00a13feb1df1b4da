#!/usr/bin/env bash
# Generate SuperNode authentication key pairs (ECDSA P-384, OpenSSH format).
#
#   bash deploy/gen_node_keys.sh [OUT_DIR] [N]
#
# OUT_DIR (default deploy/keys) receives node1 / node1.pub ... nodeN / nodeN.pub.
# Register each public key with the SuperLink (`flwr supernode register
# OUT_DIR/nodeI.pub <connection>`) and start SuperNode I with
# `--auth-supernode-private-key OUT_DIR/nodeI`.
set -euo pipefail
OUT="${1:-$(dirname "$0")/keys}"
N="${2:-2}"
umask 077  # the private keys are created readable by their owner only
mkdir -p "$OUT"
for i in $(seq 1 "$N"); do
    rm -f "$OUT/node$i" "$OUT/node$i.pub"
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "flwr-gkt node$i" -f "$OUT/node$i"
    chmod 644 "$OUT/node$i.pub"
done
echo "keys in $OUT: $(ls "$OUT" | tr '\n' ' ')"

#!/usr/bin/env bash
# One-GPU check in under 8 minutes: benchmarks/gpu.py (server training, the
# project's path against a plain loop; AMP on and off; features resident on the
# GPU or streamed from pinned host memory) and the fmnist preset run on the GPU
# (python -m simulation, in-process runtime), then one table of both.
#
#   bash benchmarks/gpu_check.sh                    # on a machine with a GPU
#   GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # tiny settings on the CPU: checks the script
#
# Environment: PYTHON (default python), GPU_CHECK_OUT (output directory; default
# a new temporary one), GPU_CHECK_SET (extra --set overrides of the run, e.g.
# "data-dir=/data/fashion-mnist").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${GPU_CHECK_OUT:-$(mktemp -d -t gkt-gpu-check-XXXXXX)}
mkdir -p "$OUT"
if [[ "${GPU_CHECK_DRY:-0}" == 1 ]]; then
  BENCH=(--nodes 2 --samples 32 --epochs 1 --batch-size 16)
  RUN=(device=cpu num-server-rounds=1 data-fraction=0.02 test-fraction=0.02 server-epochs=1)
else
  BENCH=(--nodes 4 --samples 2000 --epochs 2 --cuda-only)
  RUN=(device=cuda)
fi
# shellcheck disable=SC2206  # GPU_CHECK_SET is a list of key=value words
RUN+=(${GPU_CHECK_SET:-})

timeout 180 "$PY" benchmarks/gpu.py "${BENCH[@]}" --json "$OUT/gpu.json"
timeout 300 "$PY" -m simulation --preset fmnist --runtime inprocess \
  --set results-dir="$OUT" run-name=fmnist "${RUN[@]}"

"$PY" - "$OUT" <<'PYTHON'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
bench = json.loads((out / "gpu.json").read_text())
run = json.loads((out / "fmnist" / "results.json").read_text())
print("\n| check | setting | project | plain loop | plain / project |")
print("| --- | --- | --- | --- | --- |")
for r in bench["rows"]:
    setting = f"{r['device']} {r['precision']}, {r['stored']} features {r['features']}"
    print(
        f"| server samples/s | {setting} | {r['project']:.0f} | {r['plain']:.0f} "
        f"| {r['plain'] / r['project']:.2f} |"
    )
for name, speedup in bench["amp"].items():
    print(f"| AMP speed-up | {name} | {speedup:.2f}x fp32 | | |")
if bench["ddp"]:
    d = bench["ddp"]
    print(f"| DDP samples/s | {d['devices']} | {d['ddp']:.0f} | {d['one-device']:.0f} (1 device) | |")
final = run.get("final", {})
cfg = run["config"]
setting = f"{cfg['num-server-rounds']} rounds, device {cfg['device']}"
print(
    f"| fmnist run | {setting} | accuracy {final.get('accuracy', float('nan')):.4f} "
    f"| {run['seconds']:.0f} s | |"
)
PYTHON

#!/usr/bin/env bash
# Packaging smoke test (`make wheel-smoke`, part of `make check`):
#   1. build the wheel from this tree;
#   2. install it, with its pinned dependencies, into a fresh venv (torch and its CUDA
#      libraries are linked in from the main venv, see below);
#   3. from a directory outside the source tree, import the installed package and
#      run a 1-round tiny FedGKT simulation through the installed console script;
#   4. install the app template (examples/quickstart-fedgkt, which depends on
#      flwr-gkt) into the same venv and run `flwr run .` from its folder for 2
#      rounds on a private SuperLink: the run completes, the accuracy is above
#      chance, and nothing it started is left running.
# It fails when the wheel misses a module, a preset or an entry point, or when the
# template needs more than the installed wheel's public API.
set -euo pipefail
cd "$(dirname "$0")/.."
src="$PWD"
PY="${PY:-$src/.venv/bin/python}"
PYTHON="${PYTHON:-python3}"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

echo "wheel-smoke: building the wheel"
"$PY" -m pip wheel -q --no-deps --wheel-dir "$work/dist" "$src"
wheel="$(ls "$work"/dist/flwr_gkt-*.whl)"
echo "wheel-smoke: $(basename "$wheel")"

echo "wheel-smoke: installing it into a fresh venv"
"$PYTHON" -m venv "$work/venv"
venv_py="$work/venv/bin/python"
"$venv_py" -m pip install -q --upgrade pip
# torch, torchvision and the CUDA libraries they pull in (about 5.5 GB) are linked in
# from the main venv rather than installed a second time: a full copy doubled CI's
# disk footprint. pip still resolves and installs every other dependency of the
# wheel for real, torch's own small requirements included, and `pip check` passes.
site="$("$venv_py" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" - "$work/linked" <<'EOF'
import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

dest = Path(sys.argv[1])
dest.mkdir()
heavy = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
todo, seen = ["torch", "torchvision"], set()
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or not heavy.match(name):
        continue
    seen.add(name)
    dist = md.distribution(name)
    todo += [Requirement(r).name for r in dist.requires or [] if "extra ==" not in r]
    for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
        if not (dest / top).exists():
            (dest / top).symlink_to(dist.locate_file(top))
print(f"wheel-smoke: {len(seen)} distributions linked from the main venv ({', '.join(sorted(seen)[:3])}, ...)")
EOF
echo "$work/linked" >"$site/_wheel_smoke_linked.pth"
"$venv_py" -m pip install -q "$wheel"
"$venv_py" -m pip check

cd "$work"  # nothing of the source tree on sys.path from here on
export FLWR_HOME="$work/flwr-home" OMP_NUM_THREADS=1
"$venv_py" - "$work/venv" <<'EOF'
import importlib.metadata as md
import sys
from pathlib import Path

import importlib.util

import flwr_gkt
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.core.registry import available_models
from flwr_gkt.flower.strategy import FedGKT  # noqa: F401

venv = Path(sys.argv[1]).resolve()
where = Path(flwr_gkt.__file__).resolve()
assert venv in where.parents, f"flwr_gkt imported from {where}, not the venv"
# One top-level package: every installed file of the distribution is flwr_gkt/...,
# its metadata, or a console script (../../../bin/...).
files = md.distribution("flwr-gkt").files or []
top = {f.parts[0] for f in files if not f.parts[0].endswith(".dist-info") and f.parts[0] != ".."}
assert top == {"flwr_gkt"}, f"the wheel installs top-level {sorted(top)}, expected only flwr_gkt"
assert importlib.util.find_spec("simulation") is None, "a top-level 'simulation' module is installed"
assert md.version("flwr-gkt") == flwr_gkt.__version__, (md.version("flwr-gkt"), flwr_gkt.__version__)
assert (Path(flwr_gkt.__file__).parent / "py.typed").is_file(), "py.typed missing"
assert (Path(PRESETS_DIR) / "smoke.yaml").is_file(), "presets missing from the wheel"
scripts = {ep.name for ep in md.entry_points(group="console_scripts") if ep.name.startswith("flwr-gkt")}
assert {"flwr-gkt-sim", "flwr-gkt-experiment", "flwr-gkt-summary"} <= scripts, scripts
print(f"wheel-smoke: import ok (flwr-gkt {flwr_gkt.__version__}, models {available_models()['edge']})")
EOF

echo "wheel-smoke: 1-round tiny simulation from the installed package (flwr run, the default runtime)"
"$work/venv/bin/flwr-gkt-sim" --preset smoke \
    --set num-server-rounds=1 results-dir="$work/results" run-name=wheel-flwr | tail -n 3
test -f "$work/results/wheel-flwr/results.json"
echo "wheel-smoke: 1-round tiny simulation in process"
"$work/venv/bin/flwr-gkt-sim" --preset smoke --runtime inprocess \
    --set num-server-rounds=1 results-dir="$work/results" run-name=wheel-smoke
"$venv_py" - "$work/results/wheel-smoke/results.json" <<'EOF'
import json
import sys

result = json.load(open(sys.argv[1]))
(row,) = result["history"]  # exactly one round
assert row["round"] == 1 and row["nodes-replied"] >= 1, row
assert row["server-train-examples"] > 0 and row["bytes-up-train"] > 0, row
assert 0.0 <= row["accuracy"] <= 1.0 and row["num-examples"] > 0, row
print(
    f"wheel-smoke: simulation ok: {row['nodes-replied']} nodes, server trained on "
    f"{row['server-train-examples']} samples, test accuracy {row['accuracy']:.3f}"
)
EOF
echo "wheel-smoke: the app template, flwr run . from its folder (2 rounds, private SuperLink)"
cp -r "$src/examples/quickstart-fedgkt" "$work/quickstart-fedgkt"
"$venv_py" -m pip install -q "$work/quickstart-fedgkt"
"$venv_py" -m pip check
cd "$work/quickstart-fedgkt"
"$venv_py" - "$work/flwr-home-template" <<'EOF'
import os
import re
import sys
import time
from pathlib import Path

from flwr_gkt.app.flwr_local import run

home = Path(sys.argv[1])
# `flwr run . local-simulation` in this folder, against a SuperLink of its own that
# run() starts from the venv and stops, with every process it started.
config = "num-server-rounds=2 data-fraction=0.05 test-fraction=0.1"
status, log = run(Path("."), config, 2, home, Path.cwd())
assert status == "finished:completed", status
found = re.findall(r"quickstart-fedgkt: final accuracy ([0-9.]+)", log)
assert found, "no final accuracy in the run's log"
accuracy = float(found[-1])
assert accuracy > 0.2, f"accuracy {accuracy} is not above chance (0.1)"


def left_running() -> list[str]:
    """Processes with this run's Flower home in their environment: the SuperLink's."""
    mark = f"FLWR_HOME={home}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if mark in (entry / "environ").read_bytes().split(b"\0"):
                out.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return out


for _ in range(20):  # Ray's workers may take a moment to exit
    leftover = left_running()
    if not leftover:
        break
    time.sleep(0.5)
assert not leftover, f"left running: {leftover}"
print(f"wheel-smoke: template ok: 2 rounds, accuracy {accuracy:.3f}, nothing left running")
EOF
echo "wheel-smoke: passed"

#!/usr/bin/env bash
# The test suite (`make test`), in two pytest processes side by side:
#   * tests/e2e/ -- real flower-superlink / flower-supernode / flwr run processes
#     and the examples as a user runs them; most of their time is spent waiting
#     (for the SuperLink to notice a killed node: Flower's 30 s heartbeat, 2
#     missed; for SuperLinks and ClientApp processes to start), not computing;
#     test_deploy.py also runs the step-by-step commands of deploy/README.md;
#   * everything else (tests/core/, tests/data/, tests/wire/, ...).
# Each process and everything it starts uses one torch/OpenMP thread
# (OMP_NUM_THREADS=1; FLWR_GKT_TEST_THREADS=1 for tests/conftest.py): with two
# threads each, the two processes' OpenMP threads wait on each other on 2 cores
# and single tests ran 6-12x slower than alone (a tampered-reply test: 5.9 s
# alone, 47.3 s beside the deployment tests; with one thread each, 7.1 s).
# Measured with `--durations`: main 709 -> 459 s, deployment 646 -> 528 s.
# Same tests as a plain `pytest -q` (`make test-serial`), about 2.5 minutes less
# wall time on 2 cores. pytest's exit code 5 ("no tests collected") is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"

deploy_log="$(mktemp)"
trap 'rm -f "$deploy_log"' EXIT
OMP_NUM_THREADS=1 "$PY" -m pytest -q -p no:cacheprovider tests/e2e >"$deploy_log" 2>&1 &
deploy_pid=$!
FLWR_GKT_TEST_THREADS=1 OMP_NUM_THREADS=1 "$PY" -m pytest -q --ignore=tests/e2e "$@"
main=$?
wait "$deploy_pid"
deploy=$?
echo "---- tests/e2e (run alongside) ----"
cat "$deploy_log"

status=0
for rc in "$main" "$deploy"; do
    if [ "$rc" -eq 5 ]; then
        echo "pytest collected no tests" >&2
        status=1
    elif [ "$rc" -ne 0 ]; then
        status=$rc
    fi
done
exit "$status"

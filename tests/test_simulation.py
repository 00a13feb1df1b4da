"""End-to-end runs through Flower's runtimes (Ray simulation), as a user runs them.

Each test starts a real process: ``python -m simulation`` (``run_simulation``),
``python -m simulation --api legacy`` and ``flwr run`` on a private SuperLink.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent



def _run(args, cwd, timeout=420):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    return log


def _results(path):
    data = json.loads((path / "results.json").read_text())
    assert (path / "metrics.csv").read_text().count("\n") == len(data["history"]) + 1
    return data


def _check_learned(history, rounds=2, nodes=2):
    assert [row["round"] for row in history] == list(range(1, rounds + 1))
    for row in history:
        assert row["nodes-replied"] == nodes and row["nodes-rejected"] == 0
    last = history[-1]
    assert last["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert last["num-examples"] == 500  # 5% of the 10k test set, split over the nodes


def test_python_entry_runs_fedgkt_in_simulation(tmp_path):
    log = _run(["-m", "simulation", "--preset", "smoke", "--set", f"results-dir={tmp_path}",
                "run-name=entry"], ROOT)
    assert "FedGKT round 2 eval: accuracy" in log
    data = _results(tmp_path / "entry")
    _check_learned(data["history"])
    h = data["history"]
    # features of every training sample went up each round: 16x28x28 float32 each
    assert h[0]["bytes-up-train"] > 600 * 16 * 28 * 28 * 4
    assert h[0]["bytes-down-train"] == 0  # no server logits yet in round 1
    assert h[1]["bytes-down-train"] > 600 * 10 * 4
    assert (tmp_path / "entry" / "server_model.pt").is_file()


def test_legacy_strategy_api_runs_in_simulation(tmp_path):
    log = _run(["-m", "simulation", "--api", "legacy", "--preset", "smoke", "--set",
                f"results-dir={tmp_path}", "run-name=legacy"], ROOT)
    assert "FedGKT round 2 fit" in log
    data = _results(tmp_path / "legacy")
    _check_learned(data["history"])


def _leftover_processes(marker):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def test_flwr_run_on_a_local_superlink(tmp_path):
    home = tmp_path / "flwr-home"
    log = _run(["-m", "simulation.flwr_local", "--num-supernodes", "2", "--flwr-home", str(home),
                "--workdir", str(tmp_path), "--run-config",
                f"preset='smoke' results-dir='{tmp_path / 'out'}' run-name='flwr'"], ROOT)
    assert "flwr run status: finished:completed" in log
    assert "FedGKT round 2 eval: accuracy" in log  # ServerApp log streamed back
    data = _results(tmp_path / "out" / "flwr")
    _check_learned(data["history"])
    assert data["config"]["server-model"] == "resnet10"  # the preset reached the ServerApp
    assert not _leftover_processes(str(home)), "processes left running"
    # pyproject.toml is untouched by flwr run (no federation table to migrate)
    assert "federations" not in (ROOT / "pyproject.toml").read_text()


def test_flwr_local_reports_failed_runs(tmp_path):
    home = tmp_path / "flwr-home"
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, "-m", "simulation.flwr_local", "--num-supernodes", "2", "--flwr-home",
         str(home), "--workdir", str(tmp_path), "--run-config", "preset='no-such-preset'"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "flwr run status: finished:failed" in proc.stdout
    assert not _leftover_processes(str(home))


@pytest.mark.parametrize("mode,reason", [("nan", "NaN or Inf"), ("shape", "maps have shape [8, 28, 28]")])
def test_bad_payload_in_a_ray_simulation_is_rejected_and_the_run_goes_on(tmp_path, mode, reason):
    log = _run(["tests/faulty_sim.py", str(tmp_path), mode], ROOT)
    assert "FAULTY node" in log
    rejected = [line for line in log.splitlines() if "reply of node" in line]
    assert len(rejected) == 1 and "round 2" in rejected[0] and reason in rejected[0]
    history = _results(tmp_path / mode)["history"]
    assert [r["nodes-replied"] for r in history] == [3, 2, 3]
    assert [r["nodes-rejected"] for r in history] == [0, 1, 0]
    # the rejected node's round-1 features stayed in the store: the server still
    # trained on all 3 nodes' samples in round 2
    assert history[0]["server-train-examples"] == history[1]["server-train-examples"] == 600
    assert all(r["eval-nodes"] == 3 for r in history)
    assert history[-1]["accuracy"] > 0.3


def test_fedavg_baseline_runs_two_rounds_on_the_same_partitions(tmp_path):
    from flwr.app import ArrayRecord

    from flwr_gkt.registry import build_full_model
    from flwr_gkt.wire import record_nbytes

    log = _run(["-m", "simulation", "--algorithm", "fedavg", "--preset", "smoke", "--set",
                f"results-dir={tmp_path}", "run-name=fedavg"], ROOT)
    assert "FedAvg round 2 eval" in log
    data = _results(tmp_path / "fedavg")
    assert data["algorithm"] == "fedavg"
    history = data["history"]
    assert [r["round"] for r in history] == [1, 2] and history[-1]["accuracy"] > 0.2
    # FedAvg ships the full model (ResNet-11 for the smoke preset's resnet10 server) both ways
    model_bytes = record_nbytes({"arrays": ArrayRecord(build_full_model("resnet10", 10, 1).state_dict())})
    for row in history:
        assert row["bytes-down-train"] == row["bytes-up-train"] == 2 * model_bytes

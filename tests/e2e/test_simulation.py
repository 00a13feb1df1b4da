"""End-to-end runs through Flower's runtimes (Ray simulation), as a user runs them.

Each test starts a real process: the Python entry (``python -m simulation``:
``flwr run`` on a private SuperLink), ``--api legacy`` (in the in-process
runtime), the app of a ``flwr build`` FAB through ``flwr_local``, and a Ray
simulation with faulty nodes. (The FedAvg baseline runs in
``test_experiments.py``, the in-process runtime in ``test_reliability.py``.)
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(args, cwd, timeout=420):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
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


def test_the_python_entry_runs_flwr_run_on_a_private_superlink(tmp_path):
    """The README's main path: `flwr run` (no deprecated run_simulation), progress streamed.

    In async mode, so that the same run covers AsyncFedGKT in Flower's Ray
    simulation (the synchronous entry runs in the wheel smoke test, and the
    synchronous app through ``flwr_local`` below).
    """
    log = _run(
        [
            "-m",
            "simulation",
            "--preset",
            "smoke",
            "--set",
            f"results-dir={tmp_path}",
            "run-name=main",
            f"node-state-dir={tmp_path / 'nodes'}",
            "server-mode=async",
            "server-threads=1",
        ],
        ROOT,
    )
    assert "flwr run status: finished:completed" in log
    assert log.index("FedGKT round 1 update 1/2") < log.index("FedGKT round 2 update 2/2")
    assert "deprecat" not in log.lower(), [x for x in log.splitlines() if "eprecat" in x]
    assert "run_simulation" not in log
    data = _results(tmp_path / "main")
    _check_learned(data["history"])
    assert data["config"]["server-mode"] == "async"
    # The simulated nodes took their node-side settings from this machine's run config.
    assert sorted(p.name for p in (tmp_path / "nodes").iterdir()) == ["node-0", "node-1"]
    assert not _leftover_processes("flwr-gkt-"), "processes left running"


def test_legacy_strategy_api_runs_in_simulation(tmp_path):
    log = _run(
        [
            "-m",
            "simulation",
            "--api",
            "legacy",
            "--runtime",
            "inprocess",
            "--preset",
            "smoke",
            "--set",
            f"results-dir={tmp_path}",
            "run-name=legacy",
        ],
        ROOT,
    )
    assert "FedGKT round 2 train" in log
    data = _results(tmp_path / "legacy")
    _check_learned(data["history"])


def _leftover_processes(marker):
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if marker in line and "ps -eo" not in line]


def _flwr_local(home: Path, workdir: Path, run_config: str, *args: str) -> list[str]:
    """Arguments of ``python -m flwr_gkt.app.flwr_local`` (two SuperNodes) plus ``args``."""
    return [
        "-m",
        "flwr_gkt.app.flwr_local",
        *args,
        "--num-supernodes",
        "2",
        "--flwr-home",
        str(home),
        "--workdir",
        str(workdir),
        "--run-config",
        run_config,
    ]


def test_flwr_local_reports_failed_runs(tmp_path):
    home = tmp_path / "flwr-home"
    env = {**os.environ}
    proc = subprocess.run(
        [sys.executable, *_flwr_local(home, tmp_path, "preset='no-such-preset'")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "flwr run status: finished:failed" in proc.stdout
    assert not _leftover_processes(str(home))


def test_bad_payloads_in_a_ray_simulation_are_rejected_and_the_run_goes_on(tmp_path):
    log = _run(["tests/helpers/faulty_sim.py", str(tmp_path), "mixed"], ROOT)
    assert log.count("FAULTY node") == 2
    rejected = [line for line in log.splitlines() if "reply of node" in line]
    assert len(rejected) == 2 and all("round 2" in line for line in rejected)
    assert any("NaN or Inf" in line for line in rejected)
    assert any("maps have shape [8, 28, 28]" in line for line in rejected)
    history = _results(tmp_path / "mixed")["history"]
    assert [r["nodes-replied"] for r in history] == [3, 1, 3]
    assert [r["nodes-rejected"] for r in history] == [0, 2, 0]
    # the rejected nodes' round-1 features stayed in the store: the server still
    # trained on all 3 nodes' samples in round 2
    assert history[0]["server-train-examples"] == history[1]["server-train-examples"] == 600
    assert all(r["eval-nodes"] == 3 for r in history)
    assert history[-1]["accuracy"] > 0.3


def test_flwr_build_makes_a_fab_that_flwr_run_runs_on_a_fresh_superlink(tmp_path):
    """`flwr build` packs the repository; `flwr run` of the app installed from it completes."""
    flwr = str(Path(sys.executable).parent / "flwr")
    # `flwr build` takes the app's name from its folder (letters, digits, hyphens,
    # at most 32 characters): build from a copy of the checkout named like the app.
    app = tmp_path / "flwr-gkt"
    shutil.copytree(
        ROOT,
        app,
        ignore=shutil.ignore_patterns(".git", ".venv", "results", "__pycache__", "*.fab"),
    )
    build = subprocess.run(
        [flwr, "build", "--app", str(app)],
        cwd=tmp_path,
        env={**os.environ, "FLWR_HOME": str(tmp_path / "build-home")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    (fab,) = tmp_path.glob("flwr-gkt.flwr-gkt.*.fab")
    home = tmp_path / "flwr-home"
    install = subprocess.run(
        [flwr, "install", str(fab)],
        env={**os.environ, "FLWR_HOME": str(home)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    (installed,) = (home / "apps").glob("flwr-gkt.flwr-gkt.*")
    assert (installed / "simulation" / "server_app.py").is_file()
    assert (installed / "flwr_gkt" / "app" / "presets" / "smoke.yaml").is_file()
    # The helper: its own SuperLink in that Flower home, `flwr run <app> --stream`, final status.
    run_config = f"preset='smoke' results-dir='{tmp_path / 'out'}' run-name='fab'"
    log = _run(_flwr_local(home, tmp_path, run_config, "--app", str(installed)), ROOT)
    assert "flwr run status: finished:completed" in log
    assert "FedGKT round 2 eval: accuracy" in log  # ServerApp log streamed back
    data = _results(tmp_path / "out" / "fab")
    _check_learned(data["history"])
    assert data["config"]["server-model"] == "resnet10"  # the preset reached the ServerApp
    assert not _leftover_processes(str(home)), "processes left running"
    # pyproject.toml is untouched by flwr build / run (no federation table to migrate)
    assert "federations" not in (app / "pyproject.toml").read_text()


def test_splitfed_v2_runs_through_the_flwr_runtime(tmp_path):
    """``python -m simulation --algorithm splitfed-v2``: ``flwr run`` on a local Ray SuperLink.

    One round on 30 samples per node (one mini-batch each: a ``begin`` wave and
    the final ``step`` wave), the ClientApps in Flower's Ray simulation, so the
    turn lives in ``context.state`` between two Ray actor calls (~30 s).
    """
    args = ["--preset", "smoke", "--algorithm", "splitfed-v2", "--set", "num-server-rounds=1"]
    args += ["data-fraction=0.001", "test-fraction=0.01", f"results-dir={tmp_path}", "run-name=sf"]
    proc = subprocess.run(
        [sys.executable, "-m", "simulation", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "flwr run status: finished:completed" in log, log[-4000:]
    with open(tmp_path / "sf" / "metrics.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["round"] == "1" and int(float(row["nodes-replied"])) == 2
    assert int(float(row["waves"])) == 2 and int(float(row["messages-down"])) == 4
    assert int(float(row["server-train-examples"])) == 60
    for column in ("bytes-activations", "bytes-gradients", "bytes-edge-weights-up"):
        assert float(row[column]) > 0, column
    assert float(row["bytes-up-train"]) > 0 and float(row["bytes-down-train"]) > 0
    assert float(row["bytes-up-eval"]) > 0 and 0 <= float(row["accuracy"]) <= 1
    assert float(row["seconds-per-wave"]) > 0
    assert json.loads((tmp_path / "sf" / "results.json").read_text())["algorithm"] == "splitfed-v2"


def test_the_private_superlink_caps_rays_object_store_unless_the_user_sets_it(
    tmp_path, monkeypatch
):
    from flwr_gkt.app.flwr_local import superlink_env

    key = "RAY_DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES"
    monkeypatch.delenv(key, raising=False)
    env = superlink_env(tmp_path, {"EXTRA": "1"})
    assert env[key] == str(128 * 1024 * 1024) and env["EXTRA"] == "1"
    assert env["FLWR_HOME"] == str(tmp_path)
    monkeypatch.setenv(key, str(2 << 30))
    assert superlink_env(tmp_path)[key] == str(2 << 30)  # the user's setting wins

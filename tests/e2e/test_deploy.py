"""Real deployment on loopback: flower-superlink + flower-supernode processes, TLS.

Each test starts a SuperLink and two SuperNodes as separate processes speaking
HTTPS on 127.0.0.1 (certificates generated in the test), submits the app with
``flwr run`` through a connection in a private Flower config, and stops every
process it started (checked: nothing is left in their sessions).

The deployment guide, ``deploy/README.md``, is tested the same way: its
step-by-step commands (the ``bash`` blocks marked ``<!-- deploy-test: NAME -->``)
run in order, as one ``bash -euo pipefail`` script, in a copy of the repository
with an empty ``HOME``.
"""

import csv
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from deploy.loopback import Federation, algorithm_app, free_port, session_processes

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "deploy" / "README.md"
#: A block of the guide the test runs: the marker, then a fenced bash block.
GUIDE_BLOCK = re.compile(r"^<!-- deploy-test: ([\w-]+) -->\n```bash\n(.*?)^```$", re.M | re.S)
#: The guide's runnable steps, in order.
GUIDE_STEPS = [
    "env",
    "certs",
    "keys",
    "superlink",
    "connection",
    "register",
    "supernodes",
    "online",
    "run",
    "stop",
    "reset",
]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _run_config(results: Path, rounds: int, **extra: object) -> str:
    values = {
        "preset": "smoke",
        "num-server-rounds": rounds,
        "server-epochs": 1,
        "results-dir": str(results),
        "run-name": "run",
        **extra,
    }
    return " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in values.items())


def test_tls_node_auth_federation_survives_a_killed_supernode_that_rejoins(tmp_path):
    """TLS + node authentication; SIGKILL one SuperNode in round 2, restart it; a stranger is refused.

    Round 1 and 3 have both nodes, round 2 finishes with the surviving node;
    one federation covers both deployment properties (the processes are the
    slow part of this file).
    """
    results = tmp_path / "results"
    fed = Federation(
        tmp_path / "fed", 2, auth=True, node_config={"state-dir": str(tmp_path / "state-{i}")}
    )
    killed = rejoined = False
    lines: list[str] = []
    try:
        fed.start()
        proc = fed.submit(
            _run_config(results, 3, **{"node-wait-timeout": 120.0, "round-timeout": 300.0})
        )
        deadline = time.monotonic() + 600
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "[ROUND 2/3]" in line and not killed:
                fed.kill_supernode(1, signal.SIGKILL)  # no goodbye: the SuperLink must notice
                killed = True
            if killed and not rejoined and "train reply of node" in line and "rejected" in line:
                # The loss was noticed: restart, same key, node config and state-dir.
                fed.start_supernode(1)
                rejoined = True
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        proc.wait()
        log = "".join(lines)
        run_id = fed.run_id(log)
        assert run_id is not None and fed.status(run_id) == "finished:completed", log[-3000:]
        # A SuperNode whose key was never registered is refused (node authentication).
        stranger = tmp_path / "stranger"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(stranger)],
            check=True,
        )
        fed.start_supernode(2, key=stranger)
        time.sleep(10)
        assert len(fed.online_nodes()) == 2
    finally:
        fed.stop()
    assert fed.leftover_processes() == []
    assert killed and rejoined
    history = _csv(results / "run" / "metrics.csv")
    assert [int(float(h["nodes-replied"])) for h in history] == [2, 1, 2]
    assert float(history[-1]["accuracy"]) > 0.3  # above chance (0.1)
    rows = _csv(results / "run" / "nodes.csv")
    for rnd in ("1", "3"):
        for stage in ("train", "evaluate"):
            got = [r for r in rows if r["round"] == rnd and r["stage"] == stage]
            assert len({r["node-id"] for r in got}) == 2, got
            assert all(r["status"] == "accepted" for r in got), got
    round2 = [r for r in rows if r["round"] == "2" and r["stage"] == "train"]
    lost = [r for r in round2 if r["status"] != "accepted"]
    assert len(lost) == 1 and lost[0]["status"] == "error", round2
    assert f"train reply of node {lost[0]['node-id']} rejected: node error" in log
    assert all((tmp_path / f"state-{i}" / "gkt-node-state.pt").is_file() for i in (0, 1))


def test_split_learning_round_trips_across_real_supernodes(tmp_path):
    """One SL round across two SuperNodes: every mini-batch a real message round trip.

    ``python -m deploy.loopback --algorithm sl``'s app (``split_app``'s
    components, ``split-mode='sl'``); 30 samples per node, one mini-batch
    each: per node a ``begin`` wave (weights down, activations up) and a
    ``step`` wave (gradient down, trained weights up), node after node, so 4
    waves, each a ClientApp process on a SuperNode (about 9 s apiece on 2
    busy cores: ``docs/split-learning.md``).
    """
    results = tmp_path / "results"
    fed = Federation(tmp_path / "fed", 2)
    app, run_config = algorithm_app(
        fed.workdir,
        "sl",
        _run_config(results, 1, **{"data-fraction": 0.001, "test-fraction": 0.01}),
    )
    assert app is not None and "split-mode='sl'" in run_config
    assert "flwr_gkt.app.split_app:client_app" in (app / "pyproject.toml").read_text()
    started = time.monotonic()
    try:
        fed.start()
        status, log = fed.run(run_config, timeout=300, app=app)
    finally:
        fed.stop()
    assert fed.leftover_processes() == []
    assert status == "finished:completed", log[-3000:]
    (row,) = _csv(results / "run" / "metrics.csv")
    assert int(float(row["nodes-replied"])) == 2 and int(float(row["nodes-rejected"])) == 0
    assert int(float(row["server-train-examples"])) == 60
    assert int(float(row["waves"])) == 4 and int(float(row["messages-down"])) == 4
    for column in ("bytes-activations", "bytes-gradients", "bytes-edge-weights-up"):
        assert float(row[column]) > 0, column
    assert int(float(row["eval-nodes"])) == 2 and float(row["bytes-up-eval"]) > 0
    # The nodes took their turns one after the other, every reply accepted.
    train = [r for r in _csv(results / "run" / "nodes.csv") if r["stage"] != "evaluate"]
    assert [r["stage"] for r in train] == ["begin", "step", "begin", "step"]
    assert train[0]["node-id"] == train[1]["node-id"] != train[2]["node-id"] == train[3]["node-id"]
    assert all(r["status"] == "accepted" for r in train), train
    print(
        f"SL over loopback: {float(row['seconds-per-wave']):.2f} s per wave, "
        f"{time.monotonic() - started:.0f} s in all"
    )


# ------------------------------------------------------------ deploy/README.md


def guide_blocks() -> list[tuple[str, str]]:
    """``(name, commands)`` of every marked bash block of the guide, in order."""
    return [(m[1], m[2]) for m in GUIDE_BLOCK.finditer(GUIDE.read_text(encoding="utf-8"))]


def _steps_section() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    return text[text.index("## Step by step") : text.index("## When a node fails")]


def test_guide_marks_every_command_of_its_steps():
    """Every bash block of the step-by-step section is one the guide test runs."""
    assert [name for name, _ in guide_blocks()] == GUIDE_STEPS
    steps = _steps_section()
    assert len(re.findall(r"^```bash$", steps, re.M)) == len(GUIDE_STEPS)
    assert all(f"<!-- deploy-test: {name} -->" in steps for name in GUIDE_STEPS)
    assert "pkill" not in steps and "killall" not in steps  # stop by recorded PID only


@pytest.mark.parametrize("case", ["flwr-home", "default-home", "existing-config"])
def test_guide_connection_step_is_idempotent(tmp_path, case):
    """Step 4 writes one valid ``[superlink.gkt]`` table to ``${FLWR_HOME:-$HOME/.flwr}``."""
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(home), "SUPERLINK_PORT": "8123"}
    if case == "default-home":
        config = home / ".flwr" / "config.toml"
    else:
        env["FLWR_HOME"] = str(tmp_path / "flwr-home")
        config = tmp_path / "flwr-home" / "config.toml"
    if case == "existing-config":  # as Flower writes it, here without a final newline
        config.parent.mkdir()
        config.write_text(
            '[superlink]\ndefault = "local"\n\n[superlink.local]\noptions.num-supernodes = 10'
        )
    block = dict(guide_blocks())["connection"]
    for _ in range(2):
        subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, check=True)
    text = config.read_text()
    assert text.count("[superlink.gkt]") == 1, text
    assert tomllib.loads(text)["superlink"]["gkt"] == {
        "address": "127.0.0.1:8123",
        "root-certificates": f"{tmp_path}/deploy/certificates/ca.crt",
    }
    if case == "existing-config":
        assert tomllib.loads(text)["superlink"]["default"] == "local"


def _not_copied(directory: str, names: list[str]) -> set[str]:
    """What a fresh checkout does not have (``shutil.copytree``'s ``ignore``)."""
    skip = {".git", ".venv", "results", "__pycache__", ".pytest_cache", ".ruff_cache"}
    skip |= {".mypy_cache", ".hypothesis", "build", "dist"}
    out = {n for n in names if n in skip or n.endswith(".egg-info")}
    if Path(directory).resolve() == ROOT / "deploy":  # what the guide writes there
        out |= {n for n in names if n in {"certificates", "keys", "ca-private"}}
        out |= {n for n in names if n.startswith(("state-", "superlink.db"))}
        out |= {n for n in names if n.endswith((".log", ".pid"))}
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_guide_runs_verbatim(tmp_path):
    """deploy/README.md's steps 0-7 and its reset, as written, in a fresh copy of the repository.

    Empty ``HOME``, a temporary ``FLWR_HOME``, free ports through the guide's
    ``SUPERLINK_PORT`` / ``NODE1_PORT`` / ``NODE2_PORT``, and through its
    ``RUN_CONFIG`` one round of the ``smoke`` preset (the guide's default has
    two; each round costs a ClientApp process start per node and message). The
    run must finish as ``completed`` and write its results; step 7 must stop
    every process the guide started (their recorded PIDs, and every process in
    the script's session).
    """
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=_not_copied, symlinks=True)
    assert (Path(sys.prefix) / "bin" / "activate").is_file(), "needs a virtual environment"
    (repo / ".venv").symlink_to(sys.prefix, target_is_directory=True)
    home = tmp_path / "home"
    home.mkdir()
    pids_file = tmp_path / "started.pids"
    parts = []
    for name, commands in guide_blocks():
        if name == "stop":  # (test) what step 7 has to stop
            parts.append(f"cat deploy/*.pid > {shlex.quote(str(pids_file))}")
        parts.append(f"# ---- deploy/README.md: {name}\n{commands}")
    script = tmp_path / "guide.sh"
    script.write_text("\n".join(parts) + "\n")
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    env = {
        **{k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
        "HOME": str(home),
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "RUN_CONFIG": "preset='smoke' num-server-rounds=1",
        **dict(
            zip(
                ["SUPERLINK_PORT", "NODE1_PORT", "NODE2_PORT"], map(str, sorted(ports)), strict=True
            )
        ),
    }
    started = time.monotonic()
    proc = subprocess.Popen(
        ["bash", "-euo", "pipefail", str(script)],
        cwd=repo,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # every process the guide starts is in this session
    )
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        out += "\n(test) killed after 300 s"
    finally:
        deadline = time.monotonic() + 15  # flower-superexec follows its parent within a second
        while (left := session_processes({proc.pid})) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - started
    logs = "".join(
        f"\n---- {log.name}\n{log.read_text(errors='replace')[-2000:]}"
        for log in sorted((repo / "deploy").glob("*.log"))
    )
    assert proc.returncode == 0, f"{script} failed:\n{out[-4000:]}{logs}"
    assert '"status": "finished:completed"' in out, out[-4000:]
    pids = [int(p) for p in pids_file.read_text().split()]
    assert len(pids) == 3  # SuperLink + 2 SuperNodes
    assert not [p for p in pids if _alive(p)], "step 7 left a process it started running"
    assert left == [], left
    runs = list((repo / "results").glob("*/metrics.csv"))
    assert len(runs) == 1, runs
    history = _csv(runs[0])
    assert [int(float(h["nodes-replied"])) for h in history] == [2]
    assert (runs[0].parent / "nodes.csv").is_file()
    # The reset removed what the steps wrote, the results stay.
    assert not list((repo / "deploy").glob("superlink.db*"))
    assert not (repo / "deploy" / "keys").exists()
    assert not list((repo / "deploy").glob("*.pid"))
    print(f"guide run: {elapsed:.0f} s")

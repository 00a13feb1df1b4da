"""Real deployment on loopback: flower-superlink + flower-supernode processes, TLS.

Each test starts a SuperLink and two SuperNodes as separate processes speaking
HTTPS on 127.0.0.1 (certificates generated in the test), submits the app with
``flwr run`` through a connection in a private Flower config, and stops every
process it started (checked: nothing is left in their sessions).
"""

import csv
import signal
import subprocess
import time
from pathlib import Path

from deploy.loopback import Federation


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

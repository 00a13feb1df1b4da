"""Checkpoint/resume (SIGKILL), fault injection, hostile payloads, training guard."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flwr_gkt.app.client_app import make_client_app
from flwr_gkt.app.inprocess import run_inprocess
from flwr_gkt.app.server_app import make_server_app
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import resolve_config
from flwr_gkt.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flwr_gkt.flower.faults import FaultPlan, parse_faults

ROOT = Path(__file__).resolve().parents[2]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------ checkpoint files
def test_checkpoint_roundtrip_and_interrupted_save_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    assert load_checkpoint(path) is None
    save_checkpoint(path, {"round": 1, "w": torch.arange(4.0)})
    state = load_checkpoint(path)
    assert state["round"] == 1 and torch.equal(state["w"], torch.arange(4.0))

    def crash(*_):  # the process dies between writing the new file and renaming it
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"round": 2, "w": torch.zeros(4)})
    monkeypatch.undo()
    assert load_checkpoint(path)["round"] == 1  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left

    # A temporary file left by a SIGKILL mid-write is ignored and cleaned up.
    (tmp_path / "ckpt.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert load_checkpoint(path)["round"] == 1
    assert not (tmp_path / "ckpt.pt.abc123.tmp").exists()


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"round": 3, "w": torch.ones(1000)})
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF  # one flipped byte in the payload
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="checksum"):
        load_checkpoint(path)
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    torch.save({"round": 3}, path)  # a plain torch file is not a checkpoint
    with pytest.raises(CheckpointError, match="not a flwr-gkt checkpoint"):
        load_checkpoint(path)


def test_rng_state_roundtrip():
    import random

    import numpy as np

    gen = torch.Generator().manual_seed(5)
    state = rng_state(gen)
    first = (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=gen).item(),
    )
    set_rng_state(state, gen)
    assert (
        random.random(),
        np.random.rand(),
        torch.rand(1).item(),
        torch.rand(1, generator=gen).item(),
    ) == first


# ------------------------------------------------------------- SIGKILL and resume
def _sim_cmd(results: Path, name: str, state_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "simulation",
        "--preset",
        "smoke",
        "--runtime",
        "inprocess",
        "--set",
        f"results-dir={results}",
        f"run-name={name}",
        "num-server-rounds=3",
        "server-epochs=1",
        f"node-state-dir={state_dir}",
        *extra,
    ]


def test_sigkill_during_a_round_then_resume_finishes_like_an_uninterrupted_run(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Reference: the same run without interruption.
    ref = subprocess.run(
        _sim_cmd(results, "ref", tmp_path / "ref-nodes"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ref_history = _csv(results / "ref" / "metrics.csv")  # the in-process runtime runs the whole app
    assert [
        (int(h["round"]), int(h["nodes-replied"]), int(h["nodes-rejected"])) for h in ref_history
    ] == [(1, 2, 0), (2, 2, 0), (3, 2, 0)]
    assert float(ref_history[-1]["accuracy"]) > max(
        0.3, float(ref_history[0]["accuracy"])
    )  # chance: 0.1

    # Killed: SIGKILL in the middle of round 3 -- the nodes have trained and saved their round-3
    # state, the server has trained, the round's evaluation and checkpoint have not happened.
    proc = subprocess.Popen(
        _sim_cmd(results, "run", tmp_path / "nodes"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "FedGKT round 3 train:" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(lines)[-3000:]
    run_dir = results / "run"
    before = load_checkpoint(run_dir / "checkpoint.pt")
    assert before["round"] == 2
    assert not (run_dir / "metrics.csv").exists()  # the run did not get to its end
    assert len(before["server"]["logits"]) == 2  # Z_s of both nodes
    for node in ("node-0", "node-1"):  # the nodes are a round ahead of the server's checkpoint
        assert torch.load(tmp_path / "nodes" / node / "gkt-node-state.pt")["round"] == 3
        assert torch.load(tmp_path / "nodes" / node / "gkt-node-state.prev.pt")["round"] == 2

    resumed = subprocess.run(
        _sim_cmd(results, "run", tmp_path / "nodes", "resume=1"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-3000:]
    assert "resumed from" in log and "after round 2" in log
    assert "[ROUND 1/3]" not in log and "[ROUND 3/3]" in log
    assert log.count("(saved after round 2)") == 2  # each node went back to its state after round 2
    after = load_checkpoint(run_dir / "checkpoint.pt")
    assert after["round"] == 3
    history = _csv(run_dir / "metrics.csv")
    assert [int(float(h["round"])) for h in history] == [1, 2, 3]

    # Same per-node state as before the kill, hence the same run as without it.
    reference = load_checkpoint(results / "ref" / "checkpoint.pt")
    assert reference["round"] == 3
    assert before["server"]["logits"].keys() == after["server"]["logits"].keys()
    for node, logits in reference["server"]["logits"].items():
        assert torch.allclose(after["server"]["logits"][node], logits, atol=1e-5), node
    for key, value in reference["server"]["model"].items():
        assert torch.allclose(after["server"]["model"][key].float(), value.float(), atol=1e-5), key
    assert [h["accuracy"] for h in history] == pytest.approx([h["accuracy"] for h in ref_history])


# ------------------------------------------------------------------ fault injection
def test_fault_plan_parsing_and_random_faults_are_reproducible():
    assert [(f.kind, f.node, f.first, f.last) for f in parse_faults("crash:1@2-3, late:0@4")] == [
        ("crash", 1, 2, 3),
        ("late", 0, 4, 4),
    ]
    with pytest.raises(ValueError):
        parse_faults("explode:1@2")
    plan = FaultPlan(parse_faults("timeout:0@1"), rate=0.3, seed=7)
    drawn = [plan.fault(n, r) for n in range(5) for r in range(1, 21)]
    assert plan.fault(0, 1) == "timeout"
    assert drawn == [
        FaultPlan(parse_faults("timeout:0@1"), rate=0.3, seed=7).fault(n, r)
        for n in range(5)
        for r in range(1, 21)
    ]
    assert 10 < sum(d is not None for d in drawn) < 50  # ~30% of 100
    assert {d for d in drawn if d} == {"crash", "timeout", "late", "duplicate"}


def test_crash_timeout_late_and_duplicate_replies_the_rounds_go_on(tmp_path):
    cfg = resolve_config(
        {
            "preset": "smoke",
            "num-clients": 3,
            "min-nodes": 3,
            "num-server-rounds": 3,
            "server-epochs": 1,
            "round-timeout": 2.0,
            "results-dir": str(tmp_path),
            "run-name": "faults",
            # node indices 0, 1, 2 = the nodes in node-id order
            "faults": "late:2@1, crash:0@2, timeout:1@2, duplicate:2@3",
        },
        PRESETS_DIR,
    )
    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    out = tmp_path / "faults"
    history = {int(float(h["round"])): h for h in _csv(out / "metrics.csv")}
    nodes = _csv(out / "nodes.csv")
    ids = sorted({int(r["node-id"]) for r in nodes})
    assert len(ids) == 3

    def status(rnd, stage, node):
        return [
            r["status"]
            for r in nodes
            if int(r["round"]) == rnd and r["stage"] == stage and int(r["node-id"]) == ids[node]
        ]

    # Round 1: node 2 answers after the deadline -> lost for the round; its late train reply
    # turns up during the evaluation and is ignored there.
    assert status(1, "train", 2) == ["lost"] and int(float(history[1]["nodes-replied"])) == 2
    # it is not asked to evaluate: its edge model has not trained yet (only nodes that
    # trained are evaluated)
    assert status(1, "evaluate", 2) == ["late"]
    # Round 2: node 0 crashed (error reply), node 1 timed out (lost); node 2 is served again
    # (it had no evaluation instruction in round 1, so no late reply turns up).
    assert status(2, "train", 0) == ["error"]
    assert status(2, "train", 1) == ["lost"]
    assert status(2, "train", 2) == ["accepted"]
    assert (
        int(float(history[2]["nodes-replied"])) == 1 and int(float(history[2]["nodes-lost"])) == 1
    )
    assert int(float(history[2]["replies-late"])) == 0
    assert float(history[2]["server-train-examples"]) > 0  # the server still trained (>= 1 reply)
    # Round 3: everybody is back; node 2's second copy is ignored, not counted twice.
    assert (
        int(float(history[3]["nodes-replied"])) == 3
        and int(float(history[3]["replies-duplicate"])) == 1
    )
    assert status(3, "train", 2) == ["accepted", "duplicate"]
    assert status(3, "evaluate", 2) == ["accepted", "duplicate"]
    assert int(float(history[3]["eval-nodes"])) == 3
    assert float(history[3]["accuracy"]) > 0.3  # above chance (0.1)
    import json

    injected = json.loads((out / "results.json").read_text())["faults-injected"]
    assert injected == {
        "late": 1,  # train only: node 2 is not evaluated before it has trained
        "crash": 2,
        "timeout": 2,
        "duplicate": 2,
    }  # train + evaluate each


def test_resume_finds_the_nodes_again_under_new_node_ids(tmp_path, caplog):
    from flwr.app import Context, RecordDict

    from flwr_gkt.app.inprocess import InProcessGrid

    values = {
        "preset": "smoke",
        "server-epochs": 1,
        "results-dir": str(tmp_path),
        "run-name": "r",
        "node-state-dir": str(tmp_path / "nodes"),  # holds each node's token across the restart
    }
    cfg = resolve_config({**values, "num-server-rounds": 1}, PRESETS_DIR)
    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)  # nodes 1001, 1002
    before = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert sorted(before["node-uids"].values()) == ["partition-0-of-2", "partition-1-of-2"]

    # A restarted federation: same partitions, new node ids, fresh node contexts; each node
    # answers the identity query with the token kept in its state dir (a bare uid gets nothing).
    cfg = resolve_config({**values, "num-server-rounds": 2, "resume": 1}, PRESETS_DIR)
    grid = InProcessGrid(make_client_app(cfg), 2, node_ids=[2001, 2002])
    with caplog.at_level("INFO"):
        make_server_app(cfg)(
            grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        )
    assert "2 of 2 checkpointed nodes found (2 under a new node id)" in caplog.text
    after = load_checkpoint(tmp_path / "r" / "checkpoint.pt")
    assert sorted(after["server"]["logits"]) == [2001, 2002]
    rows = [
        r for r in _csv(tmp_path / "r" / "nodes.csv") if r["round"] == "2" and r["stage"] == "train"
    ]
    # each node got its own Z_s of round 1 back and distilled from it
    assert sorted(int(r["node-id"]) for r in rows) == [2001, 2002]
    assert all(r["status"] == "accepted" and float(r["used-server-logits"]) == 1.0 for r in rows)


def test_async_mode_checkpoints_each_round_and_resumes(tmp_path, caplog):
    values = {
        "preset": "smoke",
        "server-epochs": 1,
        "server-mode": "async",
        "results-dir": str(tmp_path),
        "run-name": "a",
    }
    cfg = resolve_config({**values, "num-server-rounds": 1}, PRESETS_DIR)
    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["round"] == 1
    cfg = resolve_config({**values, "num-server-rounds": 2, "resume": 1}, PRESETS_DIR)
    with caplog.at_level("INFO"):
        run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    assert "resuming after round 1 of 2" in caplog.text
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["round"] == 2
    history = _csv(tmp_path / "a" / "metrics.csv")
    assert [int(float(h["round"])) for h in history] == [1, 2]
    assert int(float(history[1]["nodes-replied"])) == 2 and float(history[1]["accuracy"]) > 0.1

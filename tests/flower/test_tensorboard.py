"""TensorBoard: every round's metrics and node table in the event file (tensorboard-dir)."""

import csv
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from flwr_gkt.app.client_app import make_client_app
from flwr_gkt.app.fedavg_app import make_fedavg_apps
from flwr_gkt.app.inprocess import run_inprocess
from flwr_gkt.app.legacy_app import make_legacy_apps
from flwr_gkt.app.server_app import make_server_app
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import RunConfig, resolve_config
from flwr_gkt.flower.strategy_utils import call_on_round
from flwr_gkt.flower.tensorboard import (
    TensorBoardWriter,
    node_table,
    open_tensorboard,
    scalar_tag,
)

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util import tensor_util


def _events(path: Path) -> EventAccumulator:
    events = EventAccumulator(str(path), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def _texts(events: EventAccumulator, tag: str) -> dict[int, str]:
    return {
        e.step: tensor_util.make_ndarray(e.tensor_proto).item().decode()
        for e in events.Tensors(f"{tag}/text_summary")
    }


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def _as_stored(value: str) -> float:
    """A CSV value as TensorBoard stores it (a 32-bit float)."""
    return float(np.float32(float(value)))


#: A smaller smoke run: 150 images per node, 200 test images, one server epoch.
_SMALL = {"server-epochs": 1, "data-fraction": 0.005, "test-fraction": 0.02}


def _config(tmp_path: Path, run_name: str, **overrides: object) -> RunConfig:
    """The smoke preset, with results and TensorBoard events under ``tmp_path``."""
    return resolve_config(
        {
            "preset": "smoke",
            "results-dir": str(tmp_path / "results"),
            "run-name": run_name,
            "tensorboard-dir": str(tmp_path / "tb"),
            **overrides,
        },
        PRESETS_DIR,
    )


def _run(
    tmp_path: Path,
    run_name: str,
    make_apps: Callable[[RunConfig], tuple[ServerApp, ClientApp]],
    **overrides: object,
) -> tuple[list[dict[str, str]], EventAccumulator]:
    """Run the apps in process; return the metrics.csv rows and the run's events."""
    cfg = _config(tmp_path, run_name, **overrides)
    run_inprocess(*make_apps(cfg), cfg.num_clients)
    rows = _csv(tmp_path / "results" / run_name / "metrics.csv")
    return rows, _events(tmp_path / "tb" / run_name)  # <tensorboard-dir>/<run name>


def _assert_every_metric_is_written(events: EventAccumulator, rows: list[dict[str, str]]) -> None:
    """Each metrics.csv column is a scalar tag with one value per round, equal to the CSV's."""
    rounds = [int(float(r["round"])) for r in rows]
    assert rounds == [1, 2]
    scalars = set(events.Tags()["scalars"])
    for column in rows[0]:
        tag = scalar_tag(column)
        if tag is None:
            continue
        assert tag in scalars, column
        written = events.Scalars(tag)
        values = {r["round"]: r[column] for r in rows if r[column] != ""}
        assert [e.step for e in written] == [int(float(k)) for k in values], column
        assert [e.value for e in written] == [_as_stored(v) for v in values.values()], column


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_fedgkt_run_writes_every_round_and_its_node_table(tmp_path, mode):
    rows, events = _run(
        tmp_path,
        "tb",
        lambda cfg: (make_server_app(cfg), make_client_app(cfg)),
        **_SMALL,
        **{
            "server-mode": mode,
            # a rejected reply with its reason in the node table (sync: round 2's train stage)
            "faults": "crash:1@2" if mode == "sync" else "",
        },
    )

    accuracy = events.Scalars("evaluate/accuracy")
    assert [e.step for e in accuracy] == [1, 2]
    assert [e.value for e in accuracy] == [_as_stored(r["accuracy"]) for r in rows]
    for tag, column in [("bytes/up-train", "bytes-up-train"), ("bytes/up-eval", "bytes-up-eval")]:
        assert [e.value for e in events.Scalars(tag)] == [_as_stored(r[column]) for r in rows]
    assert "train/server-loss" in events.Tags()["scalars"]
    assert "time/round-seconds" in events.Tags()["scalars"]
    _assert_every_metric_is_written(events, rows)

    tables = _texts(events, "nodes")
    assert sorted(tables) == [1, 2]
    nodes = _csv(tmp_path / "results" / "tb" / "nodes.csv")
    for step, table in tables.items():
        assert "| stage | node | status |" in table
        for record in (r for r in nodes if int(r["round"]) == step):
            assert f"| {record['stage']} | {record['node-id']} | {record['status']} |" in table
    if mode == "sync":
        assert "train: 1 accepted, 1 error" in tables[2]
        crashed = next(r for r in nodes if r["round"] == "2" and r["status"] == "error")
        assert crashed["reason"] and crashed["reason"].replace("|", "\\|") in tables[2]
    assert "| run-name | tb |" in _texts(events, "config")[0]


def test_a_fedavg_run_writes_every_round(tmp_path):
    rows, events = _run(tmp_path, "avg", make_fedavg_apps)
    assert [e.step for e in events.Scalars("evaluate/accuracy")] == [1, 2]
    assert {"train/loss", "bytes/up-train", "bytes/down-eval", "time/round-seconds"} <= set(
        events.Tags()["scalars"]
    )
    _assert_every_metric_is_written(events, rows)


def test_a_legacy_api_run_writes_every_round(tmp_path):
    rows, events = _run(tmp_path, "legacy", make_legacy_apps, **_SMALL)
    assert [e.step for e in events.Scalars("evaluate/accuracy")] == [1, 2]
    _assert_every_metric_is_written(events, rows)


def test_scalar_tags():
    assert scalar_tag("round") is None
    expected = {
        "accuracy": "evaluate/accuracy",
        "edge-loss": "evaluate/edge-loss",
        "eval-nodes": "evaluate/nodes",
        "server-train-loss": "train/server-loss",
        "edge-train-accuracy": "train/edge-accuracy",
        "train-loss": "train/loss",
        "cloud-train-loss": "train/cloud-loss",
        "bytes-up-train": "bytes/up-train",
        "bytes-teach-down-edge": "bytes/teach-down-edge",
        "round-seconds": "time/round-seconds",
        "edge-seconds-max": "time/edge-seconds-max",
        "nodes-lost": "nodes/lost",
        "replies-late": "replies/late",
        "store-memory-mb": "store/memory-mb",
        "staleness-max": "staleness/max",
        "server-lr-factor": "server/lr-factor",
        "leaves": "metrics/leaves",
    }
    assert {key: scalar_tag(key) for key in expected} == expected


def test_the_node_table_escapes_and_summarises():
    table = node_table(
        [
            {"round": 1, "stage": "train", "node-id": 7, "status": "accepted", "bytes-up": 10.0},
            {"round": 1, "stage": "train", "node-id": 8, "status": "rejected", "reason": "a|b\nc"},
            {"round": 1, "stage": "evaluate", "node": "end-0", "status": "lost"},
        ]
    )
    lines = table.splitlines()
    assert lines[0] == "train: 1 accepted, 1 rejected; evaluate: 1 lost"
    assert lines[2] == "| stage | node | status | bytes-up | reason |"
    assert "| train | 7 | accepted | 10 |  |" in lines
    assert "| train | 8 | rejected |  | a\\|b c |" in lines
    assert "| evaluate | end-0 | lost |  |  |" in lines
    assert node_table([]) == "no node records"


def test_the_writer_skips_what_is_not_a_number(tmp_path):
    with TensorBoardWriter(tmp_path) as writer:
        writer({"round": 3, "accuracy": 0.5, "api": "legacy", "flag": True}, [])  # type: ignore[dict-item]
    events = _events(tmp_path)
    assert events.Tags()["scalars"] == ["evaluate/accuracy"]
    assert [(e.step, e.value) for e in events.Scalars("evaluate/accuracy")] == [(3, 0.5)]
    assert events.Tags()["tensors"] == []  # no node records, no config: no text


def test_a_failing_round_callback_does_not_end_the_run(caplog):
    def broken(row, records):
        raise OSError("disk full")

    seen = []
    history = [{"round": 1.0, "accuracy": 0.1}, {"round": 2.0, "accuracy": 0.2}]
    nodes = [{"round": 1, "node-id": 1}, {"round": 2, "node-id": 1}, {"round": 2, "node-id": 2}]
    call_on_round(lambda row, records: seen.append((row, records)), history, nodes, 2)
    assert seen == [(history[1], nodes[1:])]
    call_on_round(lambda row, records: seen.append(row), history, nodes, 3)  # no row: no call
    assert len(seen) == 1
    with caplog.at_level(logging.WARNING):
        call_on_round(broken, history, nodes, 1)
    assert "disk full" in caplog.text


def test_without_tensorboard_a_run_fails_before_its_first_round(tmp_path, monkeypatch):
    assert open_tensorboard("", "run") is None  # nothing asked: nothing imported
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install flwr-gkt\[tensorboard\]"):
        open_tensorboard(str(tmp_path / "tb"), "run")
    cfg = _config(tmp_path, "r")
    with pytest.raises(ImportError, match="tensorboard-dir needs the tensorboard package"):
        run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    assert not (tmp_path / "results" / "r" / "metrics.csv").exists()
    assert not (tmp_path / "tb").exists()


def test_importing_the_package_does_not_import_tensorboard():
    code = (
        "import sys\n"
        "import flwr_gkt, flwr_gkt.flower.strategy, flwr_gkt.flower.async_strategy\n"
        "import flwr_gkt.flower.tensorboard, flwr_gkt.app.server_app, flwr_gkt.app.fedavg_app\n"
        "assert not [m for m in sys.modules if m.startswith(('tensorboard', 'torch.utils.tensorboard'))]\n"
    )
    root = Path(__file__).parents[2]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=120)

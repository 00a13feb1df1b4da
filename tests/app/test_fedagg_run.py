"""FedAgg over a Flower federation (in-process runtime): 3 tiers, migration, 2 tiers."""

import csv
import json

import pytest
from flwr.app import Context, RecordDict

from flwr_gkt.app.fedagg_app import make_fedagg_apps
from flwr_gkt.app.inprocess import InProcessGrid
from flwr_gkt.app.task import PRESETS_DIR
from flwr_gkt.config import resolve_config


@pytest.fixture(scope="module")
def bridge(bridge_autoencoder):
    return bridge_autoencoder[0]


class RecordingGrid(InProcessGrid):
    """Keeps every train instruction and reply with its round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []  # (round, message): instructions and their replies
        self._round = {}

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg, msg_id in zip(messages, ids, strict=True):
            if msg.metadata.message_type == "train":
                self._round[msg_id] = int(msg.content.config_records["config"]["server-round"])
                self.seen.append((self._round[msg_id], msg))
        return ids

    def pull_messages(self, message_ids):
        replies = list(super().pull_messages(message_ids))
        self.seen += [
            (self._round[r.metadata.reply_to_message_id], r)
            for r in replies
            if r.metadata.reply_to_message_id in self._round and r.has_content()
        ]
        return replies


def _run(tmp_path, bridge, name, **values):
    cfg = resolve_config(
        {
            "preset": "smoke",
            "data-fraction": 0.005,
            "results-dir": str(tmp_path),
            "run-name": name,
            "bridge-autoencoder": str(bridge),
            "edge-tier-model": "cnn",
            "cloud-model": "cnn",
            "batch-size": 16,
            "edge-optimizer": "adam",
            "edge-lr": 0.003,
            **values,
        },
        PRESETS_DIR,
    )
    server, client = make_fedagg_apps(cfg)
    grid = RecordingGrid(client, cfg.num_clients + cfg.fedagg_edges)
    server(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    out = tmp_path / name
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f)), json.loads((out / "results.json").read_text()), grid


def test_three_tiers_with_a_migration_mid_run(tmp_path, bridge, caplog):
    with caplog.at_level("INFO"):
        history, results, _ = _run(
            tmp_path,
            bridge,
            "tree",
            **{
                "num-clients": 6,
                "fedagg-edges": 2,
                "num-server-rounds": 3,
                "fedagg-migrate": "end-3:edge-0@2",
            },
        )
    assert "node end-3 migrated from edge-1 to edge-0" in caplog.text
    assert results["migrations"] == [[2, "end-3", "edge-1", "edge-0"]]
    assert [int(float(h["nodes-learned"])) for h in history] == [
        8,
        8,
        8,
    ]  # 6 ends + 2 edges every round
    assert [int(float(h["migrations"])) for h in history] == [0, 1, 0]
    # round 1: every end's embeddings go up once; round 2: only the migrated subtree's go to its new edge
    assert (
        float(history[0]["bytes-init-end-edge"]) > 0
        and float(history[0]["bytes-init-edge-cloud"]) > 0
    )
    assert float(history[1].get("bytes-init-end-edge") or 0) == 0
    assert (
        0
        < float(history[1]["bytes-init-edge-cloud"])
        < float(history[0]["bytes-init-edge-cloud"]) / 2
    )
    assert float(history[2].get("bytes-init-edge-cloud") or 0) == 0
    for tier in ("end-edge", "edge-cloud"):
        assert (
            float(history[2][f"bytes-logits-up-{tier}"]) > 0
            and float(history[2][f"bytes-logits-down-{tier}"]) > 0
        )
    assert float(history[-1]["accuracy"]) > 0.2  # cloud model, chance 0.1


def test_two_tiers_and_logits_only_after_the_first_round(tmp_path, bridge):
    tensorboard = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    history, _, grid = _run(
        tmp_path,
        bridge,
        "flat",
        **{
            "num-clients": 3,
            "fedagg-edges": 0,
            "num-server-rounds": 2,
            "tensorboard-dir": str(tmp_path / "tb"),
        },
    )
    events = tensorboard.EventAccumulator(str(tmp_path / "tb" / "flat"))
    events.Reload()  # every round's row, as it completed (tests/flower/test_tensorboard.py for FedGKT)
    assert [e.step for e in events.Scalars("evaluate/accuracy")] == [1, 2]
    assert [e.value for e in events.Scalars("bytes/logits-up-end-cloud")][-1] == pytest.approx(
        float(history[1]["bytes-logits-up-end-cloud"]), rel=1e-6
    )
    assert [e.step for e in events.Tensors("nodes/text_summary")] == [1, 2]
    assert [int(float(h["nodes-learned"])) for h in history] == [3, 3]
    assert (
        "bytes-logits-up-end-cloud" in history[1]
        and float(history[1]["bytes-logits-down-end-cloud"]) > 0
    )

    def arrays(rnd):
        return [
            (k, a.shape)
            for r, m in grid.seen
            if r == rnd
            for rec in m.content.array_records.values()
            for k, a in rec.items()
        ]

    assert any(k == "embeddings" for k, _ in arrays(1))  # round 1: the one-time upload
    round2 = arrays(2)
    assert len(round2) >= 6 and all(len(s) == 2 and s[1] == 10 for _, s in round2), (
        round2
    )  # logits only
    assert float(history[-1]["accuracy"]) > 0.15

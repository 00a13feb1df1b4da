"""Heterogeneous edge models: each node its own edge model, one shared feature shape."""

import csv
import dataclasses
import json
import logging
from pathlib import Path

import pytest
from torch import nn

from flwr_gkt.app.client_app import make_client_app
from flwr_gkt.app.inprocess import run_inprocess
from flwr_gkt.app.server_app import make_server_app
from flwr_gkt.app.task import (
    PRESETS_DIR,
    edge_builder,
    federation_edge_models,
    model_costs,
    node_setup,
)
from flwr_gkt.config import resolve_config
from flwr_gkt.core import registry
from flwr_gkt.core.models import FEATURE_CHANNELS, EdgeModel

USER_MODEL = "tiny-conv"  # a user's edge model: 16 x H x W features, like the ResNets
NARROW_MODEL = "narrow-conv"  # an extractor that outputs 8 channels: not what the server takes


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _edge(channels: int):
    def build(num_classes: int, in_channels: int) -> EdgeModel:
        classifier = nn.Sequential(
            _conv(channels, 16, stride=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)
        )
        return EdgeModel(_conv(in_channels, channels), classifier)

    return build


@pytest.fixture
def user_models(monkeypatch):
    """The two models registered for this test only."""
    monkeypatch.setitem(registry._EDGE, USER_MODEL, _edge(FEATURE_CHANNELS))
    monkeypatch.setitem(registry._EDGE, NARROW_MODEL, _edge(8))


def _cfg(tmp_path: Path, name: str, **values):
    return resolve_config(
        {
            "preset": "smoke",
            "num-clients": 3,
            "min-nodes": 3,
            "results-dir": str(tmp_path),
            "run-name": name,
            "edge-precision": "fp32",
            "server-precision": "fp32",
            **values,
        },
        PRESETS_DIR,
    )


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_node_config_beats_the_edge_models_list_which_beats_edge_model(user_models):
    cfg = resolve_config(
        {"preset": "smoke", "edge-models": "resnet4, resnet8,tiny-conv"}, PRESETS_DIR
    )
    assert federation_edge_models(dataclasses.replace(cfg, num_clients=4)) == [
        "resnet4",
        "resnet8",
        USER_MODEL,
        "resnet4",  # cycled over the partition ids
    ]
    at = {"num-partitions": 4}
    assert node_setup(cfg, {"partition-id": 2, **at}).edge_model == USER_MODEL
    assert node_setup(cfg, {"partition-id": 3, **at}).edge_model == "resnet4"
    mine = {"partition-id": 3, "edge-model": "resnet6", **at}
    assert node_setup(cfg, mine).edge_model == "resnet6"  # the node's own, even untrusted
    plain = dataclasses.replace(cfg, edge_models="")
    assert node_setup(plain, {"partition-id": 1, **at}).edge_model == plain.edge_model
    node = node_setup(cfg, {"partition-id": 2, **at})
    model = edge_builder(node.cfg, node.partition_id)()
    assert isinstance(model.extractor, nn.Sequential) and len(model.extractor) == 3  # tiny-conv
    with pytest.raises(ValueError, match="comma-separated"):
        federation_edge_models(dataclasses.replace(cfg, edge_models="resnet4,,resnet8"))
    # FLOPs / params: the mean over the nodes, and each model's own
    costs = model_costs(dataclasses.replace(cfg, num_clients=3))
    per = costs["edge-models"]
    assert set(per) == {"resnet4", "resnet8", USER_MODEL}
    assert {p["nodes"] for p in per.values()} == {1}
    assert costs["edge-params"] == round(sum(p["edge-params"] for p in per.values()) / 3)
    assert "edge-models" not in model_costs(plain)


def test_three_edge_models_in_one_federation_learn(tmp_path, user_models):
    models = f"resnet4,resnet8,{USER_MODEL}"
    cfg = _cfg(tmp_path, "hetero", **{"edge-models": models, "server-epochs": 1})
    run_inprocess(make_server_app(cfg), make_client_app(cfg), cfg.num_clients)
    out = tmp_path / "hetero"
    nodes = _rows(out / "nodes.csv")
    train = [r for r in nodes if r["stage"] == "train"]
    assert {r["status"] for r in nodes} == {"accepted"}
    by_node = {int(r["node-id"]): r["edge-model"] for r in train}
    assert sorted(by_node.values()) == sorted(["resnet4", "resnet8", USER_MODEL])
    results = json.loads((out / "results.json").read_text())
    assert results["edge-models"]["by-node"] == {str(n): m for n, m in sorted(by_node.items())}
    assert set(results["edge-models"]["edge-accuracy"]) == set(by_node.values())
    assert set(results["costs"]["edge-models"]) == set(by_node.values())
    first, final = results["history"][0], results["final"]
    assert final["nodes-replied"] == 3 and final["eval-nodes"] == 3
    # the server's memory against the bytes it stored (docs/benchmarks.md)
    stored = max(row["store-memory-mb"] for row in results["history"])
    assert results["store-peak-mb"] == stored > 0
    peak, baseline = results["server-peak-rss-mb"], results["server-baseline-rss-mb"]
    assert 0 < baseline <= peak
    assert results["server-peak-rss-ratio"] == pytest.approx(peak / stored)
    assert results["server-added-rss-ratio"] == pytest.approx((peak - baseline) / stored)
    assert final["accuracy"] > 0.3 and final["accuracy"] > first["accuracy"]  # chance: 0.1


def test_a_node_whose_features_have_another_shape_is_rejected_the_others_go_on(
    tmp_path, user_models, caplog
):
    cfg = _cfg(tmp_path, "narrow", **{"num-server-rounds": 1, "edge-models": "resnet4,resnet8"})
    with caplog.at_level(logging.WARNING):
        run_inprocess(
            make_server_app(cfg),
            make_client_app(cfg),
            cfg.num_clients,
            node_configs=[{}, {}, {"edge-model": NARROW_MODEL}],  # node 1003: its own model
        )
    out = tmp_path / "narrow"
    rows = {(r["stage"], int(r["node-id"])): r for r in _rows(out / "nodes.csv")}
    bad = rows[("train", 1003)]
    assert bad["status"] == "rejected" and bad["edge-model"] == NARROW_MODEL
    expected = f"maps have shape [8, 28, 28], expected [16, 28, 28] (edge model {NARROW_MODEL})"
    assert expected in bad["reason"]
    lines = [r.getMessage() for r in caplog.records if "rejected:" in r.getMessage()]
    assert len(lines) == 1 and "train reply of node 1003 rejected" in lines[0]
    assert expected in lines[0]
    for node, model in ((1001, "resnet4"), (1002, "resnet8")):
        assert rows[("train", node)]["status"] == "accepted"
        assert rows[("train", node)]["edge-model"] == model
        assert rows[("evaluate", node)]["status"] == "accepted"
    assert ("evaluate", 1003) not in rows  # never trained: not evaluated
    final = json.loads((out / "results.json").read_text())["final"]
    assert final["nodes-rejected"] == 1 and final["nodes-replied"] == 2
    assert final["server-train-examples"] > 0 and final["accuracy"] > 0.1


def test_the_gate_records_a_clean_edge_model_name_and_ignores_any_other():
    from flwr.app import ArrayRecord, ConfigRecord

    from flwr_gkt.wire import NODE_EDGE_MODEL, NODE_KEY
    from tests.helpers.federation import FakeGrid
    from tests.helpers.gkt import NODES, honest, make_strategy, reply_to

    strategy = make_strategy()
    names = {11: "resnet4", 22: "my-model", 33: "bad name\n", 44: None}
    replies = []
    for msg in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(NODES)):
        node = msg.metadata.dst_node_id
        reply = reply_to(msg, *honest(node, 1))
        if names[node] is not None:
            reply.content[NODE_KEY] = ConfigRecord({NODE_EDGE_MODEL: names[node]})
        replies.append(reply)
    strategy.aggregate_train(1, replies)
    rows = {r["node-id"]: r for r in strategy.node_history}
    assert {n: r["status"] for n, r in rows.items()} == dict.fromkeys(NODES, "accepted")
    assert {n: r.get("edge-model") for n, r in rows.items()} == {
        11: "resnet4",
        22: "my-model",
        33: None,  # not a plain name: not recorded, and no reason to reject the reply
        44: None,
    }


def test_every_extractor_starts_equal_whatever_the_classifier():
    """edge-init common: a heterogeneous federation's extractors start from the same weights.

    A model's seeded extractor weights also depend on the classifier built with
    it (built-in ResNet-4 and ResNet-8 with one seed differ), so a node of
    another model takes the federation's ``edge-model`` extractor when it has
    the same architecture; its classifier keeps its own weights.
    """
    import torch

    cfg = resolve_config({"preset": "smoke"}, PRESETS_DIR)  # edge-model resnet8

    def state(model, part):
        return {k: v.clone() for k, v in getattr(model, part).state_dict().items()}

    ref = edge_builder(cfg, 0)()
    for name in ("resnet4", "resnet6"):
        node = dataclasses.replace(cfg, edge_model=name)
        plain = edge_builder(node, 0)()  # without the federation's model: its own extractor
        assert any(
            not torch.equal(a, b)
            for a, b in zip(
                state(plain, "extractor").values(), state(ref, "extractor").values(), strict=True
            )
        )
        common = edge_builder(node, 0, cfg.edge_model)()
        for key, value in state(ref, "extractor").items():
            assert torch.equal(state(common, "extractor")[key], value), (name, key)
        for key, value in state(plain, "classifier").items():
            assert torch.equal(state(common, "classifier")[key], value), (name, key)
    per_node = dataclasses.replace(cfg, edge_model="resnet4", edge_init="per-node")
    assert any(
        not torch.equal(a, b)
        for a, b in zip(
            state(edge_builder(per_node, 0, cfg.edge_model)(), "extractor").values(),
            state(ref, "extractor").values(),
            strict=True,
        )
    )


def test_memory_figures_are_nan_ratios_when_nothing_was_stored():
    from flwr_gkt.app.task import memory_figures, peak_rss_mb

    rows = [{"store-memory-mb": 0.0}, {}]
    figures = memory_figures(peak_rss_mb(), rows)
    assert figures["store-peak-mb"] == 0.0 and figures["server-peak-rss-mb"] > 0
    assert all(
        figures[k] != figures[k] for k in ("server-peak-rss-ratio", "server-added-rss-ratio")
    )
    stored = memory_figures(100.0, [{"store-memory-mb": 50.0}, {"store-memory-mb": 200.0}])
    assert stored["store-peak-mb"] == 200.0
    peak = stored["server-peak-rss-mb"]
    assert stored["server-added-rss-ratio"] == pytest.approx((peak - 100.0) / 200.0)

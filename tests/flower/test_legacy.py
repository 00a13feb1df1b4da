"""The legacy Strategy API adapter drives FedGKT: FedGKT's options hold on the legacy path.

A small stand-in for Flower's legacy server loop runs ``configure_fit`` ->
``GKTNumPyClient.fit`` -> ``aggregate_fit`` -> ``configure_evaluate`` ->
``GKTNumPyClient.evaluate`` -> ``aggregate_evaluate`` with real nodes.
"""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.common import (
    Code,
    EvaluateRes,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.training import Plateau
from flwr_gkt.data import ClientData
from flwr_gkt.flower.legacy import FedGKTLegacy, GKTNumPyClient
from flwr_gkt.flower.options import ScheduleOptions, TrustOptions
from tests.helpers.gkt import SHAPE, N, make_strategy, tiny_server_model
from tests.helpers.gkt import legacy_clients as _clients

NODES = [1, 2, 3]
OK = Status(Code.OK, "")


def _edge() -> EdgeModel:
    torch.manual_seed(1)
    return EdgeModel(
        torch.nn.Sequential(torch.nn.Conv2d(3, SHAPE[0], 3, padding=1), torch.nn.ReLU()),
        torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(SHAPE[0], 10)
        ),
    )


def _node(node: int) -> GKTNumPyClient:
    gen = torch.Generator().manual_seed(node)
    data = ClientData(
        torch.randn(N, 3, 8, 8, generator=gen),
        torch.randint(0, 10, (N,), generator=gen),
        torch.randn(8, 3, 8, 8, generator=gen),
        torch.randint(0, 10, (8,), generator=gen),
    )
    context = Context(run_id=1, node_id=node, node_config={}, state=RecordDict(), run_config={})
    return GKTNumPyClient(context, data, _edge, tiny_server_model, "cpu")


class _Run:
    """Flower's legacy round loop over real nodes; ``fail`` / ``tamper`` make bad rounds."""

    def __init__(self, **kwargs):
        edge = EdgeRoundConfig(batch_size=16)
        self.legacy = FedGKTLegacy(make_strategy(NODES, edge_config=edge, **kwargs), 3)
        self.fedgkt = self.legacy.strategy
        self.clients = _clients(NODES)
        self.nodes = {n: _node(n) for n in NODES}
        self.params = self.legacy.initialize_parameters(self.clients)
        self.sent: dict[int, list[int]] = {}  # round -> arrays per reply

    def round(self, rnd, fail=(), tamper=None, evaluation=None):
        results, failures = [], []
        for proxy, ins in self.legacy.configure_fit(rnd, self.params, self.clients):
            node = int(proxy.cid)
            if node in fail:
                failures.append(TimeoutError(f"node {node}"))
                continue
            arrays, n, metrics = self.nodes[node].fit(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            self.sent.setdefault(rnd, []).append(len(arrays))
            if tamper is not None:
                arrays = tamper(node, arrays)
            results.append((proxy, FitRes(OK, ndarrays_to_parameters(arrays), n, metrics)))
        params, metrics = self.legacy.aggregate_fit(rnd, results, failures)
        self.params = params or self.params
        results = []
        for proxy, ins in self.legacy.configure_evaluate(rnd, self.params, self.clients):
            loss, n, m = self.nodes[int(proxy.cid)].evaluate(
                parameters_to_ndarrays(ins.parameters), ins.config
            )
            m = evaluation(rnd) if evaluation else m
            results.append((proxy, EvaluateRes(OK, loss, n, m)))
        self.legacy.aggregate_evaluate(rnd, results, [])
        return params, metrics


def test_replay_rounds_send_logits_only_and_train_on_the_stored_features():
    run = _Run(feature_upload_every=2)
    for rnd in (1, 2, 3):
        run.round(rnd)
    assert run.sent == {1: [3, 3, 3], 2: [1, 1, 1], 3: [3, 3, 3]}  # round 2: [logits] alone
    rows = run.legacy.history
    assert [r["nodes-sent-features"] for r in rows] == [3, 0, 3]
    assert [r["nodes-replied"] for r in rows] == [3, 3, 3]
    assert [r["server-train-examples"] for r in rows] == [3 * N] * 3
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["eval-nodes"] == 3 for r in rows)


def test_too_few_train_replies_leave_the_server_model_untrained():
    run = _Run(trust=TrustOptions(min_train_replies=3))
    params, metrics = run.round(1)
    assert params is not None and metrics["server-train-examples"] == 3 * N
    before = run.fedgkt.server.model.state_dict()["5.weight"].clone()
    params, metrics = run.round(2, fail={2})
    assert params is None and metrics["nodes-replied"] == 2
    assert metrics["server-train-examples"] == 0
    assert torch.equal(run.fedgkt.server.model.state_dict()["5.weight"], before)


def test_features_of_a_silent_node_are_dropped_after_store_max_age():
    run = _Run(trust=TrustOptions(store_max_age=1))
    run.round(1)
    assert set(run.fedgkt.server.store) == set(NODES)
    _, metrics = run.round(2, fail={3})
    assert set(run.fedgkt.server.store) == {1, 2}
    assert metrics["server-train-examples"] == 2 * N
    rows = [
        r
        for r in run.fedgkt.node_history
        if (r["round"], r["stage"], r["node-id"]) == (2, "train", 3)
    ]
    assert {r["status"] for r in rows} == {"error", "dropped"}


def test_the_plateau_schedule_steps_with_the_legacy_accuracy():
    accuracies = {1: 0.5, 2: 0.4, 3: 0.4}
    run = _Run(schedule=ScheduleOptions("plateau", Plateau(0.5, patience=0)))
    for rnd in (1, 2, 3):
        run.round(rnd, evaluation=lambda r: {"accuracy": accuracies[r], "edge-accuracy": 0.1})
    assert [r["accuracy"] for r in run.legacy.history] == pytest.approx([0.5, 0.4, 0.4])
    # the accuracy fell after round 2: round 3's server learning rate is halved
    assert [r["server-lr-factor"] for r in run.legacy.history] == [1.0, 1.0, 0.5]


def test_a_hostile_reply_is_rejected_and_the_round_goes_on(caplog):
    def poison(node, arrays):
        return [arrays[0] * np.float32("nan"), *arrays[1:]] if node == 2 else arrays

    run = _Run()
    with caplog.at_level(logging.WARNING):
        params, metrics = run.round(1, tamper=poison)
    assert "train reply of node 2 rejected" in caplog.text
    assert params is not None and metrics["nodes-replied"] == 2
    assert metrics["nodes-rejected"] == 1 and metrics["server-train-examples"] == 2 * N
    assert set(run.fedgkt.server.store) == {1, 3}
    _, metrics = run.round(2)  # node 2 is back
    assert metrics["nodes-replied"] == 3 and set(run.fedgkt.server.store) == set(NODES)
    assert run.legacy.history[-1]["eval-nodes"] == 3


def test_what_needs_fedgkts_round_loop_is_refused(tmp_path):
    from flwr_gkt.core.server import GKTServer
    from flwr_gkt.flower.async_strategy import AsyncFedGKT

    with pytest.raises(ValueError, match="checkpoint_path"):
        FedGKTLegacy(make_strategy(checkpoint_path=tmp_path / "c.pt"))
    server = GKTServer(tiny_server_model(), epochs=1, batch_size=16, device="cpu")
    with pytest.raises(ValueError, match="async"):
        FedGKTLegacy(AsyncFedGKT(server, 10, feature_shape=SHAPE))

"""Asynchronous FedGKT (AsyncFedGKT) with the real ClientApp handlers, replies out of order."""

import logging
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array
from flwr.serverapp.strategy import Result

from flwr_gkt.config import RunConfig
from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.models import resnet4, resnet8
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.data import client_data
from flwr_gkt.flower.async_strategy import AsyncFedGKT
from flwr_gkt.flower.options import AsyncOptions, SamplingOptions
from flwr_gkt.wire import ARRAYS_KEY, decode_server_logits
from tests.helpers.federation import LocalFederation, seeded_builders

NODES = [11, 22, 33]
ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


class AsyncGrid:
    """A Grid whose nodes answer with the real handlers, one reply per pull, out of order.

    Replies are computed when an instruction is pushed (a node has one
    instruction at a time, so that is the state it would answer from) and
    released one per ``pull_messages`` call, first pushed first -- except that
    a train reply of a node in ``hold`` is released only after ``hold[node]``
    other train replies have been released since its push (or when nothing
    else is left to release). Nodes in ``silent`` never answer. ``events``
    logs every push and release in order.
    """

    def __init__(self, fed: LocalFederation, hold=None, silent=(), on_push=None):
        self.fed, self.hold, self.silent, self.on_push = fed, dict(hold or {}), set(silent), on_push
        self.queue: list[dict] = []
        self.events: list[tuple[str, int, str, str]] = []
        self.train_releases = 0

    def get_node_ids(self):
        return list(self.fed.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = str(uuid.uuid4())
            msg.metadata.__dict__["_message_id"] = mid
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            assert not any(q["node"] == node for q in self.queue), (
                f"two messages in flight to {node}"
            )
            if self.on_push is not None:
                self.on_push(msg)
            self.events.append(("push", node, kind, mid))
            if node not in self.silent:
                rnd = int(msg.content.config_records["config"]["server-round"])
                self.queue.append(
                    {
                        "id": mid,
                        "node": node,
                        "kind": kind,
                        "at": self.train_releases,
                        "reply": self.fed.reply(msg, rnd),
                    }
                )
            ids.append(mid)
        return ids

    def _held(self, q):
        return q["kind"] == "train" and self.train_releases - q["at"] < self.hold.get(q["node"], 0)

    def pull_messages(self, message_ids):
        wanted = [q for q in self.queue if q["id"] in set(message_ids)]
        if not wanted:
            return []
        q = next((q for q in wanted if not self._held(q)), wanted[0])
        self.queue.remove(q)
        self.events.append(("release", q["node"], q["kind"], q["id"]))
        self.train_releases += q["kind"] == "train"
        return [q["reply"]]

    def send_and_receive(self, *args, **kwargs):
        raise AssertionError("the async strategy must not block on send_and_receive")


def tiny_server_model():
    """A small head on the 16-channel feature maps: keeps the protocol tests fast."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(16, 8, 3, stride=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def make_async(
    sizes=(3, 2, 4),
    fraction=0.001,
    test_fraction=0.005,
    epochs=1,
    edge=resnet4,
    server_model=tiny_server_model,
    **kwargs,
):
    """Three nodes with different sample counts (``sizes`` = partitions of the split)."""
    datas = [
        client_data(i, n, fraction=fraction, test_fraction=test_fraction, seed=0)
        for i, n in enumerate(sizes)
    ]
    fed = LocalFederation(NODES, datas, seeded_builders(lambda: edge(10, 1), 3))
    torch.manual_seed(0)
    server = GKTServer(server_model(), epochs=epochs, batch_size=32, device="cpu")
    strategy = AsyncFedGKT(
        server,
        10,
        feature_shape=(16, 28, 28),
        edge_config=EdgeRoundConfig(batch_size=32),
        sampling=SamplingOptions(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3),
        asynchronous=AsyncOptions(**{"poll_interval": 0.0, **kwargs}),
    )
    return fed, strategy, dict(zip(NODES, datas, strict=True))


def logits_checker(strategy, datas, seen):
    """on_push hook: a train instruction carries the node's own current server logits."""

    def check(msg):
        if msg.metadata.message_type != "train":
            return
        node = msg.metadata.dst_node_id
        expected = strategy.server.server_logits(node)
        n = len(datas[node].y_train)
        got = decode_server_logits(msg.content, n, 10)
        if expected is None:
            assert got is None
        else:
            assert got is not None and got.shape == (n, 10)
            torch.testing.assert_close(got, expected)
        seen.append((node, None if got is None else got.shape[0]))

    return check


def expected_staleness(events, rejected=()):
    """Staleness of each train reply from the grid's log: accepted train releases in between."""
    pushed_at, out, accepted = {}, [], 0
    for _i, (what, node, kind, mid) in enumerate(events):
        if kind != "train":
            continue
        if what == "push":
            pushed_at[mid] = accepted
        else:
            out.append((node, accepted - pushed_at[mid]))
            if mid not in rejected:
                accepted += 1
    return out


def train_records(strategy):
    return [r for r in strategy.node_history if r["stage"] == "train"]


def track_updates(strategy):
    """Wrap the server update: record (node, other nodes' Z_s untouched, examples)."""
    updates = []
    real = strategy._train_update

    def update(node, lr_scale):
        before = dict(strategy.server.logits)
        res = real(node, lr_scale)
        after = strategy.server.logits
        others = all(after[n] is z for n, z in before.items() if n != node)
        updates.append((node, others, res.num_examples))
        return res

    strategy._train_update = update
    return updates


@pytest.mark.parametrize("scope", ["store", "node"])
def test_out_of_order_replies_get_their_own_logits_and_staleness_is_recorded(scope):
    fed, strategy, datas = make_async(max_staleness=None, update_scope=scope)
    seen = []
    grid = AsyncGrid(fed, hold={33: 4}, on_push=logits_checker(strategy, datas, seen))
    updates = track_updates(strategy)
    result = strategy.start(grid, strategy.initial_arrays(), num_rounds=3)

    assert isinstance(result, Result)
    assert (
        sorted(result.train_metrics_clientapp)
        == sorted(result.evaluate_metrics_clientapp)
        == [1, 2, 3]
    )
    records = train_records(strategy)
    assert all(r["status"] == "accepted" for r in records) and len(records) == 9
    # replies came back out of order: node 33's first reply after other nodes' second ones
    releases = [
        node for what, node, kind, _ in grid.events if what == "release" and kind == "train"
    ]
    assert releases.index(33) > 3 and releases[:4].count(11) == 2
    # the staleness recorded is the number of server updates between send and reply
    assert [(r["node-id"], r["staleness"]) for r in records] == expected_staleness(grid.events)
    assert max(r["staleness"] for r in records if r["node-id"] == 33) == 4
    # every instruction carried the node's own logits (checked at push), with its sample count
    assert len(seen) == sum(1 for e in grid.events if e[0] == "push" and e[2] == "train")
    assert {(node, n) for node, n in seen if n is not None} <= {
        (k, len(d.y_train)) for k, d in datas.items()
    }
    assert len({n for _, n in seen if n is not None}) == 3  # three different sample counts
    # one server update per accepted reply, in reply order, setting that node's Z_s only,
    # on as many samples per pass as the node has
    assert strategy.version == 9
    assert [u[0] for u in updates] == [r["node-id"] for r in records]
    assert all(others for _, others, _ in updates)
    assert all(n == len(datas[node].y_train) for node, _, n in updates)
    h = strategy.history
    assert [row["round"] for row in h] == [1, 2, 3]
    assert all(row["nodes-replied"] == 3 for row in h)
    assert h[-1]["server-version"] == 9
    assert max(row["staleness-max"] for row in h) == 4
    for row in h:
        per_round = [r["staleness"] for r in records if r["round"] == row["round"]]
        assert row["staleness-max"] == max(per_round)
        assert row["staleness-mean"] == pytest.approx(np.mean(per_round))
    # evaluation: every node whose edge model has trained by the round's end (node 33's
    # first reply is held past round 1), the sync keys
    assert [row["eval-nodes"] for row in h] == [2, 3, 3]
    assert h[-1]["num-examples"] == sum(len(d.y_test) for d in datas.values())
    for key in (
        "accuracy",
        "edge-accuracy",
        "bytes-up-train",
        "bytes-down-train",
        "bytes-up-eval",
        "server-train-loss",
        "server-train-accuracy",
        "server-seconds",
        "edge-train-accuracy",
        "round-seconds",
        "nodes-rejected",
        "nodes-lost",
    ):
        assert all(key in row for row in h), key
    # no train instruction after the last round: nothing left to drain
    last_release = max(
        i for i, e in enumerate(grid.events) if e[0] == "release" and e[2] == "train"
    )
    assert not [e for e in grid.events[last_release:] if e[0] == "push" and e[2] == "train"]
    assert not grid.queue


def test_reply_staler_than_the_bound_is_rejected_not_trained_on_and_resent(caplog):
    fed, strategy, _datas = make_async(max_staleness=2)
    grid = AsyncGrid(fed, hold={33: 4})
    updates = track_updates(strategy)
    with caplog.at_level(logging.WARNING):
        strategy.start(grid, strategy.initial_arrays(), num_rounds=3)

    records = train_records(strategy)
    stale = [r for r in records if r["status"] == "stale"]
    assert stale and all(r["node-id"] == 33 and r["staleness"] == 4 for r in stale)
    lines = [r.getMessage() for r in caplog.records if "rejected: stale" in r.getMessage()]
    assert len(lines) == len(stale)
    assert all("node 33" in line and "staleness 4 > max-staleness 2" in line for line in lines)
    # not trained on: the server trained once per accepted reply, on that node only
    accepted = [r for r in records if r["status"] == "accepted"]
    assert [u[0] for u in updates] == [r["node-id"] for r in accepted]
    assert len(updates) == strategy.version == 9
    assert all(r["staleness"] <= 2 for r in accepted)
    train_releases = [e for e in grid.events if e[0] == "release" and e[2] == "train"]
    stale_ids = {
        e[3] for e, r in zip(train_releases, records, strict=True) if r["status"] == "stale"
    }
    assert [(r["node-id"], r["staleness"]) for r in records] == expected_staleness(
        grid.events, stale_ids
    )
    # after each stale reply, node 33 was sent a fresh train instruction right away --
    # or first the evaluation of a round that ended while it was training
    ev = [e for e in grid.events if e[1] == 33]
    for i, e in enumerate(ev):
        if e[3] in stale_ids and e[0] == "release":
            assert ev[i + 1][:3] in (("push", 33, "train"), ("push", 33, "evaluate"))
    assert sum(1 for e in ev if e[:3] == ("push", 33, "train")) >= len(stale) + 1 - (
        ev[-1][2] == "evaluate"
    )
    h = strategy.history
    assert [row["round"] for row in h] == [1, 2, 3]
    assert sum(row["replies-stale"] for row in h) == len(stale)
    assert sum(row["nodes-rejected"] for row in h) == len(stale)
    assert all(row["nodes-replied"] == 3 for row in h)


def test_bad_payload_is_rejected_with_a_log_line_and_the_run_finishes(caplog):
    fed, strategy, _ = make_async()
    count = {"n": 0}

    def nan_features(nid, rnd, reply):
        if nid == 22 and reply.metadata.message_type == "train":
            count["n"] += 1
            if count["n"] == 2:
                feats = reply.content.array_records[ARRAYS_KEY]["features"].numpy().copy()
                feats[0, 0, 0, 0] = np.nan
                reply.content.array_records[ARRAYS_KEY]["features"] = Array(feats)
        return reply

    fed.tamper = nan_features
    grid = AsyncGrid(fed)
    with caplog.at_level(logging.WARNING):
        result = strategy.start(grid, strategy.initial_arrays(), num_rounds=3)
    lines = [r.getMessage() for r in caplog.records if "reply of node" in r.getMessage()]
    assert len(lines) == 1 and "node 22" in lines[0] and "NaN or Inf" in lines[0]
    rejected = [r for r in strategy.node_history if r["status"] == "rejected"]
    assert [(r["node-id"], r["stage"]) for r in rejected] == [(22, "train")]
    h = strategy.history
    assert [row["round"] for row in h] == [1, 2, 3] and sum(row["nodes-rejected"] for row in h) == 1
    assert all(row["nodes-replied"] == 3 for row in h) and strategy.version == 9
    # node 22 was sent a new instruction and its next reply was accepted
    records_22 = [r["status"] for r in train_records(strategy) if r["node-id"] == 22]
    assert records_22[:3] == ["accepted", "rejected", "accepted"]
    assert 3 in result.evaluate_metrics_clientapp and h[-1]["accuracy"] > 0


def test_silent_node_is_lost_after_the_timeout_and_the_others_finish(caplog):
    fed, strategy, _ = make_async(poll_interval=0.01)
    grid = AsyncGrid(fed, silent={33})
    with caplog.at_level(logging.WARNING):
        strategy.start(grid, strategy.initial_arrays(), num_rounds=2, timeout=1.0)
    lost = [r for r in strategy.node_history if r["status"] == "lost"]
    assert [(r["node-id"], r["stage"]) for r in lost if r["stage"] == "train"] == [(33, "train")]
    # evaluations it was due for when it was dropped are recorded as lost too
    assert all(
        r["node-id"] == 33 and "dropped" in r["reason"] for r in lost if r["stage"] == "evaluate"
    )
    assert any("node 33 did not reply" in r.getMessage() for r in caplog.records)
    h = strategy.history
    assert [row["round"] for row in h] == [1, 2]
    assert all(row["nodes-replied"] == 3 for row in h) and sum(row["nodes-lost"] for row in h) == 1
    assert 33 not in strategy.server.store
    assert all(row["eval-nodes"] == 2 for row in h)  # the lost node is not asked to evaluate
    assert sum(1 for e in grid.events if e[1] == 33) == 1  # one instruction, never another


def test_in_process_async_run_learns_above_chance():
    fed, strategy, datas = make_async(
        sizes=(3, 3, 3),
        fraction=0.01,
        test_fraction=0.01,
        epochs=2,
        edge=resnet8,
        server_model=lambda: build_server_model("resnet10", 10),
    )
    grid = AsyncGrid(fed, hold={22: 2})
    result = strategy.start(grid, strategy.initial_arrays(), num_rounds=3)
    h = strategy.history
    assert [row["round"] for row in h] == [1, 2, 3]
    assert h[-1]["accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert (
        h[-1]["num-examples"] == sum(len(d.y_test) for d in datas.values()) == 100
    )  # 1% of the test set
    assert result.evaluate_metrics_clientapp[3]["accuracy"] == h[-1]["accuracy"]
    assert set(result.arrays.keys()) == set(strategy.server.model.state_dict().keys())


def test_server_app_picks_the_strategy_of_the_server_mode():
    from flwr_gkt.app.server_app import strategy_class

    assert strategy_class(RunConfig())[0].__name__ == "FedGKT"
    cls, extra = strategy_class(RunConfig(server_mode="async", max_staleness=3))
    assert cls is AsyncFedGKT and extra == {"asynchronous": AsyncOptions(3, "store")}
    assert strategy_class(RunConfig(server_mode="async", max_staleness=-1, async_update="node"))[
        1
    ] == {"asynchronous": AsyncOptions(None, "node")}
    assert RunConfig().max_staleness == -1  # default: no bound
    with pytest.raises(ValueError, match="server-mode 'bogus'"):
        strategy_class(RunConfig(server_mode="bogus"))

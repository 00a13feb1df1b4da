"""FedGKT strategy with the real ClientApp handlers, in process (no Ray)."""

import logging
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message

from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import bf16_supported
from flwr_gkt.data import client_data
from flwr_gkt.flower.options import SamplingOptions, ScheduleOptions, WireOptions
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import ARRAYS_KEY, FLOAT16_TOLERANCE, decode_server_logits
from tests.helpers.federation import LocalFederation, seeded_builders

NODES = [11, 22, 33]


def make_federation(fraction=0.005):
    datas = [client_data(i, 3, fraction=fraction, test_fraction=0.03, seed=0) for i in range(3)]
    fed = LocalFederation(NODES, datas, seeded_builders(lambda: resnet8(10, 1), 3))
    torch.manual_seed(0)
    server = GKTServer(build_server_model("resnet10", 10), epochs=2, batch_size=32, device="cpu")
    strategy = FedGKT(
        server,
        10,
        feature_shape=(16, 28, 28),
        edge_config=EdgeRoundConfig(batch_size=32),
        sampling=SamplingOptions(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3),
    )
    return fed, strategy, datas


def test_each_node_gets_its_own_server_logits_in_sample_order():
    fed, strategy, datas = make_federation()
    fed.run_round(strategy, 1)
    # Round 1: no logits yet, so no node used KD.
    assert all(ARRAYS_KEY not in m.content.array_records for m in fed.last_train_messages)
    expected = {n: strategy.server.server_logits(n).clone() for n in NODES}
    stored = {n: strategy.server.store[n] for n in NODES}
    fed.run_round(strategy, 2)
    for msg in fed.last_train_messages:
        node = msg.metadata.dst_node_id
        data = datas[NODES.index(node)]
        got = decode_server_logits(msg.content, len(data.y_train), 10)
        torch.testing.assert_close(got, expected[node])
        # the labels the server holds for these rows are the node's labels, in order
        assert torch.equal(stored[node].labels, data.y_train)
        # and the node kept them in its persistent state
        context = fed.nodes[node][0]
        kept = context.state.array_records["gkt-server-logits"]["server-logits"].numpy()
        np.testing.assert_array_equal(kept, expected[node].numpy())
    assert strategy.history[-1]["nodes-replied"] == 3


def test_the_round_row_times_the_waits_for_replies():
    """``train-wait-seconds`` / ``eval-wait-seconds``: the stages' replies, apart from training."""
    fed, strategy, _ = make_federation()
    delay = {"train": 0.3, "evaluate": 0.2}

    def slow(nid, rnd, reply):
        time.sleep(delay[reply.metadata.message_type])
        return reply

    fed.tamper = slow
    fed.run_round(strategy, 1)
    row = strategy.history[-1]
    assert row["train-wait-seconds"] >= 3 * delay["train"]
    assert row["eval-wait-seconds"] >= 3 * delay["evaluate"]
    parts = row["train-wait-seconds"] + row["server-seconds"] + row["eval-wait-seconds"]
    assert parts <= row["round-seconds"]


def test_the_server_trains_on_nodes_in_the_order_of_their_identities():
    _, strategy, _ = make_federation()
    strategy.nodes.uids.update({11: "partition-2", 22: "partition-0", 33: "partition-1"})
    assert strategy.server._ordered([11, 22, 33, 44]) == [44, 22, 33, 11]  # no uid: first


def test_cosine_schedule_scales_edge_and_server_learning_rates():
    fed, strategy, _ = make_federation()
    strategy.schedule, strategy.num_rounds = ScheduleOptions("cosine"), 4
    base_edge, base_server = strategy.edge_config.lr, strategy.server.lr
    for rnd in (1, 2, 3):
        fed.run_round(strategy, rnd)
        factor = 0.5 * (1 + np.cos(np.pi * (rnd - 1) / 4))
        sent = [m.content["config"]["lr"] for m in fed.last_train_messages]
        assert sent == pytest.approx([base_edge * factor] * 3)
        assert strategy.server.optimizer.param_groups[0]["lr"] == pytest.approx(
            base_server * factor
        )


def _nan_features(nid, rnd, reply):
    if nid == 22 and rnd == 2 and reply.metadata.message_type == "train":
        feats = reply.content.array_records[ARRAYS_KEY]["features"].numpy().copy()
        feats[0, 0, 0, 0] = np.nan
        reply.content.array_records[ARRAYS_KEY]["features"] = Array(feats)
    return reply


def _wrong_shape(nid, rnd, reply):
    if nid == 22 and rnd == 2 and reply.metadata.message_type == "train":
        feats = reply.content.array_records[ARRAYS_KEY]["features"].numpy()
        reply.content.array_records[ARRAYS_KEY]["features"] = Array(
            np.ascontiguousarray(feats[:, :, :14])
        )
    return reply


@pytest.mark.parametrize(
    "tamper,reason",
    [
        (_nan_features, "NaN or Inf"),
        (_wrong_shape, "maps have shape [16, 14, 28]"),
    ],
)
def test_bad_reply_is_rejected_round_continues_and_nothing_stored_is_lost(tamper, reason, caplog):
    fed, strategy, _ = make_federation()
    fed.run_round(strategy, 1)
    before = strategy.server.store[22]
    fed.tamper = tamper
    with caplog.at_level(logging.WARNING):
        (arrays, train_metrics), eval_metrics = fed.run_round(strategy, 2)
    lines = [r.getMessage() for r in caplog.records if "reply of node" in r.getMessage()]
    assert len(lines) == 1 and "node 22" in lines[0] and reason in lines[0]
    assert train_metrics["nodes-replied"] == 2 and train_metrics["nodes-rejected"] == 1
    assert arrays is not None and eval_metrics["accuracy"] > 0
    # node 22's round-1 features are still stored (on disk while the round ran), untouched,
    # and still trained on
    kept = strategy.server.store[22]
    assert torch.equal(kept.features, before.features) and torch.equal(kept.labels, before.labels)
    assert torch.equal(kept.logits, before.logits)
    assert train_metrics["server-train-examples"] == sum(
        len(p) for p in strategy.server.store.values()
    )
    assert strategy.server.server_logits(22).shape == (len(before), 10)
    # the next round serves node 22 again and accepts its reply
    fed.tamper = None
    (_, metrics3), _ = fed.run_round(strategy, 3)
    assert metrics3["nodes-replied"] == 3 and strategy.server.store[22] is not before


def test_node_error_reply_is_logged_and_skipped(caplog):
    fed, strategy, _ = make_federation()
    fed.run_round(strategy, 1)

    def tamper(nid, rnd, reply):
        if nid == 22:
            instruction = next(m for m in fed.last_train_messages if m.metadata.dst_node_id == 22)
            if reply.metadata.message_type == "train":
                return Message(Error(code=1, reason="node crashed"), reply_to=instruction)
        return reply

    fed.tamper = tamper
    with caplog.at_level(logging.WARNING):
        (_, metrics), _ = fed.run_round(strategy, 2)
    assert metrics["nodes-replied"] == 2
    assert any(
        "node 22" in r.getMessage() and "node crashed" in r.getMessage() for r in caplog.records
    )


def test_in_process_federation_learns_above_chance():
    fed, strategy, _ = make_federation(fraction=0.01)
    for rnd in (1, 2, 3):
        fed.run_round(strategy, rnd)
    h = strategy.history
    assert h[-1]["accuracy"] > 0.4  # 10 classes: chance is 0.1
    assert h[-1]["num-examples"] == 300  # 3% of the test set, split over 3 nodes
    assert h[-1]["bytes-up-train"] > 600 * 16 * 28 * 28 * 4
    assert h[-1]["bytes-down-train"] > 600 * 10 * 4


def test_reply_that_breaks_the_decoder_is_rejected_not_raised(caplog, monkeypatch):
    import flwr_gkt.flower.strategy as strategy_mod

    fed, strategy, _ = make_federation()
    real_decode = strategy_mod.decode_payload

    calls = []

    def flaky_decode(content, spec, with_logits):
        calls.append(with_logits)
        if len(calls) == 3:  # the third train reply: node 33 (replies come in node-id order)
            raise RuntimeError("decoder bug")
        return real_decode(content, spec, with_logits)

    monkeypatch.setattr(strategy_mod, "decode_payload", flaky_decode)
    with caplog.at_level(logging.WARNING):
        (_, metrics), _ = fed.run_round(strategy, 1)
    assert metrics["nodes-replied"] == 2 and metrics["nodes-rejected"] == 1
    lines = [r.getMessage() for r in caplog.records if "reply of node 33" in r.getMessage()]
    assert len(lines) == 1 and "malformed payload: RuntimeError('decoder bug')" in lines[0]


def test_bytes_per_round_equal_the_serialized_array_payloads():
    """Bytes in the history are those of the messages' arrays, each direction."""
    from flwr.common.serde import message_to_proto

    def array_bytes(m):
        return sum(len(a.data) for rec in m.content.array_records.values() for a in rec.values())

    fed, strategy, datas = make_federation()
    # Sizes are taken as the replies are made: the strategy releases a reply's
    # arrays once it has stored them.
    seen: list[tuple[int, str, int, int]] = []
    fed.tamper = lambda nid, rnd, reply: (
        seen.append(
            (
                rnd,
                reply.metadata.message_type,
                array_bytes(reply),
                message_to_proto(reply).ByteSize(),
            )
        )
        or reply
    )
    fed.run_round(strategy, 1)
    fed.run_round(strategy, 2)
    row = strategy.history[-1]
    train_up = [(b, w) for rnd, kind, b, w in seen if rnd == 2 and kind == "train"]
    eval_up = [(b, w) for rnd, kind, b, w in seen if rnd == 2 and kind == "evaluate"]
    down = [(array_bytes(m), message_to_proto(m).ByteSize()) for m in fed.last_train_messages]

    assert row["bytes-up-train"] == sum(b for b, _ in train_up)
    assert row["bytes-down-train"] == sum(b for b, _ in down)
    assert row["bytes-up-eval"] == sum(b for b, _ in eval_up)
    # Arrays are numpy's .npy serialization: raw data plus a small header each.
    n = sum(len(d.y_train) for d in datas)
    raw_up = n * (16 * 28 * 28 * 4 + 10 * 4 + 8)  # fp32 features + fp32 logits + int64 labels
    assert raw_up < row["bytes-up-train"] < raw_up + 3 * 3 * 256
    raw_down = n * 10 * 4  # fp32 server logits
    assert raw_down < row["bytes-down-train"] < raw_down + 3 * 256
    # ... and they are what Flower serializes: the whole message is only a little larger.
    for payload_bytes, wire in train_up + down:
        assert payload_bytes < wire < payload_bytes + 4096


def test_generated_cifar10_round_end_to_end_with_augmentation(tmp_path, monkeypatch):
    """3-channel 32x32 data, Dirichlet partitions, augmented edge batches: a full round."""
    from flwr_gkt.data import RandomCropFlip, clear_caches
    from tests.helpers.cifar_files import write_cifar as _write_cifar

    monkeypatch.setenv("FLWR_GKT_CACHE", str(tmp_path / "cache"))
    clear_caches()
    _write_cifar(tmp_path / "c10", "cifar10", n_per_file=20)
    datas = [
        client_data(
            i,
            2,
            dataset="cifar10",
            data_dir=str(tmp_path / "c10"),
            partition="dirichlet",
            min_partition_size=10,
            seed=1,
        )
        for i in range(2)
    ]
    assert all(isinstance(d.augment, RandomCropFlip) for d in datas)
    calls = []
    for d in datas:  # count augmentation calls on the edge
        real = d.augment
        d.augment = lambda x, g, real=real: calls.append(len(x)) or real(x, g)
    fed = LocalFederation([5, 6], datas, [lambda: resnet8(10, 3)] * 2)
    server = GKTServer(build_server_model("resnet10", 10), epochs=1, batch_size=16, device="cpu")
    strategy = FedGKT(
        server,
        10,
        feature_shape=(16, 32, 32),
        edge_config=EdgeRoundConfig(batch_size=16),
        sampling=SamplingOptions(min_train_nodes=2, min_evaluate_nodes=2, min_available_nodes=2),
    )
    (_, train_metrics), eval_metrics = fed.run_round(strategy, 1)
    n = sum(len(d.y_train) for d in datas)
    assert train_metrics["server-train-examples"] == n == 100
    assert sum(calls) == 2 * n  # every training sample augmented while training and extracting
    assert eval_metrics["num-examples"] == 20 and 0.0 <= eval_metrics["accuracy"] <= 1.0
    clear_caches()


def test_no_server_logits_travel_when_the_edge_does_not_distil():
    fed, strategy, _ = make_federation()
    strategy.edge_config = EdgeRoundConfig(batch_size=32, kd_mode="none")
    fed.run_round(strategy, 1)
    fed.run_round(strategy, 2)
    assert all(ARRAYS_KEY not in m.content.array_records for m in fed.last_train_messages)
    assert strategy.history[-1]["bytes-down-train"] == 0
    assert all(
        m.content.config_records["config"]["kd-mode"] == "none" for m in fed.last_train_messages
    )


def test_int8_features_and_float16_logits_end_to_end():
    fed, strategy, datas = make_federation(fraction=0.01)
    strategy.wire = WireOptions(feature_dtype="int8", logit_dtype="float16")
    for rnd in (1, 2, 3):
        fed.run_round(strategy, rnd)
    h = strategy.history
    n = sum(len(d.y_train) for d in datas)
    assert (
        n * 16 * 28 * 28 < h[-1]["bytes-up-train"] < n * (16 * 28 * 28 + 10 * 2 + 8) + 4096
    )  # 1 byte/value
    assert h[-1]["bytes-down-train"] < n * 10 * 2 + 1024  # float16 server logits
    assert h[-1]["accuracy"] > 0.4  # still learns (chance: 0.1)


def test_node_that_never_replies_is_recorded_as_lost(caplog):
    fed, strategy, _ = make_federation()
    fed.run_round(strategy, 1)
    messages = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), fed.grid))
    replies = [
        fed.reply(m, 2) for m in messages if m.metadata.dst_node_id != 22
    ]  # node 22 is silent
    with caplog.at_level(logging.WARNING):
        _, metrics = strategy.aggregate_train(2, replies)
    assert metrics["nodes-replied"] == 2 and metrics["nodes-lost"] == 1
    lost = [r for r in strategy.node_history if r["round"] == 2 and r["status"] == "lost"]
    assert [(r["node-id"], r["stage"]) for r in lost] == [(22, "train")]
    assert any("node 22 did not reply" in r.getMessage() for r in caplog.records)
    assert metrics["server-train-examples"] == sum(len(p) for p in strategy.server.store.values())


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="needs a bf16 CPU")
def test_auto_feature_dtype_sends_bf16_features_in_half_the_bytes_and_trains_alike():
    runs = {}
    for dtype in ("float32", "auto"):
        fed, strategy, datas = make_federation()
        strategy.wire = WireOptions(feature_dtype=dtype)
        strategy.edge_config = replace(strategy.edge_config, precision="bf16")
        fed.run_round(strategy, 1)
        runs[dtype] = strategy
    n = sum(len(d.y_train) for d in datas)
    full, half = runs["float32"], runs["auto"]
    assert (
        full.history[-1]["bytes-up-train"] - half.history[-1]["bytes-up-train"]
        == n * 16 * 28 * 28 * 2
    )
    for node in NODES:  # the same numbers (to 2^-25) stored in half the bytes
        assert half.server.store[node].features.dtype == torch.float16
        moved = half.server.store[node].dense_features() - full.server.store[node].features
        assert moved.abs().max() <= FLOAT16_TOLERANCE
        # Adam's first steps amplify 3e-8 into ~0.01 of the logits: alike, not bit-equal
        got, ref = half.server.server_logits(node), full.server.server_logits(node)
        torch.testing.assert_close(got, ref, atol=0.05, rtol=0)
    assert abs(half.history[-1]["accuracy"] - full.history[-1]["accuracy"]) <= 0.02

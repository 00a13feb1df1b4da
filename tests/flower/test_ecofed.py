"""EcoFed mode: frozen pre-trained extractor, replay (features uploaded every k rounds)."""

import logging

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict

from flwr_gkt.core.edge import EdgeRoundConfig, extract, train_edge
from flwr_gkt.core.models import load_pretrained, resnet8
from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.data import client_data, load_dataset
from flwr_gkt.data.partition import held_out_indices, partition_indices
from flwr_gkt.data.pretrain import pretrain_edge
from flwr_gkt.flower.options import SamplingOptions
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_logits,
    encode_logits,
    metrics_record,
)
from tests.helpers.federation import LocalFederation, seeded_builders

NODES = [11, 22, 33]


def federation(every, freeze=False, pretrained=None):
    datas = [client_data(i, 3, fraction=0.005, test_fraction=0.03, seed=0) for i in range(3)]

    def make():
        model = resnet8(10, 1)
        return load_pretrained(model, pretrained) if pretrained else model

    fed = LocalFederation(NODES, datas, seeded_builders(make, 3))
    torch.manual_seed(0)
    server = GKTServer(build_server_model("resnet10", 10), epochs=2, batch_size=32, device="cpu")
    strategy = FedGKT(
        server,
        10,
        feature_shape=(16, 28, 28),
        feature_upload_every=every,
        edge_config=EdgeRoundConfig(batch_size=32, freeze_extractor=freeze),
        sampling=SamplingOptions(min_train_nodes=3, min_evaluate_nodes=3, min_available_nodes=3),
    )
    return fed, strategy, datas


def record_replies(fed):
    seen = []

    def tamper(nid, rnd, reply):
        if reply.metadata.message_type == "train":
            seen.append((rnd, nid, sorted(reply.content.array_records[ARRAYS_KEY].keys())))
        return reply

    fed.tamper = tamper
    return seen


def test_replay_rounds_send_no_features_and_the_server_trains_on_stored_ones():
    fed, strategy, datas = federation(every=2)
    seen = record_replies(fed)
    stored, feature_round = {}, {}
    for rnd in (1, 2, 3, 4):
        fed.run_round(strategy, rnd)
        stored[rnd] = {n: strategy.server.store[n].features for n in NODES}
        feature_round[rnd] = dict(strategy.feature_round)
    keys = {rnd: {tuple(k) for r, _, k in seen if r == rnd} for rnd in (1, 2, 3, 4)}
    assert keys[1] == keys[3] == {("features", "labels", "logits")}
    assert keys[2] == keys[4] == {("logits",)}  # replay rounds: logits only
    n = sum(len(d.y_train) for d in datas)
    rows = strategy.history
    assert [r["nodes-sent-features"] for r in rows] == [3, 0, 3, 0]
    # Replay rounds cost logits only (10 float32 per sample) and the server still
    # trains on every stored sample.
    assert n * 40 < rows[1]["bytes-up-train"] < n * 40 + 3 * 256
    assert rows[0]["bytes-up-train"] > 300 * rows[1]["bytes-up-train"]
    assert all(r["server-train-examples"] == n for r in rows)
    # Features stored in round 1 are kept through round 2 (the same values, though they
    # may wait on disk for round 3), replaced in round 3.
    assert all(torch.equal(stored[2][node], stored[1][node]) for node in NODES)
    assert [feature_round[r] for r in (1, 2, 3, 4)] == [
        dict.fromkeys(NODES, r) for r in (1, 1, 3, 3)
    ]
    # The client logits of the replay round replaced the stored ones.
    assert strategy.server.stored_round == {n: 4 for n in NODES}


def test_upload_once_asks_again_only_when_the_features_are_gone(caplog):
    fed, strategy, _ = federation(every=0)
    seen = record_replies(fed)
    fed.run_round(strategy, 1)
    fed.run_round(strategy, 2)
    strategy.server.store.remove(22)  # e.g. evicted
    fed.run_round(strategy, 3)
    with_features = {(r, nid) for r, nid, k in seen if "features" in k}
    assert with_features == {(1, 11), (1, 22), (1, 33), (3, 22)}


def test_logits_only_reply_with_wrong_count_or_features_is_rejected(caplog):
    fed, strategy, _ = federation(every=0)
    fed.run_round(strategy, 1)

    def bad(nid, rnd, reply):
        if reply.metadata.message_type != "train":
            return reply
        arrays = reply.content.array_records[ARRAYS_KEY]
        if nid == 22:
            arrays["logits"] = Array(arrays["logits"].numpy()[:-1].copy())
        if nid == 33:
            arrays["features"] = Array(np.zeros((1, 16, 28, 28), np.float32))
        return reply

    fed.tamper = bad
    before = strategy.server.store.logits([22])
    with caplog.at_level(logging.WARNING):
        (_, metrics), _ = fed.run_round(strategy, 2)
    assert metrics["nodes-replied"] == 1 and metrics["nodes-rejected"] == 2
    text = caplog.text
    assert "reply of node 22 rejected" in text and "(the stored samples of this node)" in text
    assert "reply of node 33 rejected: features sent in a logits-only round" in text
    assert torch.equal(strategy.server.store.logits([22]), before)  # nothing stored was lost


def test_decode_logits_validates():
    spec = PayloadSpec(10)
    good = RecordDict(
        {ARRAYS_KEY: encode_logits(np.zeros((5, 10)), "float16"), METRICS_KEY: metrics_record(5)}
    )
    assert decode_logits(good, spec, 5).shape == (5, 10)
    with pytest.raises(PayloadError, match="says 5 but 6 samples are stored"):
        decode_logits(
            RecordDict(
                {ARRAYS_KEY: encode_logits(np.zeros((6, 10))), METRICS_KEY: metrics_record(5)}
            ),
            spec,
            6,
        )
    nan = np.zeros((5, 10), np.float32)
    nan[2, 3] = np.nan
    with pytest.raises(PayloadError, match="NaN"):
        decode_logits(
            RecordDict({ARRAYS_KEY: encode_logits(nan), METRICS_KEY: metrics_record(5)}), spec, 5
        )
    with pytest.raises(PayloadError, match="dtype"):
        decode_logits(
            RecordDict(
                {
                    ARRAYS_KEY: ArrayRecord({"logits": Array(np.zeros((5, 10), np.int32))}),
                    METRICS_KEY: metrics_record(5),
                }
            ),
            spec,
            5,
        )


def test_frozen_extractor_keeps_features_fixed_while_the_classifier_learns():
    data = client_data(0, 3, fraction=0.005, test_fraction=0.03, seed=0)
    torch.manual_seed(0)
    model = resnet8(10, 1)
    extractor = {k: v.clone() for k, v in model.extractor.state_dict().items()}
    classifier = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    before, _ = extract(model, data.x_train, 32, torch.device("cpu"))
    cfg = EdgeRoundConfig(batch_size=16, epochs=2, lr=0.01, freeze_extractor=True)
    train_edge(
        model,
        data.x_train,
        data.y_train,
        None,
        cfg,
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    after, _ = extract(model, data.x_train, 32, torch.device("cpu"))
    # Weights and batch-norm statistics of f_e unchanged: identical features.
    assert all(torch.equal(v, extractor[k]) for k, v in model.extractor.state_dict().items())
    assert torch.equal(before, after)
    assert any(not torch.equal(v, classifier[k]) for k, v in model.classifier.state_dict().items())
    # Without freezing, the same training changes the features.
    torch.manual_seed(0)
    free = resnet8(10, 1)
    train_edge(
        free,
        data.x_train,
        data.y_train,
        None,
        EdgeRoundConfig(batch_size=16, epochs=2, lr=0.01),
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    assert not torch.equal(extract(free, data.x_train, 32, torch.device("cpu"))[0], before)


def test_pretrain_on_held_out_samples_and_load_the_extractor(tmp_path):
    labels = load_dataset("fashion-mnist").y_train.numpy()
    held = held_out_indices(len(labels), 3, seed=0, fraction=0.01)
    parts = partition_indices(labels, 3, seed=0, fraction=0.01)
    used = np.concatenate(parts)
    assert len(np.intersect1d(held, used)) == 0 and len(held) + len(used) == len(labels)

    path = tmp_path / "edge.pt"
    result = pretrain_edge(
        path, fraction=0.01, num_partitions=3, samples=1024, epochs=3, batch_size=32, device="cpu"
    )
    assert result["samples"] == 1024 and result["test-accuracy"] > 0.3  # 10 classes: chance is 0.1
    torch.manual_seed(5)
    model = load_pretrained(resnet8(10, 1), path)
    saved = torch.load(path, weights_only=True)
    assert all(
        torch.equal(v, saved[f"extractor.{k}"]) for k, v in model.extractor.state_dict().items()
    )
    assert not torch.equal(
        model.classifier[-1].weight, saved["classifier.3.weight"]
    )  # extractor only
    # An extractor-only file loads too.
    torch.save(model.extractor.state_dict(), tmp_path / "extractor.pt")
    other = load_pretrained(resnet8(10, 1), tmp_path / "extractor.pt")
    assert torch.equal(other.extractor[0].weight, model.extractor[0].weight)


def test_ecofed_federation_with_pretrained_frozen_extractor_learns(tmp_path):
    path = tmp_path / "edge.pt"
    pretrain_edge(
        path, fraction=0.005, num_partitions=3, samples=1024, epochs=2, batch_size=32, device="cpu"
    )
    fed, strategy, _datas = federation(every=0, freeze=True, pretrained=str(path))
    seen = record_replies(fed)
    for rnd in (1, 2, 3):
        _, eval_metrics = fed.run_round(strategy, rnd)
    assert {r for r, _, k in seen if "features" in k} == {1}
    assert eval_metrics["accuracy"] > 0.3

"""Features stored in their wire dtype, device-resident and prefetched batches."""

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict

from flwr_gkt.core.payload import Payload, QuantizedBatch
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.store import FeatureStore
from flwr_gkt.core.training import to_device
from flwr_gkt.flower.options import SamplingOptions
from flwr_gkt.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_payload,
    encode_payload,
    metrics_record,
)
from tests.helpers.gkt import SHAPE, tiny_server_model

SPEC = PayloadSpec(10, SHAPE)
CPU = torch.device("cpu")


def _server(**kwargs) -> GKTServer:
    torch.manual_seed(0)
    return GKTServer(tiny_server_model(), epochs=2, batch_size=16, device="cpu", seed=3, **kwargs)


def _reply(node: int, n: int, dtype: str) -> Payload:
    gen = torch.Generator().manual_seed(node)
    features = torch.relu(torch.randn((n, *SHAPE), generator=gen)) * (1 + node)
    labels = torch.randint(0, 10, (n,), generator=gen)
    logits = torch.randn((n, 10), generator=gen)
    record = encode_payload(features, labels, logits, feature_dtype=dtype)
    content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(n)})
    return decode_payload(content, SPEC, with_logits=True)


def _dense(p: Payload) -> Payload:
    """The reference: the same payload, dequantised / upcast up front."""
    return Payload(p.dense_features().clone(), p.labels, p.logits)


def _train(server: GKTServer, payloads: dict[int, Payload]) -> dict[int, torch.Tensor]:
    for node, p in payloads.items():
        server.put(node, p)
    server.train_round()
    server.train_round()
    return dict(server.logits)


@pytest.mark.parametrize("dtype", ["int8", "float16"])
def test_training_on_stored_wire_dtype_equals_dequantising_everything_first(dtype):
    replies = {n: _reply(n, 40 + n, dtype) for n in (1, 2, 3)}
    want = {"int8": torch.int8, "float16": torch.float16}[dtype]
    assert all(p.features.dtype == want for p in replies.values())
    stored, reference = _server(), _server()
    got = _train(stored, replies)
    expected = _train(reference, {n: _dense(p) for n, p in replies.items()})
    for node in replies:
        assert torch.allclose(got[node], expected[node], atol=1e-5, rtol=1e-5)
    for a, b in zip(stored.model.parameters(), reference.model.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_memory_budget_counts_stored_bytes():
    f32, i8 = FeatureStore(), FeatureStore()
    f32.put(1, _reply(1, 64, "float32"))
    i8.put(1, _reply(1, 64, "int8"))
    features = 64 * int(np.prod(SHAPE))
    assert f32.memory_bytes - i8.memory_bytes == features * 3 - 2 * SHAPE[0] * 4
    assert i8.memory_bytes < f32.memory_bytes / 2


def test_spilled_int8_features_train_like_in_memory_ones(tmp_path):
    replies = {n: _reply(n, 30, "int8") for n in (1, 2)}
    spilling = _server(memory_budget=1, spill_dir=tmp_path)
    got = _train(spilling, replies)
    assert spilling.store.is_spilled(1) and spilling.store.is_spilled(2)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy", ".npy"]
    assert spilling.store.disk_bytes == 60 * int(np.prod(SHAPE))  # int8 on disk too
    expected = _train(_server(), replies)
    for node in replies:
        assert torch.equal(got[node], expected[node])
    assert torch.equal(spilling.store[1].features, replies[1].features)


def test_resident_and_streamed_batches_give_identical_logits():
    replies = {n: _reply(n, 50, "int8") for n in (1, 2, 3)}
    one_node = 50 * int(np.prod(SHAPE))
    streamed = _train(_server(device_memory_budget=0), replies)
    resident = _server(device_memory_budget=10 * one_node)
    got = _train(resident, replies)
    assert set(resident.store._resident) == {1, 2, 3}
    partly = _server(device_memory_budget=one_node)  # one node resident, two streamed
    part = _train(partly, replies)
    assert set(partly.store._resident) == {1}
    for node in replies:
        assert torch.equal(got[node], streamed[node])
        assert torch.equal(part[node], streamed[node])


def test_a_node_stored_again_leaves_the_device():
    store = FeatureStore()
    store.put(1, _reply(1, 20, "float32"))
    assert store.make_resident(CPU, 10**9) == 20 * int(np.prod(SHAPE)) * 4 == store.resident_bytes
    store.put(1, _reply(5, 20, "float32"))
    assert 1 not in store._resident
    store.make_resident(CPU, 10**9)
    assert torch.equal(store._resident[1], store[1].features)


def test_prefetched_batches_equal_plain_ones():
    store = FeatureStore()
    for n in (1, 2):
        store.put(n, _reply(n, 37, "int8"))
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    plain = list(store.batches([1, 2], 16, True, gen_a))
    ahead = list(store.batches([1, 2], 16, True, gen_b, prefetch=True))
    assert len(plain) == len(ahead) == 5
    for (xa, ya, ia), (xb, yb, ib) in zip(plain, ahead, strict=True):
        assert isinstance(xa, QuantizedBatch) and isinstance(xb, QuantizedBatch)
        assert torch.equal(to_device(xa, CPU), to_device(xb, CPU))
        assert torch.equal(ya, yb) and torch.equal(ia, ib)


def test_a_batch_mixing_codecs_is_converted_to_float32():
    store = FeatureStore()
    store.put(1, _reply(1, 10, "int8"))
    store.put(2, _reply(2, 10, "float16"))
    store.put(3, _reply(3, 10, "float32"))
    rows = store.gather([1, 2, 3], torch.tensor([0, 12, 25, 3]))
    assert isinstance(rows, torch.Tensor) and rows.dtype == torch.float32
    expected = torch.stack(
        [
            store[1].dense_features()[0],
            store[2].dense_features()[2],
            store[3].dense_features()[5],
            store[1].dense_features()[3],
        ]
    )
    assert torch.equal(rows, expected)


def test_int8_parameters_that_overflow_are_rejected():
    p = _reply(1, 5, "int8")
    record = encode_payload(p.dense_features(), p.labels, p.logits, feature_dtype="int8")
    record["feature-scale"] = Array(np.full(SHAPE[0], 3e38, np.float32))
    content = RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(5)})
    with pytest.raises(PayloadError, match="overflows"):
        decode_payload(content, SPEC, with_logits=True)


def test_features_to_be_replaced_wait_on_disk_and_a_silent_node_keeps_them(tmp_path):
    from flwr.app import ArrayRecord, ConfigRecord, Message

    from flwr_gkt.flower.strategy import FedGKT

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    server = _server(spill_dir=tmp_path)
    strategy = FedGKT(
        server, 10, feature_shape=SHAPE, sampling=SamplingOptions(min_available_nodes=2)
    )
    for node in (1, 2):
        server.put(node, _reply(node, 20, "float32"))
    kept = server.store[2].features.clone()
    sent = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert server.store.is_spilled(1) and server.store.is_spilled(2)
    assert server.store.memory_bytes < 2 * 20 * int(np.prod(SHAPE))  # labels and logits only
    fresh = _reply(7, 20, "float32")
    content = RecordDict(
        {
            ARRAYS_KEY: encode_payload(fresh.features, fresh.labels, fresh.logits),
            METRICS_KEY: metrics_record(20),
        }
    )
    strategy.aggregate_train(1, [Message(content, reply_to=sent[0])])  # node 2 stays silent
    assert not server.store.is_spilled(1) and torch.equal(server.store[1].features, fresh.features)
    assert server.store.is_spilled(2) and torch.equal(server.store[2].features, kept)
    assert len(list(tmp_path.iterdir())) == 1  # node 1's old file is gone
    assert strategy.history[-1]["server-train-examples"] == 40  # both nodes trained on


@pytest.mark.parametrize("fraction_train", [1.0, 0.5])
def test_features_go_to_disk_when_evaluation_starts_if_every_node_trains(tmp_path, fraction_train):
    """... and come back into memory after the last round's evaluation."""
    from flwr.app import ArrayRecord, ConfigRecord

    from flwr_gkt.flower.strategy import FedGKT

    class Grid:
        def get_node_ids(self):
            return [1, 2]

    server = _server(spill_dir=tmp_path)
    strategy = FedGKT(
        server,
        10,
        feature_shape=SHAPE,
        sampling=SamplingOptions(min_available_nodes=2, fraction_train=fraction_train),
    )
    for node in (1, 2):
        server.put(node, _reply(node, 20, "float32"))
        strategy.nodes.trained.add(node)
    kept = server.store[2].features.clone()
    sent = list(strategy.configure_evaluate(1, ArrayRecord(), ConfigRecord(), Grid()))
    assert len(sent) == 2
    # every node trains next round: their features wait on disk through the evaluation;
    # with client sampling a node may not be asked again, and its features stay in memory
    spilled = fraction_train == 1.0
    assert server.store.is_spilled(1) is spilled and server.store.is_spilled(2) is spilled
    assert torch.equal(server.store[2].features, kept)  # read back from disk unchanged
    strategy.num_rounds = 2
    strategy.aggregate_evaluate(1, [])  # no reply at all: the round still goes on
    assert server.store.is_spilled(1) is spilled and server.store.is_spilled(2) is spilled
    strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), Grid())
    strategy.aggregate_evaluate(2, [])  # the last round: the store is left as trained on
    assert not server.store.is_spilled(1) and not server.store.is_spilled(2)
    assert torch.equal(server.store[2].features, kept) and not list(tmp_path.iterdir())

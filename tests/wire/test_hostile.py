"""Hostile payloads -- limits, robust outlier check, logit clipping, training guard, fuzzing."""

import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_gkt.core.robust import find_outliers
from flwr_gkt.flower.options import TrustOptions, WireOptions
from flwr_gkt.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_logits,
    decode_payload,
    encode_payload,
)
from tests.helpers.federation import FakeGrid
from tests.helpers.gkt import SHAPE, N, honest, make_strategy, reply_to, statuses, train_round


def test_scaled_features_are_an_outlier_the_others_train_and_the_stored_payload_stays(caplog):
    strategy = make_strategy()
    train_round(strategy, 1)
    before = strategy.server.store[44].features.clone()
    with caplog.at_level(logging.WARNING):
        train_round(strategy, 2, lambda n, f, y, z: (f * 1000, y, z) if n == 44 else (f, y, z))
    got = statuses(strategy, 2)
    assert got[44][0] == "rejected" and "outlier: feature-norm" in got[44][1]
    assert all(got[n][0] == "accepted" for n in (11, 22, 33))
    assert "train reply of node 44 rejected: outlier" in caplog.text
    torch.testing.assert_close(strategy.server.store[44].features, before)  # round 1's data kept
    row = strategy.history[-1]
    assert row["nodes-rejected"] == 1 and row["nodes-replied"] == 3
    assert np.isfinite(row["server-train-loss"]) and row["server-train-examples"] == 4 * N


def test_huge_logits_are_an_outlier_and_clipped_when_the_check_is_off():
    strategy = make_strategy()
    # within the magnitude bound, but 1000x the other nodes' logits
    train_round(strategy, 1, lambda n, f, y, z: (f, y, z * 1e3) if n == 22 else (f, y, z))
    assert (
        statuses(strategy, 1)[22][0] == "rejected" and "logit-norm" in statuses(strategy, 1)[22][1]
    )
    clipped = make_strategy(trust=TrustOptions(outlier_threshold=0.0, logit_clip=20.0))
    train_round(clipped, 1, lambda n, f, y, z: (f, y, z * 1e4) if n == 22 else (f, y, z))
    assert statuses(clipped, 1)[22][0] == "accepted"
    assert clipped.server.store[22].logits.abs().max() == 20.0


def test_size_and_sample_count_limits_reject_before_anything_is_stored():
    nbytes = len(encode_payload(*honest(11, 1)).__getitem__("features").data)
    strategy = make_strategy(wire=WireOptions(max_payload_bytes=2 * nbytes, max_samples=2 * N))

    def big(n, f, y, z):
        if n == 11:  # 4x the samples: over the byte limit
            return f.repeat(4, 1, 1, 1), y.repeat(4), z.repeat(4, 1)
        if (
            n == 22
        ):  # under the byte limit (smaller maps would fail the shape check anyway) but too many samples
            return f.repeat(3, 1, 1, 1)[:, :, :4], y.repeat(3), z.repeat(3, 1)
        return f, y, z

    train_round(strategy, 1, big)
    got = statuses(strategy, 1)
    assert got[11][0] == "rejected" and "over the limit" in got[11][1]
    assert got[22][0] == "rejected" and "more than the limit 24" in got[22][1]
    assert 11 not in strategy.server.store and 22 not in strategy.server.store
    assert got[33][0] == got[44][0] == "accepted"


def test_a_poisoned_update_is_undone_and_its_payload_evicted_by_the_training_guard(caplog):
    strategy = make_strategy(
        nodes=[11, 22], trust=TrustOptions(outlier_threshold=0.0)
    )  # 2 nodes: no median to compare with
    strategy.gate.max_abs_value = 0  # the magnitude rule off too: the guard behind the gate
    train_round(strategy, 1, nodes=[11, 22])
    weights = {k: v.clone() for k, v in strategy.server.model.state_dict().items()}
    logits = strategy.server.server_logits(11).clone()
    with caplog.at_level(logging.WARNING):
        train_round(
            strategy,
            2,
            lambda n, f, y, z: (f * 3e38, y, z) if n == 22 else (f, y, z),
            nodes=[11, 22],
        )
    assert "server training produced non-finite" in caplog.text
    # the guard found the payload responsible, evicted it and trained without it
    assert "payload of node 22 evicted" in caplog.text and 22 not in strategy.server.store
    assert np.isfinite(strategy.history[-1]["server-train-loss"])
    assert any(
        not torch.equal(v, weights[k]) for k, v in strategy.server.model.state_dict().items()
    )
    assert not torch.equal(strategy.server.server_logits(11), logits)
    assert all(torch.isfinite(p).all() for p in strategy.server.model.parameters())
    train_round(strategy, 3, nodes=[11, 22])  # honest again: training goes on
    assert np.isfinite(strategy.history[-1]["server-train-loss"])


def test_find_outliers_needs_three_payloads_and_tolerates_honest_spread():
    assert find_outliers([{"x": 1.0}, {"x": 100.0}], 10) == [None, None]
    honest_spread = [{"x": v} for v in (9.0, 10.0, 11.0, 12.5, 8.0)]
    assert find_outliers(honest_spread, 10) == [None] * 5
    reasons = find_outliers([*honest_spread, {"x": 300.0}, None, {"x": float("inf")}], 10)
    assert reasons[:5] == [None] * 5 and reasons[5] and reasons[6] is None and reasons[7]


# ------------------------------------------------------------------------- fuzzing
DTYPES = ["float32", "float16", "float64", "int8", "int32", "int64", "uint8", "bool"]
KEYS = ["features", "labels", "logits", "feature-min", "feature-scale", "extra"]
VALUES = st.sampled_from(
    [0.0, -1.0, 1.0, 9.0, 10.0, 1e4, 3e38, -3e38, np.nan, np.inf, -np.inf, 255.0]
)


@st.composite
def arrays(draw):
    """A random Array: a real numpy array of random dtype/shape/values, or garbage bytes."""
    if draw(st.integers(0, 9)) == 0:
        return Array(
            dtype=draw(st.sampled_from(DTYPES)),
            shape=tuple(draw(st.lists(st.integers(0, 40), max_size=4))),
            stype="numpy.ndarray",
            data=draw(st.binary(max_size=200)),
        )
    shape = draw(
        st.sampled_from(
            [
                (N, *SHAPE),
                (N,),
                (N, 10),
                (16,),
                (N, 16, 8),
                (0, *SHAPE),
                (3, 10),
                (N, 10, 1),
                (),
                (2, *SHAPE),
            ]
        )
    )
    dtype = draw(st.sampled_from(DTYPES))
    base = draw(VALUES)
    with np.errstate(all="ignore"):
        x = np.full(shape, base).astype(dtype)
        if x.size and draw(st.booleans()):
            x.flat[draw(st.integers(0, x.size - 1))] = np.array(draw(VALUES)).astype(dtype)
    return Array(np.ascontiguousarray(x))


@st.composite
def contents(draw):
    """Reply content: a mutated honest payload or a random one, with random metrics."""
    f, y, z = honest(11, 1)
    record = encode_payload(
        f, y, z, feature_dtype=draw(st.sampled_from(["float32", "float16", "int8"]))
    )
    if draw(st.booleans()):
        record = ArrayRecord({k: v for k, v in record.items() if draw(st.booleans())})
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=3)):
        record[key] = draw(arrays())
    metrics = draw(
        st.sampled_from(
            [
                {"num-examples": N},
                {"num-examples": N + 1},
                {"num-examples": -1},
                {"num-examples": 2**40},
                {"num-examples": 1.5},
                {},
            ]
        )
    )
    content = RecordDict({METRICS_KEY: MetricRecord(metrics)})
    if draw(st.integers(0, 9)):
        content[ARRAYS_KEY] = record
    return content


FUZZ = {"decoded": 0, "aggregated": 0}


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(contents(), st.booleans())
def test_fuzz_decoder_returns_a_valid_payload_or_a_payload_error(content, with_logits):
    FUZZ["decoded"] += 1
    spec = PayloadSpec(10, SHAPE, max_samples=100)
    for decode in (
        lambda: decode_payload(content, spec, with_logits),
        lambda: decode_logits(content, spec, N),
    ):
        try:
            payload = decode()
        except PayloadError:
            continue
        logits = payload if isinstance(payload, torch.Tensor) else payload.logits
        if not isinstance(payload, torch.Tensor):
            assert payload.features.shape[1:] == SHAPE and torch.isfinite(payload.features).all()
            assert len(payload.labels) == len(payload.features) > 0
            assert payload.labels.min() >= 0 and payload.labels.max() < 10
        if logits is not None:
            assert logits.shape[1] == 10 and torch.isfinite(logits).all()


FUZZ_STRATEGY = make_strategy(nodes=[11, 22])


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(contents())
def test_fuzz_aggregation_never_raises_and_keeps_the_honest_node(content):
    FUZZ["aggregated"] += 1
    strategy = FUZZ_STRATEGY
    strategy.server.epochs = 1
    rnd = len(strategy.history) + 1
    instructions = list(
        strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), FakeGrid([11, 22]))
    )
    by_node = {m.metadata.dst_node_id: m for m in instructions}
    stored = strategy.server.store.get(11)  # (the store stages it out to disk meanwhile)
    replies = [Message(content, reply_to=by_node[11]), reply_to(by_node[22], *honest(22, rnd))]
    strategy.aggregate_train(rnd, replies)
    got = statuses(strategy, rnd)
    assert got[22][0] == "accepted"
    if got[11][0] != "accepted" and stored is not None:
        kept = strategy.server.store[11]  # a rejected reply changes nothing stored
        assert torch.equal(kept.features, stored.features)
        assert torch.equal(kept.labels, stored.labels) and torch.equal(kept.logits, stored.logits)
    assert all(torch.isfinite(p).all() for p in strategy.server.model.parameters())


def test_fuzz_counts():
    """Runs after the fuzz tests (file order): how many payloads they threw."""
    print(
        f"\nfuzz: {FUZZ['decoded']} payloads at the decoder, {FUZZ['aggregated']} through aggregate_train"
    )
    assert FUZZ["decoded"] >= 300 and FUZZ["aggregated"] >= 100


def test_payload_statistics_read_bounded_chunks_and_match_the_direct_norms(monkeypatch):
    from flwr_gkt.core import robust
    from flwr_gkt.core.payload import Payload, chunk_rows

    features = torch.randn(300, 16, 28, 28)
    payload = Payload(features, torch.zeros(300, dtype=torch.long), torch.randn(300, 10))
    asked = []
    real = Payload.dense_features

    def spy(self, start=0, stop=None):
        asked.append((stop if stop is not None else len(self.features)) - start)
        return real(self, start, stop)

    monkeypatch.setattr(Payload, "dense_features", spy)
    stats = robust.payload_stats(payload)
    step = chunk_rows(features.shape[1:])
    assert step < 300 and max(asked) <= step  # 16 MB of float64 at a time, not the payload
    norms = features.flatten(1).double().norm(dim=1)
    assert stats["feature-norm"] == float(norms.median())
    assert stats["feature-norm-max"] == float(norms.max())

"""Finite but extreme values and false counts, from every strategy's first reply on.

One node rewrites what the project's own node handlers built (activations,
features, logits, edge weights, embeddings, counts) to values a real model
cannot produce, yet finite (``3e38``), or to weights moved far from the ones
it was sent. The gate's magnitude rule, the bounded weight change, the
server-side counts and the training guards reject or undo each; the honest
nodes finish every round and every history value stays finite.
"""

import copy
import logging
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flwr_gkt.app.inprocess import InProcessGrid
from flwr_gkt.core.payload import Payload
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.split import server_step, state_change
from flwr_gkt.flower.async_strategy import AsyncFedGKT
from flwr_gkt.flower.options import SamplingOptions
from flwr_gkt.flower.split_strategy import SplitLearning, _Turn
from flwr_gkt.wire import (
    ARRAYS_KEY,
    MAX_ABS_VALUE,
    METRICS_KEY,
    PayloadError,
    decode_gradient,
    decode_state,
    encode_activations,
    encode_gradient,
    encode_payload,
    encode_state,
    magnitude_error,
    metrics_record,
    quantize_int8,
)
from flwr_gkt.wire.gate import ReplyGate
from tests.helpers.federation import FakeGrid
from tests.helpers.gkt import SHAPE, N, honest, make_strategy, reply_to, statuses, tiny_server_model
from tests.helpers.gkt import ClientProxy as _Proxy
from tests.helpers.gkt import legacy_fit as _legacy_fit
from tests.helpers.gkt import legacy_strategy as _legacy
from tests.helpers.split import run_split as _run
from tests.helpers.split import split_config as _config
from tests.helpers.split import split_models as _models

HUGE = 3e38
FUZZ = {"split": 0, "gradients": 0, "async-eval": 0}


def _finite_rows(rows):
    return all(
        math.isfinite(float(v))
        for row in rows
        for v in row.values()
        if isinstance(v, int | float) or (isinstance(v, str) and _is_number(v))
    )


def _is_number(text):
    try:
        float(text)
    except ValueError:
        return False
    return True


# ------------------------------------------------------------------ the magnitude rule
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_magnitude_rule_bounds_every_float_and_refuses_nan_and_inf(dtype):
    rows = 3 * 4096  # several chunks of the bit-level pass
    x = torch.zeros(rows, 16, dtype=dtype)
    x[-1, -1] = -MAX_ABS_VALUE  # at the bound: accepted
    assert magnitude_error(x, MAX_ABS_VALUE) is None
    for value in (MAX_ABS_VALUE * 1.01, -2 * MAX_ABS_VALUE, float("nan"), float("inf")):
        if dtype == torch.float16 and abs(value) > 65504:
            value = float("inf") if value > 0 else float("-inf")
        y = x.clone()
        y[rows // 2, 3] = value
        assert "beyond +-10000" in (magnitude_error(y, MAX_ABS_VALUE) or "")
    assert magnitude_error(x[:, ::2], MAX_ABS_VALUE) is None  # non-contiguous views too
    assert magnitude_error(torch.full((3,), 1e9).long(), MAX_ABS_VALUE) is None  # labels skipped


def test_magnitude_rule_reads_payloads_int8_ranges_and_nested_weights():
    f = torch.rand(N, *SHAPE)
    ok = Payload(f, torch.zeros(N, dtype=torch.long), torch.randn(N, 10))
    assert magnitude_error(ok, 1e4) is None
    bad_logits = Payload(f, ok.labels, torch.full((N, 10), 2e4))
    assert magnitude_error(bad_logits, 1e4) == "'logits' holds values beyond +-10000 (or NaN/Inf)"
    q, minimum, scale = quantize_int8((f * 1e5).numpy())  # decodes to values up to 1e5
    int8 = Payload(
        torch.from_numpy(q), ok.labels, None, torch.from_numpy(minimum), torch.from_numpy(scale)
    )
    assert "'features'" in (magnitude_error(int8, 1e4) or "")
    state = {"conv.weight": torch.randn(4, 4), "bn.var": torch.ones(4)}
    assert magnitude_error(state, 1e4) is None
    state["bn.var"] = torch.full((4,), HUGE)
    assert magnitude_error(state, 1e4) == "'bn.var' holds values beyond +-10000 (or NaN/Inf)"
    assert "'array[0]'" in (magnitude_error((torch.full((2,), HUGE), ok.labels), 1e4) or "")


def test_weights_may_move_only_a_bounded_distance_from_the_ones_sent():
    extractor, _ = _models()
    ref = extractor.state_dict()
    moved = {k: v + 0.01 if v.is_floating_point() else v for k, v in ref.items()}
    change, _ = state_change(moved, ref)
    assert change == pytest.approx(
        0.01 * math.sqrt(sum(v.numel() for v in ref.values() if v.is_floating_point())), rel=1e-4
    )
    assert decode_state(encode_state(moved), ref, max_change=10.0).keys() == ref.keys()
    far = {k: v * 50 + 50 if v.is_floating_point() else v for k, v in ref.items()}
    with pytest.raises(PayloadError, match="moved by"):
        decode_state(encode_state(far), ref, max_change=10.0)
    assert decode_state(encode_state(far), ref).keys() == ref.keys()  # unchecked without a bound


# ------------------------------------------------------------------ the split server's guard
def test_split_server_step_that_would_turn_the_model_non_finite_is_undone():
    torch.manual_seed(0)
    _, server = _models()
    optimizer = torch.optim.Adam(server.parameters(), lr=1e-3)
    h, y = torch.randn(4, 16, 4, 4), torch.randint(0, 10, (4,))
    assert server_step(server, optimizer, h, y, torch.device("cpu")).ok  # Adam state exists now
    weights = copy.deepcopy(server.state_dict())
    opt_state = copy.deepcopy(optimizer.state_dict())
    step = server_step(server, optimizer, torch.full_like(h, HUGE), y, torch.device("cpu"))
    assert not step.ok and step.loss == 0.0 and step.correct == 0
    for key, value in server.state_dict().items():  # weights and batch-norm statistics
        assert torch.equal(value, weights[key]), key
    for key, value in optimizer.state_dict()["state"][0].items():
        assert torch.equal(value, opt_state["state"][0][key]), key
    sgd = torch.optim.SGD(server.parameters(), lr=float("inf"))  # finite gradients, inf update
    assert not server_step(server, sgd, h, y, torch.device("cpu")).ok
    assert all(torch.isfinite(p).all() for p in server.parameters())


# ------------------------------------------------------------------ split learning, end to end
def _hostile(app, node, field):
    """A ClientApp whose node ``node`` rewrites ``field`` of every reply it builds."""

    def client(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        if context.node_id != node or reply.has_error():
            return reply
        record = reply.content.array_records.get(ARRAYS_KEY)
        metrics = reply.content.metric_records[METRICS_KEY]
        train = msg.metadata.message_type == "train"
        weights = record is not None and "features" not in record
        if field == "activations" and train and not weights:
            record["features"] = Array(np.full_like(record["features"].numpy(), HUGE))
        elif field == "eval" and not train:
            record["features"] = Array(np.full_like(record["features"].numpy(), HUGE))
        elif field in ("weights", "drift") and weights:
            for key in list(record):
                value = record[key].numpy()
                if value.dtype.kind == "f":
                    record[key] = Array(np.full_like(value, HUGE if field == "weights" else 50.0))
        elif field == "count" and weights:
            metrics["num-examples"] = int(metrics["num-examples"]) * 1000
        return reply

    return client


@pytest.mark.parametrize(
    ("mode", "field", "rounds", "reason"),
    [
        ("sl", "activations", 2, "holds values beyond"),
        ("splitfed-v1", "activations", 2, "holds values beyond"),
        ("splitfed-v2", "activations", 2, "holds values beyond"),
        ("sl", "eval", 1, "holds values beyond"),
        ("sl", "weights", 1, "holds values beyond|moved by"),
        ("splitfed-v2", "weights", 1, "holds values beyond|moved by"),
        ("splitfed-v2", "drift", 1, "moved by"),
        ("splitfed-v1", "count", 1, "but the server trained on"),
        ("splitfed-v2", "count", 1, "but the server trained on"),
    ],
)
def test_split_learning_rejects_extreme_values_and_false_counts(
    tmp_path, mode, field, rounds, reason
):
    from flwr_gkt.app.split_app import make_split_apps

    cfg = _config(
        tmp_path, f"{mode}-{field}", mode, **{"num-server-rounds": rounds, "num-clients": 3}
    )
    _, app = make_split_apps(cfg)
    bad = sorted(InProcessGrid(app, 3).get_node_ids())[0]
    captured = {}
    original = SplitLearning.start

    def start(self, *args, **kwargs):
        captured["strategy"] = self
        return original(self, *args, **kwargs)

    SplitLearning.start = start
    try:
        history, nodes, _, _ = _run(cfg, _hostile(app, bad, field))
    finally:
        SplitLearning.start = original
    strategy = captured["strategy"]
    rejected = [r for r in nodes if r["status"] == "rejected"]
    assert rejected and all(
        int(r["node-id"]) == bad and re.search(reason, r["reason"]) for r in rejected
    )
    assert {int(r["round"]) for r in rejected} == set(range(1, rounds + 1))  # from round 1 on
    assert len(history) == rounds and _finite_rows(history)
    for row in history:
        replied = int(float(row["nodes-replied"]))
        assert replied == (3 if field == "eval" else 2)  # the honest nodes finished their turns
        assert 0 < float(row["accuracy"]) <= 1 and math.isfinite(float(row["loss"]))
    assert int(float(history[0]["eval-nodes"])) == (2 if field == "eval" else 3)
    assert all(torch.isfinite(v).all() for v in strategy.edge_state.values())
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


def _split_strategy():
    extractor, server = _models()
    torch.manual_seed(0)
    return SplitLearning(server, extractor, 10, (16, 4, 4), mode="splitfed-v2", batch_size=8)


def test_splitfed_averages_weights_by_the_samples_the_server_trained_on():
    strategy = _split_strategy()
    turn = _Turn(batches=1, batch=1, samples=8, expects_weights=True)
    ref = {k: v.clone() for k, v in strategy.edge_state.items()}
    content = RecordDict(
        {ARRAYS_KEY: encode_state(ref), METRICS_KEY: metrics_record(8, **{"edge-seconds": 1.0})}
    )
    assert strategy.decode_turn_reply(turn, content).keys() == ref.keys()
    content[METRICS_KEY] = metrics_record(8000)
    with pytest.raises(PayloadError, match="says 8000 but the server trained on 8"):
        strategy.decode_turn_reply(turn, content)


# ------------------------------------------------------------------ FedGKT, sync and async
def test_sync_fedgkt_rejects_huge_features_and_logits_without_a_median():
    strategy = make_strategy(nodes=[11, 22])  # two payloads: no outlier check possible

    def tamper(n, f, y, z):
        return (torch.full_like(f, HUGE), y, z) if n == 22 else (f, y, z * 0 + 1e30)

    instructions = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([11, 22]))
    )
    strategy.aggregate_train(
        1,
        [
            reply_to(m, *tamper(m.metadata.dst_node_id, *honest(m.metadata.dst_node_id, 1)))
            for m in instructions
        ],
    )
    got = statuses(strategy, 1)
    assert "'features' holds values beyond" in got[22][1]
    assert "'logits' holds values beyond" in got[11][1]
    assert not strategy.server.store and _finite_rows(strategy.history)


def test_async_update_whose_guard_evicts_its_node_reports_a_finite_loss(caplog):
    torch.manual_seed(0)
    server = GKTServer(tiny_server_model(), epochs=1, batch_size=16, device="cpu")
    f, y, z = honest(11, 1)
    server.store.put(11, Payload(f, y, z))
    assert server.train_update(11).num_examples == N
    server.store.put(22, Payload(torch.full_like(f, HUGE), y, z))  # past a gate with no rule
    with caplog.at_level(logging.WARNING):
        result = server.train_update(22)
    assert "payload of node 22 evicted" in caplog.text and 22 not in server.store
    assert result.num_examples == 0 and math.isfinite(result.loss) and result.loss == 0.0
    assert math.isfinite(server.train_update(11).loss)  # and training goes on


def _async_strategy():
    torch.manual_seed(0)
    server = GKTServer(tiny_server_model(), epochs=1, batch_size=16, device="cpu")
    return AsyncFedGKT(
        server, 10, feature_shape=SHAPE, sampling=SamplingOptions(min_available_nodes=1)
    )


def _async_train(strategy, node, rnd, features):
    msg = strategy.train_instruction(node, rnd, ConfigRecord())
    _, y, z = honest(node, rnd)
    return strategy._accept(
        rnd,
        "train",
        [reply_to(msg, features, y, z)],
        [msg],
        lambda n, p, m: strategy._store(n, p, rnd),
    )


def test_async_rejects_huge_features_in_a_lone_reply_and_in_evaluation():
    strategy = _async_strategy()
    f, _, _ = honest(11, 1)
    assert _async_train(strategy, 11, 1, f)[0]  # the first reply: accepted
    assert _async_train(strategy, 22, 1, honest(22, 1)[0])[0]
    _, _, rejected = _async_train(strategy, 11, 2, torch.full_like(f, HUGE))  # the second
    assert rejected == 1 and "holds values beyond" in strategy.node_history[-1]["reason"]
    strategy.history.append({"round": 2})
    instructions = list(
        strategy.configure_evaluate(2, ArrayRecord(), ConfigRecord(), FakeGrid([11, 22]))
    )
    replies = []
    for m in instructions:
        g, y, _ = honest(m.metadata.dst_node_id, 2)
        g = torch.full_like(g, HUGE) if m.metadata.dst_node_id == 22 else g
        content = RecordDict(
            {ARRAYS_KEY: encode_payload(g, y, None), METRICS_KEY: metrics_record(len(y))}
        )
        replies.append(Message(content, reply_to=m))
    metrics = strategy.aggregate_evaluate(2, replies)
    assert metrics is not None and metrics["eval-rejected"] == 1 and _finite_rows(strategy.history)


# ------------------------------------------------------------------ FedAgg and legacy
def test_fedagg_embeddings_and_legacy_features_meet_the_same_rule():
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    from flwr_gkt.wire import decode_embeddings, encode_embeddings

    gate = ReplyGate(outlier_threshold=0.0, name="FedAgg")
    instruction = Message(RecordDict(), dst_node_id=5, message_type="train")
    eps, labels = torch.full((6, 4, 2, 2), HUGE), torch.randint(0, 10, (6,))
    reply = Message(
        RecordDict({ARRAYS_KEY: encode_embeddings(eps, labels), METRICS_KEY: metrics_record(6)}),
        reply_to=instruction,
    )
    result = gate.admit(
        1,
        "init",
        [reply],
        [instruction],
        lambda n, c: decode_embeddings(c, 10),
        frozenset({"num-examples"}),
    )
    assert not result.accepted and "holds values beyond" in result.records[0]["reason"]

    strategy = _legacy()
    results = []
    for node in (11, 22, 33):
        f, y, z = honest(node, 1)
        f = torch.full_like(f, HUGE) if node == 33 else f
        params = ndarrays_to_parameters([f.numpy(), z.numpy(), y.numpy()])
        results.append((_Proxy(node), FitRes(Status(Code.OK, ""), params, N, {})))
    _, metrics = _legacy_fit(strategy, 1, results)
    assert metrics["nodes-rejected"] == 1 and 33 not in strategy.server.store
    assert math.isfinite(metrics["server-train-loss"])


def test_metrics_outside_their_meaning_are_dropped_not_averaged():
    strategy = make_strategy(nodes=[11, 22])
    instructions = list(
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([11, 22]))
    )
    replies = [reply_to(m, *honest(m.metadata.dst_node_id, 1)) for m in instructions]
    replies[0].content[METRICS_KEY]["edge-train-accuracy"] = 1e30
    replies[0].content[METRICS_KEY]["edge-train-loss"] = -5.0
    replies[1].content[METRICS_KEY]["edge-train-accuracy"] = 0.5
    strategy.aggregate_train(1, replies)
    row = strategy.history[-1]
    assert row["edge-train-accuracy"] <= 1.0
    rows = [r for r in strategy.node_history if r.get("metrics-dropped")]
    assert len(rows) == 1 and rows[0]["metrics-dropped"] == 2


# ------------------------------------------------------------------ fuzzing
VALUES = st.sampled_from(
    [0.0, 1.0, -1.0, 9999.0, 1e4, 1.0001e4, 65504.0, 1e6, 1e30, 3e38, -3e38, np.nan, np.inf]
)


@st.composite
def split_replies(draw):
    """A split-learning train reply: activations or weights, honest or with extreme values."""
    weights = draw(st.booleans())
    if weights:
        extractor, _ = _models()
        state = {k: v.clone() for k, v in extractor.state_dict().items()}
        for key in draw(st.lists(st.sampled_from(sorted(state)), max_size=3)):
            if state[key].is_floating_point():
                flat = state[key].view(-1)
                flat[draw(st.integers(0, flat.numel() - 1))] = draw(VALUES)
        record = encode_state(state)
    else:
        h = torch.randn(8, 16, 4, 4)
        if draw(st.booleans()):
            h.view(-1)[draw(st.integers(0, h.numel() - 1))] = draw(VALUES)
        if draw(st.booleans()):
            h = h * draw(st.sampled_from([1.0, 100.0, 1e3, 1e5]))
        with np.errstate(all="ignore"):
            record = encode_activations(
                h, torch.randint(0, 10, (8,)), draw(st.sampled_from(["float32", "float16", "int8"]))
            )
    count = draw(st.sampled_from([8, 8, 0, 9, 8000, -1]))
    metrics = MetricRecord(
        {"num-examples": count, "batches": draw(st.sampled_from([1, 2, 0, 10**9]))}
    )
    return weights, RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics})


FUZZ_SPLIT = _split_strategy()


@settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(split_replies())
def test_fuzz_split_replies_are_rejected_or_train_a_finite_server(reply):
    weights, content = reply
    strategy = FUZZ_SPLIT
    turn = _Turn(batches=1, batch=1, samples=8, expects_weights=True) if weights else _Turn()
    instruction = Message(RecordDict(), dst_node_id=7, message_type="train")
    result = strategy.gate.admit(
        1,
        "step",
        [Message(content, reply_to=instruction)],
        [instruction],
        lambda n, c: strategy.decode_turn_reply(turn, c),
        frozenset({"num-examples", "batches"}),
    )
    FUZZ["split"] += 1
    if not result.accepted:
        assert result.rejected == 1 and result.records[0]["status"] == "rejected"
        return
    payload = result.accepted[0].payload
    assert magnitude_error(payload, MAX_ABS_VALUE) is None
    if weights:
        change, size = state_change(payload, strategy.edge_state)
        assert change <= 10.0 * max(size, 1.0)
        return
    from collections import defaultdict

    strategy.step(7, payload, turn, defaultdict(float), 1)
    assert all(torch.isfinite(p).all() for p in strategy.model.parameters())


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    st.lists(st.tuples(st.integers(0, 4 * 16 * 4 * 4 - 1), VALUES), max_size=4),
    st.sampled_from(["float32", "float16"]),
)
def test_fuzz_gradients_reach_a_node_finite_and_bounded_or_not_at_all(cells, dtype):
    g = torch.randn(4, 16, 4, 4)
    for index, value in cells:
        g.view(-1)[index] = value
    with np.errstate(all="ignore"):
        content = RecordDict({ARRAYS_KEY: encode_gradient(g, dtype)})
    FUZZ["gradients"] += 1
    try:
        out = decode_gradient(content, (4, 16, 4, 4))
    except PayloadError:
        return
    assert out.shape == (4, 16, 4, 4) and magnitude_error(out, MAX_ABS_VALUE) is None


FUZZ_ASYNC_EVAL = _async_strategy()


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
)
@given(
    st.lists(st.tuples(st.integers(0, N * 16 * 8 * 8 - 1), VALUES), max_size=4),
    st.booleans(),
    st.sampled_from(["float32", "float16", "int8"]),
)
def test_fuzz_async_evaluation_keeps_every_history_value_finite(cells, scale, dtype):
    strategy = FUZZ_ASYNC_EVAL
    for node in {11, 22} - set(strategy.server.store):  # both trained: both asked to evaluate
        _async_train(strategy, node, 1, honest(node, 1)[0])
    rnd = len(strategy.history) + 2
    strategy.history.append({"round": rnd})
    instructions = list(
        strategy.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(), FakeGrid([11, 22]))
    )
    replies = []
    for m in instructions:
        f, y, _ = honest(m.metadata.dst_node_id, rnd)
        if m.metadata.dst_node_id == 22:
            for index, value in cells:
                f.view(-1)[index] = value
            f = f * 1e4 if scale else f
        with np.errstate(all="ignore"):
            record = encode_payload(f, y, None, feature_dtype=dtype)
        replies.append(
            Message(
                RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(len(y))}), reply_to=m
            )
        )
    metrics = strategy.aggregate_evaluate(rnd, replies)
    FUZZ["async-eval"] += 1
    assert metrics is not None and _finite_rows(strategy.history)
    assert statuses(strategy, rnd)[11][0] == "accepted"


def test_fuzz_counts():
    """Runs after the fuzz tests (file order): how many generated replies went through."""
    print(
        f"\nextreme-value fuzz: {FUZZ['split']} split-learning replies, {FUZZ['gradients']} "
        f"gradients, {FUZZ['async-eval']} async evaluation rounds"
    )
    assert FUZZ["split"] >= 150 and FUZZ["gradients"] >= 100 and FUZZ["async-eval"] >= 100

"""Split learning and SplitFed V1 / V2 on Flower (exactness, averaging, bytes, gate)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Array, Context, Message, RecordDict

from flwr_gkt.app.inprocess import InProcessGrid
from flwr_gkt.app.split_app import make_split_apps
from flwr_gkt.core.efficiency import communication_costs
from flwr_gkt.core.split import average_states, edge_activations, edge_backward, server_step
from flwr_gkt.flower.split_client import STATE_EXTRACTOR
from flwr_gkt.wire import (
    ARRAYS_KEY,
    METRICS_KEY,
    PayloadError,
    PayloadSpec,
    decode_activations,
    decode_gradient,
    decode_state,
    encode_activations,
    encode_gradient,
    encode_state,
    metrics_record,
    record_nbytes,
)
from tests.helpers.split import run_split as _run
from tests.helpers.split import split_config as _config
from tests.helpers.split import split_models as _models

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_split_step_has_the_gradients_of_the_unsplit_model():
    extractor, server = _models()
    ext_ref, srv_ref = copy.deepcopy(extractor), copy.deepcopy(server)
    torch.manual_seed(1)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))

    # the unsplit network on the batch
    ext_ref.train(), srv_ref.train()
    F.cross_entropy(srv_ref(ext_ref(x)), y).backward()

    # the split step, through the wire (float32 both ways)
    h = edge_activations(extractor, x, CPU)
    content = RecordDict(
        {ARRAYS_KEY: encode_activations(h, y), METRICS_KEY: metrics_record(len(y))}
    )
    payload = decode_activations(content, PayloadSpec(10, tuple(h.shape[1:]), 8))
    step = server_step(server, None, payload.dense_features(), payload.labels, CPU)
    grad = decode_gradient(RecordDict({ARRAYS_KEY: encode_gradient(step.gradient)}), tuple(h.shape))
    edge_backward(extractor, None, x, grad, CPU)

    for split, ref in ((extractor, ext_ref), (server, srv_ref)):
        for (name, p), (_, q) in zip(split.named_parameters(), ref.named_parameters(), strict=True):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5, msg=name)
        # batch-norm statistics updated once, as by the unsplit forward pass
        for (name, b), (_, c) in zip(split.named_buffers(), ref.named_buffers(), strict=True):
            torch.testing.assert_close(b, c, atol=1e-6, rtol=1e-5, msg=name)


def test_average_states_is_the_weighted_mean():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([5.0, 6.0]), "n": torch.tensor(7)}
    out = average_states([a, b], [1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([4.0, 5.0]))
    assert int(out["n"]) == 7  # integer buffers: from the largest weight
    with pytest.raises(ValueError):
        average_states([a], [0.0])


def test_split_payloads_are_validated():
    spec = PayloadSpec(10, (16, 4, 4), 8)
    h, y = torch.randn(4, 16, 4, 4), torch.randint(0, 10, (4,))

    def content(h, y, n=None):
        return RecordDict(
            {ARRAYS_KEY: encode_activations(h, y), METRICS_KEY: metrics_record(n or len(y))}
        )

    assert decode_activations(content(h, y), spec).features.shape == (4, 16, 4, 4)
    bad = h.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(PayloadError, match="NaN"):
        decode_activations(content(bad, y), spec)
    with pytest.raises(PayloadError, match="shape"):
        decode_activations(content(torch.randn(4, 8, 4, 4), y), spec)
    with pytest.raises(PayloadError, match="limit"):
        decode_activations(
            content(torch.randn(9, 16, 4, 4), torch.zeros(9, dtype=torch.long)), spec
        )
    with pytest.raises(PayloadError, match="says"):
        decode_activations(content(h, y, n=3), spec)
    # gradients: shape and finiteness
    with pytest.raises(PayloadError, match="shape"):
        decode_gradient(RecordDict({ARRAYS_KEY: encode_gradient(h[:2])}), tuple(h.shape))
    with pytest.raises(PayloadError, match="NaN"):
        decode_gradient(RecordDict({ARRAYS_KEY: encode_gradient(bad)}), tuple(h.shape))
    half = decode_gradient(RecordDict({ARRAYS_KEY: encode_gradient(h, "float16")}), tuple(h.shape))
    assert half.dtype == torch.float32
    # weights: keys, dtypes, shapes, finiteness
    extractor, _ = _models()
    ref = extractor.state_dict()
    assert decode_state(encode_state(ref), ref).keys() == ref.keys()
    record = encode_state(ref)
    key = next(k for k, v in ref.items() if v.is_floating_point())
    record[key] = Array(np.full(tuple(ref[key].shape), np.nan, dtype=np.float32))
    with pytest.raises(PayloadError, match="NaN"):
        decode_state(record, ref)
    record = encode_state({**ref, "extra": torch.zeros(1)})
    with pytest.raises(PayloadError, match="unexpected"):
        decode_state(record, ref)


@pytest.mark.parametrize("mode", ["sl", "splitfed-v1", "splitfed-v2"])
def test_each_mode_learns_and_counts_every_byte(tmp_path, mode):
    cfg = _config(tmp_path, mode, mode, **{"num-server-rounds": 2})
    history, _, results, grid = _run(cfg)
    assert results["algorithm"] == mode
    assert [int(float(h["nodes-replied"])) for h in history] == [2, 2]
    # learning through the split: the loss falls, the training batches are classified above
    # chance (the test accuracy after 2 tiny rounds mostly reflects batch-norm running
    # statistics that have seen ~12 updates, so it is only checked to be there)
    assert float(history[-1]["server-train-loss"]) < float(history[0]["server-train-loss"])
    assert float(history[-1]["server-train-accuracy"]) > 0.3  # chance: 0.1
    assert 0 < float(history[-1]["accuracy"]) <= 1 and int(float(history[-1]["num-examples"])) > 0
    # bytes counted = the arrays of every message, up and down, train and evaluate
    for kind, column in (("train", "train"), ("evaluate", "eval")):
        sent = sum(record_nbytes(m.content) for m in grid.sent if m.metadata.message_type == kind)
        ids = {m.metadata.message_id for m in grid.sent if m.metadata.message_type == kind}
        up = sum(
            record_nbytes(r.content)
            for r in grid.replies
            if r.metadata.reply_to_message_id in ids and r.has_content()
        )
        assert sent == sum(float(h[f"bytes-down-{column}"]) for h in history)
        assert up == sum(float(h[f"bytes-up-{column}"]) for h in history)
    h = history[0]
    assert float(h["bytes-up-train"]) == float(h["bytes-activations"]) + float(
        h["bytes-edge-weights-up"]
    )
    assert float(h["bytes-down-train"]) == float(h["bytes-gradients"]) + float(
        h["bytes-edge-weights-down"]
    )
    # one wave per mini-batch (+ the final weights): SL's nodes in turn, SplitFed's in parallel
    waves, messages = int(float(h["waves"])), int(float(h["messages-down"]))
    batches = -(-int(float(h["server-train-examples"])) // cfg.batch_size)
    assert messages >= batches + cfg.num_clients
    assert waves == messages if mode == "sl" else cfg.num_clients * waves >= messages > waves
    # the analytic per-epoch cost is close to the measured one (headers aside)
    measured = float(h["bytes-up-train"]) + float(h["bytes-down-train"])
    analytic = results["analytic"]["sl-bytes-per-epoch"]
    assert 0.9 < measured / analytic < 1.2


def _samples_trained(nodes):
    """Each node's samples trained in round 1: the ``num-examples`` of its weights reply."""
    last = {}
    for row in nodes:
        if row["round"] == "1" and row["stage"] == "step" and row["status"] == "accepted":
            last[int(row["node-id"])] = int(float(row["num-examples"]))
    return last


@pytest.mark.parametrize("mode", ["splitfed-v1", "splitfed-v2"])
def test_splitfed_averages_the_edge_models_and_v1_the_server_copies(tmp_path, mode, monkeypatch):
    cfg = _config(tmp_path, mode, mode, **{"num-server-rounds": 1, "num-clients": 3})
    captured = {}
    from flwr_gkt.flower import split_strategy

    original = split_strategy.SplitLearning.start

    def start(self, *args, **kwargs):
        captured["strategy"] = self
        return original(self, *args, **kwargs)

    monkeypatch.setattr(split_strategy.SplitLearning, "start", start)
    _, nodes, _, grid = _run(cfg)
    strategy = captured["strategy"]
    samples = _samples_trained(nodes)
    assert len(samples) == 3
    node_states = {
        n: grid.context(n).state.array_records[STATE_EXTRACTOR].to_torch_state_dict()
        for n in samples
    }
    expected = average_states([node_states[n] for n in samples], [samples[n] for n in samples])
    for key, value in expected.items():
        torch.testing.assert_close(strategy.edge_state[key], value, msg=key)
    if mode == "splitfed-v1":
        assert set(strategy.copies) == set(samples)
        copies = [strategy.copies[n][0].state_dict() for n in samples]
        server = average_states(copies, [samples[n] for n in samples])
        for key, value in strategy.model.state_dict().items():
            torch.testing.assert_close(value, server[key], msg=key)
    else:
        assert not strategy.copies  # V2: one server model


def _corrupting(app, bad):
    """A ClientApp whose nodes in ``bad`` spoil their activations at batch 2 (NaN / wrong shape)."""

    def client(msg: Message, context: Context) -> Message:
        reply = app(msg, context)
        how = bad.get(context.node_id)
        config = msg.content.config_records.get("config", {})
        if how and msg.metadata.message_type == "train" and config.get("batch") == 1:
            record = reply.content.array_records[ARRAYS_KEY]
            feats = record["features"].numpy()
            if how == "nan":
                feats = feats.copy()
                feats[0, 0, 0, 0] = np.nan
            else:
                feats = feats[:, :8].copy()
            record["features"] = Array(feats)
        return reply

    return client


@pytest.mark.parametrize("mode", ["sl", "splitfed-v2"])
def test_bad_activations_are_rejected_and_the_round_goes_on(tmp_path, mode):
    cfg = _config(tmp_path, mode, mode, **{"num-server-rounds": 1, "num-clients": 3})
    _, app = make_split_apps(cfg)
    first = InProcessGrid(app, 3).get_node_ids()
    ids = sorted(first)
    history, nodes, _, _ = _run(cfg, _corrupting(app, {ids[0]: "nan", ids[1]: "shape"}))
    rejected = {int(r["node-id"]): r["reason"] for r in nodes if r["status"] == "rejected"}
    assert set(rejected) == {ids[0], ids[1]}
    assert "NaN" in rejected[ids[0]] and "shape" in rejected[ids[1]]
    h = history[0]
    assert int(float(h["nodes-replied"])) == 1 and int(float(h["nodes-rejected"])) == 2
    assert int(float(h["eval-nodes"])) == 3 and float(h["accuracy"]) > 0  # the round went on


def test_analytic_costs():
    costs = communication_costs(
        num_samples=100,
        activation_numel=16 * 28 * 28,
        num_classes=10,
        num_nodes=2,
        edge_state_bytes=1000,
        full_state_bytes=50_000,
        feature_dtype="float16",
    )
    assert costs["activation-bytes-per-sample"] == 2 * 16 * 28 * 28
    assert costs["sl-bytes-per-epoch"] == 100 * (2 * 12544 + 8 + 4 * 12544) + 2 * 2 * 1000
    assert costs["fedgkt-bytes-per-epoch"] == 100 * (2 * 12544 + 8 + 80)
    assert costs["fedavg-bytes-per-epoch"] == 200_000


def test_communication_table_reports_bytes_to_target_and_analytic_costs(tmp_path):
    from flwr_gkt.app.report import Run, communication_table, mb_to_accuracy

    mb = 1024 * 1024
    rows = [
        {"round": r, "accuracy": a, "bytes-up-train": mb, "bytes-down-train": mb}
        for r, a in ((1, 0.5), (2, 0.85), (3, 0.9))
    ]
    sl = Run(
        "sl",
        tmp_path,
        {"edge-epochs": 1},
        rows,
        {
            "algorithm": "sl",
            "analytic": {
                "activation-bytes-per-sample": 4.0,
                "gradient-bytes-per-sample": 4.0,
                "sl-bytes-per-epoch": 2.0 * mb,
                "fedgkt-bytes-per-epoch": 1.0 * mb,
            },
        },
    )
    gkt = Run("fedgkt", tmp_path, {"feature-dtype": "int8"}, rows[:1], {"algorithm": "fedgkt"})
    assert mb_to_accuracy(sl, 0.8) == 4.0 and mb_to_accuracy(gkt, 0.8) != mb_to_accuracy(gkt, 0.8)
    table = communication_table([sl, gkt], 0.8)
    assert "| sl | sl | 90.00% | 6.000 | 4.000 | 2.000 | 2.000 |" in table
    assert "| fedgkt | fedgkt | 50.00% | 2.000 | - | 2.000 | - |" in table

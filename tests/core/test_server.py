"""Server-side logic without Flower: per-sample logits, order, KD alignment."""

import torch
from torch import nn

from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import TensorBatches, fit
from flwr_gkt.wire import Payload


def linear_server():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4 * 3 * 3, 5))


def payload(n, seed, logits=True):
    g = torch.Generator().manual_seed(seed)
    return Payload(
        torch.randn(n, 4, 3, 3, generator=g),
        torch.randint(0, 5, (n,), generator=g),
        torch.randn(n, 5, generator=g) if logits else None,
    )


def test_server_logits_belong_to_exactly_the_nodes_samples_in_order():
    model = linear_server()
    # lr = 0: the weights never move, so the last-epoch logits of every sample
    # must equal the model applied to that very sample, despite the shuffling.
    server = GKTServer(model, epochs=2, batch_size=7, optimizer="sgd", lr=0.0, device="cpu")
    payloads = {101: payload(23, 1), 7: payload(5, 2), 55: payload(16, 3)}
    for node, p in payloads.items():
        server.put(node, p)
    result = server.train_round()
    assert result.num_examples == 44 and result.num_nodes == 3
    with torch.no_grad():
        for node, p in payloads.items():
            got = server.server_logits(node)
            assert got.shape == (len(p), 5)
            torch.testing.assert_close(got, model(p.features), rtol=1e-5, atol=1e-5)
    assert server.server_logits(999) is None


def test_training_order_follows_node_key_not_the_random_node_ids():
    """Flower draws node ids at random per run: with ``node_key`` (the strategies
    sort by node identity) the same data under other ids trains to the same model."""
    data = {"a": payload(30, 1), "b": payload(20, 2), "c": payload(25, 3)}

    def train(ids, key):
        server = GKTServer(linear_server(), epochs=2, batch_size=8, lr=0.05, device="cpu")
        uid = dict(zip(ids, data, strict=True))
        server.node_key = (lambda n: uid[n]) if key else None
        for node, name in uid.items():
            server.put(node, data[name])
        server.train_round()
        weights = [t.clone() for t in server.model.state_dict().values()]
        return weights, {name: server.server_logits(node) for node, name in uid.items()}

    first, z_first = train([5, 9, 2], key=True)
    second, z_second = train([7, 3, 8], key=True)
    for w1, w2 in zip(first, second, strict=True):
        torch.testing.assert_close(w1, w2, rtol=0, atol=0)
    for name in data:
        torch.testing.assert_close(z_first[name], z_second[name], rtol=0, atol=0)
    unordered, _ = train([7, 3, 8], key=False)  # by id: another order, another model
    assert any(not torch.equal(w1, w2) for w1, w2 in zip(first, unordered, strict=True))


def test_server_trains_on_stored_features_and_keeps_them():
    server = GKTServer(linear_server(), epochs=1, batch_size=8, lr=0.01, device="cpu")
    p1 = payload(12, 1)
    server.put(1, p1)
    server.train_round()
    server.put(2, payload(8, 2))  # node 1 does not reply this round
    result = server.train_round()
    assert result.num_examples == 20 and server.store[1] is p1
    assert server.server_logits(1).shape == (12, 5)


def test_server_learns_a_separable_task():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=g)
    feats = torch.randn(200, 4, 3, 3, generator=g) * 0.3
    feats[torch.arange(200), labels % 4, 0, 0] += 3.0
    feats[torch.arange(200), 0, 1, 1] += (labels == 4).float() * 3.0
    server = GKTServer(
        linear_server(), epochs=20, batch_size=32, lr=0.01, device="cpu", kd_mode="none"
    )
    server.put(1, Payload(feats, labels, None))
    res = server.train_round()
    assert res.accuracy > 0.9
    _loss_sum, correct = server.evaluate(feats, labels)
    assert correct / 200 > 0.9


def test_fit_aligns_teacher_rows_with_sample_index():
    model = linear_server()
    x, y = torch.randn(30, 4, 3, 3), torch.randint(0, 5, (30,))
    with torch.no_grad():
        own = model(x)  # a teacher equal to the student: KD term is exactly 0 if aligned
    batches = TensorBatches(x, y, 8, shuffle=True, generator=torch.Generator().manual_seed(1))

    def run(alpha, teacher):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return fit(
            model,
            batches,
            opt,
            epochs=1,
            device=torch.device("cpu"),
            teacher_logits=teacher,
            alpha=alpha,
        ).loss

    ce_only = run(0.0, own)
    assert abs(run(10.0, own) - ce_only) < 1e-5
    shuffled = own[torch.randperm(30, generator=torch.Generator().manual_seed(2))]
    assert run(10.0, shuffled) > ce_only + 0.01


def test_tensor_batches_index_matches_rows():
    x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    seen = []
    for xb, yb, idx in TensorBatches(
        x, y, 3, shuffle=True, generator=torch.Generator().manual_seed(0)
    ):
        assert torch.equal(xb[:, 0].long(), idx) and torch.equal(yb, idx)
        seen += idx.tolist()
    assert sorted(seen) == list(range(10))


def test_lr_factor_schedules():
    import math

    import pytest

    from flwr_gkt.core.training import lr_factor

    assert [lr_factor("constant", r, 5) for r in (1, 3, 5)] == [1.0, 1.0, 1.0]
    assert lr_factor("cosine", 1, 4) == 1.0
    assert lr_factor("cosine", 3, 4) == pytest.approx(0.5)
    assert lr_factor("cosine", 4, 4) == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 4)))
    with pytest.raises(ValueError):
        lr_factor("step", 1, 4)


def test_server_round_applies_the_learning_rate_scale():
    server = GKTServer(linear_server(), epochs=1, batch_size=8, lr=0.01, device="cpu")
    server.put(1, payload(8, 1))
    server.train_round(lr_scale=0.25)
    assert server.optimizer.param_groups[0]["lr"] == 0.01 * 0.25


def test_inference_runs_in_eval_batches_and_gives_the_batch_size_independent_result():
    """Training batches of ``batch_size``; evaluation and per-node logits in ``eval_batch_size``."""
    from flwr_gkt.core.registry import build_server_model

    features = torch.randn(70, 16, 6, 6)
    labels = torch.randint(0, 10, (70,))
    teacher = torch.randn(70, 10)
    seen = []

    def record(server):
        server.model.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
        return server

    def make(eval_batch_size):
        torch.manual_seed(0)
        model = build_server_model("resnet10", 10)
        return GKTServer(
            model, epochs=1, batch_size=8, eval_batch_size=eval_batch_size, device="cpu"
        )

    small, large = make(3), record(make(32))
    for server in (small, large):
        server.put(1, Payload(features, labels, teacher))
        server.train_round()  # the same training (batch 8) for both
    training, seen[:] = list(seen), []
    assert set(training[:-1]) == {8}
    torch.testing.assert_close(small.server_logits(1), large.server_logits(1))
    loss, correct = large.evaluate(features, labels)
    assert seen == [32, 32, 6]  # 70 test samples in batches of 32
    small_loss, small_correct = small.evaluate(features, labels)
    assert abs(loss - small_loss) < 1e-3 * max(1.0, abs(loss)) and correct == small_correct

"""FedAgg building blocks: bridge autoencoder, FedAgg losses, rectification, tier models, BSBODP steps."""

import pytest
import torch
import torch.nn.functional as F

from flwr_gkt.core.bridge import BridgeAutoencoder
from flwr_gkt.core.fedagg import BSBODPConfig, teacher_logits, train_leaf, train_nonleaf
from flwr_gkt.core.losses import fedagg_leaf_loss, fedagg_nonleaf_loss, gkt_loss, kd_loss
from flwr_gkt.core.rectify import RECTIFIERS, get_rectifier, rectify_swap
from flwr_gkt.core.registry import build_tier_model
from flwr_gkt.data import client_data, load_dataset
from flwr_gkt.data.bridge import load_autoencoder

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def autoencoder(bridge_autoencoder):
    path, info = bridge_autoencoder
    return load_autoencoder(path), info


def test_bridge_round_trip_embedding_to_decoded_sample(autoencoder):
    ae, info = autoencoder
    raw = load_dataset("fashion-mnist")
    pixels = raw.x_test[:64].float() / 255.0
    eps = ae.encode(pixels)
    assert eps.shape == (64, 4, 7, 7)  # 196 values per image instead of 784 pixels
    decoded = ae.decoder(eps)
    assert decoded.shape == pixels.shape and decoded.min() >= 0.0 and decoded.max() <= 1.0
    bridge = ae.bridge(eps)  # normalised like the models' real inputs
    torch.testing.assert_close(bridge, (decoded - ae.mean) / ae.std)
    # it learned something: better than predicting the mean image
    assert F.mse_loss(decoded, pixels) < F.mse_loss(
        pixels.mean(0, keepdim=True).expand_as(pixels), pixels
    )
    assert info["test-mse"] < 0.05
    assert not any(p.requires_grad for p in ae.parameters()) and not ae.training  # frozen
    sizes = [
        sum(p.numel() for p in part.parameters())
        for part in (BridgeAutoencoder(3).encoder, BridgeAutoencoder(3).decoder)
    ]
    assert sizes == [1948, 2531]  # the official code's 1.90K / 2.47K (+ conv biases)


@pytest.mark.parametrize("name", ["swap", "peak", "self"])
def test_rectification_changes_exactly_the_wrong_samples(name):
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(200, 10, generator=gen) * 2, dim=1)
    labels = torch.randint(0, 10, (200,), generator=gen)
    labels[:50] = probs[:50].argmax(1)  # some right
    out = get_rectifier(name)(probs, labels)
    wrong = probs.argmax(1) != labels
    assert 100 < int(wrong.sum()) < 200
    assert torch.equal(out[~wrong], probs[~wrong])
    assert (out[wrong] != probs[wrong]).any(dim=1).all()
    torch.testing.assert_close(out.sum(dim=1), torch.ones(200))
    assert (out >= 0).all() and torch.equal(out.argmax(1), labels)  # the label is the top class now
    if name == "swap":  # the same values, two of them exchanged
        torch.testing.assert_close(out.sort(dim=1).values, probs.sort(dim=1).values)
    assert RECTIFIERS["none"] is None


def test_kd_with_rectification_is_kl_to_the_rectified_teacher():
    gen = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(16, 10, generator=gen), torch.randn(16, 10, generator=gen)
    labels = torch.randint(0, 10, (16,), generator=gen)
    t = 3.0
    rectified = rectify_swap(torch.softmax(teacher / t, 1), labels)
    manual = (
        (rectified * (rectified.log() - torch.log_softmax(student / t, 1))).sum(1).mean() * t * t
    )
    torch.testing.assert_close(kd_loss(student, teacher, t, rectify_swap, labels), manual)
    with pytest.raises(ValueError):
        kd_loss(student, teacher, t, rectify_swap)


def test_fedagg_losses_are_the_papers_equations():
    gen = torch.Generator().manual_seed(2)
    real, bridge, teacher = (torch.randn(8, 10, generator=gen) for _ in range(3))
    y = torch.randint(0, 10, (8,), generator=gen)
    leaf = fedagg_leaf_loss(real, bridge, y, teacher, temperature=3.0, beta=10.0, gamma=0.5)
    expected = F.cross_entropy(real, y) + 0.5 * (
        F.cross_entropy(bridge, y) + 10.0 * kd_loss(bridge, teacher, 3.0)
    )
    torch.testing.assert_close(leaf, expected)
    torch.testing.assert_close(
        fedagg_nonleaf_loss(bridge, y, teacher), gkt_loss(bridge, y, teacher, 3.0, 10.0)
    )


def test_tier_models_match_the_papers_sizes():
    sizes = {
        n: sum(p.numel() for p in build_tier_model(n, 10, 3).parameters())
        for n in ("cnn", "resnet10", "resnet18")
    }
    assert sizes["cnn"] == 13_146
    assert 4.8e6 < sizes["resnet10"] < 5.0e6 and 11.1e6 < sizes["resnet18"] < 11.3e6
    assert build_tier_model("cnn", 10, 1)(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_bsbodp_directions_learn_from_the_teacher(autoencoder):
    ae, _ = autoencoder
    data = client_data(0, 1, fraction=0.002, test_fraction=0.01, seed=0)
    pixels = data.x_train * ae.std + ae.mean  # back to [0, 1] for the encoder
    bridge = ae.bridge(ae.encode(pixels))
    assert bridge.shape == data.x_train.shape
    cfg = BSBODPConfig(batch_size=16, optimizer="adam", lr=0.003, epochs=6)
    torch.manual_seed(0)
    parent, leaf = build_tier_model("cnn", 10, 1), build_tier_model("cnn", 10, 1)
    gen = torch.Generator().manual_seed(0)
    # the parent learns from the child's bridge samples with the labels (no teacher yet) ...
    first = train_nonleaf(
        parent,
        bridge,
        data.y_train,
        None,
        BSBODPConfig(batch_size=16, optimizer="adam", lr=0.003, epochs=1),
        CPU,
        gen,
    )
    result = train_nonleaf(parent, bridge, data.y_train, None, cfg, CPU, gen)
    assert result.loss < first.loss and result.accuracy > 0.3
    # ... then teaches the leaf over the same bridge samples
    z = teacher_logits(parent, bridge, CPU)
    assert z.shape == (len(bridge), 10)
    out = train_leaf(
        leaf, data.x_train, bridge, data.y_train, z, cfg, CPU, gen, rectify=rectify_swap
    )
    assert (
        out.num_examples == len(bridge) // 16 * 16 and out.accuracy > 0.3
    )  # full batches; chance 0.1
    with pytest.raises(ValueError):
        train_leaf(leaf, data.x_train[:5], bridge, data.y_train, z, cfg, CPU)


def test_embeddings_on_the_wire_are_validated():
    import numpy as np
    from flwr.app import Array, RecordDict

    from flwr_gkt.wire import (
        ARRAYS_KEY,
        METRICS_KEY,
        PayloadError,
        decode_embeddings,
        encode_embeddings,
        metrics_record,
    )

    eps, y = torch.rand(20, 4, 7, 7), torch.randint(0, 10, (20,))

    def content(record, n=20):
        return RecordDict({ARRAYS_KEY: record, METRICS_KEY: metrics_record(n)})

    got_eps, got_y = decode_embeddings(content(encode_embeddings(eps, y)), 10)
    assert torch.equal(got_eps, eps) and torch.equal(got_y, y)
    assert (
        len(encode_embeddings(eps, y)["embeddings"].data) < 20 * 4 * 7 * 7 * 4 + 200
    )  # 784 B per sample
    bad = eps.clone()
    bad[3, 0, 0, 0] = float("nan")
    for record, n, reason in [
        (encode_embeddings(bad, y), 20, "NaN"),
        (encode_embeddings(eps, y + 5), 20, "outside"),
        (encode_embeddings(eps, y), 21, "says 21"),
        (encode_embeddings(eps[:, :3], y), 20, "N x 4"),
    ]:
        with pytest.raises(PayloadError, match=reason):
            decode_embeddings(content(record, n), 10)
    record = encode_embeddings(eps, y)
    record["embeddings"] = Array(np.zeros((20, 4, 7, 7), dtype=np.float64))
    with pytest.raises(PayloadError, match="dtype"):
        decode_embeddings(content(record), 10)

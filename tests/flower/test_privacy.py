"""Feature privacy -- per-sample clipping and Gaussian noise applied on the node."""

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from flwr_gkt.app.task import node_setup
from flwr_gkt.config import RunConfig
from flwr_gkt.core.models import resnet8
from flwr_gkt.core.privacy import PrivacyConfig, clip_per_sample, privatize
from flwr_gkt.data import client_data
from flwr_gkt.flower.client_app import handle_evaluate, handle_train
from flwr_gkt.wire import PayloadSpec, decode_payload


def test_clipping_bounds_every_sample_and_leaves_small_ones_alone():
    x = torch.cat([torch.full((3, 4, 2, 2), 10.0), torch.full((2, 4, 2, 2), 0.01)])
    y = clip_per_sample(x, 5.0)
    norms = y.flatten(1).norm(dim=1)
    assert torch.allclose(norms[:3], torch.full((3,), 5.0))
    assert torch.equal(y[3:], x[3:])  # already within the bound
    assert torch.equal(privatize(x, 0.0, 1.0), x)  # no clip: nothing happens


def test_noise_has_the_configured_scale_and_is_not_reproducible_from_the_run_seed():
    x = torch.zeros(200, 16, 4, 4)
    a, b = privatize(x, 2.0, 0.5), privatize(x, 2.0, 0.5)
    assert a.std().item() == pytest.approx(1.0, rel=0.05)  # noise * clip
    assert not torch.equal(a, b)  # OS entropy, not a seed the server knows
    with pytest.raises(ValueError, match="needs privacy-clip"):
        PrivacyConfig(noise=1.0)


def _instruction(kind: str) -> Message:
    config = ConfigRecord({"server-round": 1, "batch-size": 32, "epochs": 1})
    return Message(content=RecordDict({"config": config}), dst_node_id=5, message_type=kind)


def test_the_node_uploads_clipped_noisy_features_and_keeps_its_own_metrics_exact():
    data = client_data(0, 1, fraction=0.001, test_fraction=0.005, seed=0)
    build = lambda: (torch.manual_seed(0), resnet8(10, 1))[1]  # noqa: E731
    spec = PayloadSpec(10, (16, 28, 28))
    replies = {}
    for name, privacy in {
        "plain": None,
        "clip": PrivacyConfig(clip=5.0, logit_clip=1.0),
        "noise": PrivacyConfig(clip=5.0, logit_clip=1.0, noise=0.1),
    }.items():
        context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
        train = handle_train(
            _instruction(MessageType.TRAIN), context, data, build, "cpu", privacy=privacy
        )
        evaluate = handle_evaluate(
            _instruction(MessageType.EVALUATE), context, data, build, "cpu", privacy=privacy
        )
        replies[name] = (
            decode_payload(train.content, spec, True),
            decode_payload(evaluate.content, spec, False),
            train.content.metric_records["metrics"],
            evaluate.content.metric_records["metrics"],
        )
    plain, clip, noise = replies["plain"], replies["clip"], replies["noise"]
    assert plain[0].features.flatten(1).norm(dim=1).max() > 5.0  # the bound does bite
    for payload in (clip[0], clip[1]):
        assert payload.features.flatten(1).norm(dim=1).max() <= 5.0 + 1e-4
    assert clip[0].logits.norm(dim=1).max() <= 1.0 + 1e-5
    residual = noise[0].features - clip[0].features  # same training (same seed), plus noise
    assert residual.std().item() == pytest.approx(0.5, rel=0.05)
    assert (noise[1].features - clip[1].features).std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.equal(noise[0].labels, plain[0].labels)  # labels travel in the clear
    # the node's own metrics are computed before anything is noised
    assert noise[2]["edge-train-loss"] == pytest.approx(plain[2]["edge-train-loss"])
    assert noise[3]["edge-accuracy"] == pytest.approx(plain[3]["edge-accuracy"])


def test_node_config_privacy_overrides_the_run_config():
    cfg = RunConfig(privacy_clip=10.0, privacy_noise=0.1)
    assert node_setup(cfg, {}, trusted=True).privacy == PrivacyConfig(clip=10.0, noise=0.1)
    assert node_setup(cfg, {"privacy-noise": 0.5}, trusted=True).privacy == PrivacyConfig(
        clip=10.0, noise=0.5
    )
    assert node_setup(RunConfig(), {}, trusted=True).privacy is None

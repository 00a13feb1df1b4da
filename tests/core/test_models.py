"""Model shapes, parameter counts and the model registry."""

import pytest
import torch

from flwr_gkt.core import models
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.core.registry import (
    available_models,
    build_edge_model,
    build_server_model,
    register_edge_model,
    register_server_model,
)


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("builder", [models.resnet4, models.resnet6, models.resnet8])
@pytest.mark.parametrize("in_ch,side", [(3, 32), (1, 28)])
def test_edge_models_extract_16_channels_at_input_resolution(builder, in_ch, side):
    model = builder(num_classes=7, in_channels=in_ch).eval()
    x = torch.randn(2, in_ch, side, side)
    logits, feats = model.forward_with_features(x)
    assert feats.shape == (2, 16, side, side)
    assert logits.shape == (2, 7)
    assert torch.allclose(model(x), logits)


@pytest.mark.parametrize(
    "builder,layers", [(models.server_resnet55, 54), (models.server_resnet109, 108)]
)
def test_server_models_take_feature_maps(builder, layers):
    model = builder(num_classes=10).eval()
    out = model(torch.randn(2, 16, 32, 32))
    assert out.shape == (2, 10)
    convs = sum(
        isinstance(m, torch.nn.Conv2d) and "downsample" not in name
        for name, m in model.named_modules()
    )
    assert convs == layers  # 3 convs per bottleneck, downsample projections not counted


def test_parameter_counts_match_reference_architecture():
    # Counts of the FedGKT reference (FedML resnet56_gkt) for CIFAR-10: 3 input
    # channels, 10 classes. Paper: ResNet-8 has ~11K parameters, 54x / 105x
    # fewer than ResNet-56 / ResNet-110.
    assert n_params(models.resnet8(10, 3)) == 10_586
    assert n_params(models.server_resnet55(10)) == 590_858
    assert n_params(models.resnet56(10, 3)) == 591_322
    assert n_params(models.resnet110(10, 3)) == 1_147_738
    assert n_params(models.resnet56(10, 3)) == n_params(models.server_resnet55(10)) + 464
    ratio56 = n_params(models.resnet56(10, 3)) / n_params(models.resnet8(10, 3))
    ratio110 = n_params(models.resnet110(10, 3)) / n_params(models.resnet8(10, 3))
    assert 50 < ratio56 < 60 and 100 < ratio110 < 115
    assert (
        n_params(models.resnet4(10, 3))
        < n_params(models.resnet6(10, 3))
        < n_params(models.resnet8(10, 3))
    )


def test_full_resnet_is_stem_plus_server():
    full = models.resnet56(10, 3).eval()
    out = full(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert isinstance(full.body, models.ServerResNet)


def test_registry_builds_by_name_and_accepts_user_models():
    assert {"resnet4", "resnet6", "resnet8"} <= set(available_models()["edge"])
    assert {"resnet55", "resnet109"} <= set(available_models()["server"])
    assert n_params(build_server_model("resnet55", 10)) == 590_858
    assert n_params(build_server_model("resnet10", 10)) < n_params(
        build_server_model("resnet19", 10)
    )
    with pytest.raises(ValueError):
        build_server_model("resnet12", 10)
    with pytest.raises(KeyError):
        build_edge_model("no-such-model", 10, 3)

    def tiny_edge(num_classes, in_channels):
        return EdgeModel(
            torch.nn.Conv2d(in_channels, 16, 3, padding=1),
            torch.nn.Sequential(
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, num_classes)
            ),
        )

    def tiny_server(num_classes, in_channels):
        return torch.nn.Sequential(
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(in_channels, num_classes),
        )

    register_edge_model("tiny-test", tiny_edge)
    register_server_model("tiny-test", tiny_server)
    edge = build_edge_model("tiny-test", 4, 1)
    server = build_server_model("tiny-test", 4)
    logits, feats = edge.forward_with_features(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 4) and server(feats).shape == (3, 4)

    register_edge_model("not-split", lambda c, i: torch.nn.Linear(i, c))
    with pytest.raises(TypeError):
        build_edge_model("not-split", 4, 1)


def test_edge_flops_and_parameters_match_the_paper_ratios():
    from flwr_gkt.core.efficiency import edge_cost_table, forward_flops

    rows = {r.name.split(" ")[0]: r for r in edge_cost_table(10, 3, 32)}
    r8, r56, r110 = rows["ResNet-8"], rows["ResNet-56"], rows["ResNet-110"]
    # Paper, Section 4.3: 9x and 17x fewer FLOPs, 54x and 105x fewer parameters
    assert round(r56.flops / r8.flops) == 9 and round(r110.flops / r8.flops) == 17
    assert 54 <= r56.params / r8.params < 60 and 105 <= r110.params / r8.params < 112
    assert rows["ResNet-4"].flops < r8.flops and rows["ResNet-6"].params < r8.params
    # the conv FLOPs of the stem are exactly 2 * 3*3*3 * 16 * 32*32
    stem = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
    assert forward_flops(stem, (3, 32, 32)) == 2 * 27 * 16 * 1024


def test_full_model_for_fedavg_matches_edge_stem_plus_server():
    from flwr_gkt.core.registry import build_full_model

    assert n_params(build_full_model("resnet55", 10, 3)) == n_params(models.resnet56(10, 3))
    full = build_full_model("resnet10", 10, 1)
    assert n_params(full) == n_params(models.server_resnet(10, 10)) + n_params(
        models.resnet8(10, 1).extractor
    )
    with pytest.raises(KeyError):
        build_full_model("tiny-test", 10, 1)

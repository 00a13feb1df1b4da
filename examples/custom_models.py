"""Use the FedGKT strategy with your own edge and server models.

FedGKT splits the model in two: each edge node trains a small CNN -- a feature
extractor ``f_e`` plus a classifier ``f_c`` -- and uploads, for every local
training sample, the feature map ``H = f_e(x)`` and its logits; the server
trains a large model ``f_s`` on those feature maps. This script

1. defines a small edge CNN (extractor + classifier, wrapped in
   :class:`flwr_gkt.core.models.EdgeModel`) and a server CNN that consumes the
   edge's feature maps,
2. registers them with :mod:`flwr_gkt.core.registry` under new names,
3. runs a short FedGKT federation on a Fashion-MNIST subset, in this process
   (the real ServerApp and ClientApp of ``simulation/``, no Ray), with the
   config keys ``edge-model`` / ``server-model`` naming the new models,
4. prints the final test accuracy of edge extractor + server model and of the
   edge model alone.

Run it from the repository root::

    .venv/bin/python examples/custom_models.py            # 4 nodes, 3 rounds: ~1 min on 2 cores
    .venv/bin/python examples/custom_models.py --tiny     # 2 nodes, 600 images: ~10 s (CI)

The last line of the output is ``RESULT {...}`` (JSON); the run's CSV, JSON and
plot are written to ``<results-dir>/custom-models/``.
"""

from __future__ import annotations

import argparse

import _common
from torch import Tensor, nn

from flwr_gkt.core.efficiency import num_parameters
from flwr_gkt.core.models import FEATURE_CHANNELS, EdgeModel
from flwr_gkt.core.registry import (
    build_edge_model,
    build_server_model,
    register_edge_model,
    register_server_model,
)

EDGE_NAME = "tiny-cnn"
SERVER_NAME = "small-cnn"


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution + batch norm + ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


# --------------------------------------------------------------------------- edge model
def tiny_cnn_edge(num_classes: int, in_channels: int) -> EdgeModel:
    """Edge builder: ``(num_classes, image channels) -> EdgeModel``.

    The contract of an edge model (:class:`flwr_gkt.core.models.EdgeModel`):

    * ``extractor`` maps an image batch ``N x in_channels x H x W`` to the
      feature maps that are uploaded to the server. With the ServerApp of
      ``simulation/`` (this script) the server expects maps of
      ``FEATURE_CHANNELS x H x W`` (16 channels at the input resolution, as in
      the paper): uploads are validated against that shape and replies with
      any other shape are rejected.
    * ``classifier`` maps those feature maps to ``num_classes`` logits (the edge
      model's own prediction, distilled from the server's logits).
    """
    extractor = conv_bn_relu(in_channels, FEATURE_CHANNELS)  # -> 16 x H x W
    classifier = nn.Sequential(
        conv_bn_relu(FEATURE_CHANNELS, 32, stride=2),  # -> 32 x H/2 x W/2
        conv_bn_relu(32, 32, stride=2),  # -> 32 x H/4 x W/4
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.Linear(32, num_classes),
    )
    return EdgeModel(extractor, classifier)


# ------------------------------------------------------------------------- server model
class SmallServerCNN(nn.Module):
    """A server model: any ``nn.Module`` from edge feature maps to logits.

    It receives the edge extractor's maps (``in_channels`` = 16 here) and must
    return ``N x num_classes`` logits. Make it as large as the server can
    afford: that is the point of FedGKT.
    """

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, 32),
            conv_bn_relu(32, 64, stride=2),
            conv_bn_relu(64, 64),
            conv_bn_relu(64, 128, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, features: Tensor) -> Tensor:
        return self.fc(self.body(features))


def register_models() -> None:
    """Make the two models known by name (call it before the run starts).

    Registering in code works for this in-process run. In a Ray simulation or
    a real deployment (SuperLink + SuperNodes) every process that builds a
    model needs the registration too; ship it in an installed package and
    declare the function as an entry point in that package's
    ``pyproject.toml``, so that ``flwr_gkt.core.registry`` finds it on the first
    unknown name::

        [project.entry-points."flwr_gkt.core.models"]
        my-models = "my_package.models:register_models"

    (an entry point is a zero-argument callable that performs the
    registrations, like this function). Once installed, the names work
    everywhere a model name does, e.g.
    ``python -m simulation --preset smoke --set edge-model=tiny-cnn server-model=small-cnn``.
    """
    register_edge_model(EDGE_NAME, tiny_cnn_edge)
    # A server builder takes (num_classes, feature-map channels).
    register_server_model(SERVER_NAME, SmallServerCNN)


# ------------------------------------------------------------------------------ the run
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--num-nodes", type=int, default=4)
        parser.add_argument(
            "--data-fraction", type=float, default=0.05, help="share of the 60k training images"
        )
        parser.add_argument(
            "--test-fraction", type=float, default=0.2, help="share of the 10k test images"
        )

    return _common.parse_args(
        __doc__,
        "2 nodes, 1%% of the training set, 2 rounds",
        add_arguments,
        {"num_nodes": 2, "rounds": 2, "data_fraction": 0.01, "test_fraction": 0.02},
        argv,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    register_models()

    # The run config: the `smoke` preset (flwr_gkt/app/presets/smoke.yaml) with our
    # models and sizes on top -- the same keys as `python -m simulation --set ...`.
    cfg = _common.smoke_config(
        args,
        **{
            "edge-model": EDGE_NAME,
            "server-model": SERVER_NAME,
            "data-fraction": args.data_fraction,
            "test-fraction": args.test_fraction,
            "run-name": "custom-models",
        },
    )
    edge = build_edge_model(EDGE_NAME, num_classes=10, in_channels=1)
    server = build_server_model(SERVER_NAME, num_classes=10, in_channels=FEATURE_CHANNELS)
    print(
        f"edge model {EDGE_NAME!r}: {num_parameters(edge):,} parameters; "
        f"server model {SERVER_NAME!r}: {num_parameters(server):,} parameters",
        flush=True,
    )

    strategy = _common.run(cfg)  # the ServerApp and ClientApp, in this process
    final = strategy.history[-1]
    result = {
        "edge-model": EDGE_NAME,
        "server-model": SERVER_NAME,
        "rounds": len(strategy.history),
        "nodes": cfg.num_clients,
        "accuracy": round(final["accuracy"], 4),  # edge extractor + server model
        "edge-accuracy": round(final["edge-accuracy"], 4),  # edge model alone
        "test-examples": int(final["num-examples"]),
        "edge-params": num_parameters(edge),
        "server-params": num_parameters(server),
    }
    return _common.report(result)


if __name__ == "__main__":
    main()

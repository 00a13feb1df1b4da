"""What both apps share: the dataset's shape and each node's data."""

from __future__ import annotations

from flwr.app import Context

from flwr_gkt import ClientData, EdgeModel, build_edge_model, client_data

NUM_CLASSES = 10
IN_CHANNELS = 1  # Fashion-MNIST: 28 x 28 grey images
#: What the built-in edge extractors output for a 28 x 28 image.
FEATURE_SHAPE = (16, 28, 28)


def load_data(context: Context) -> ClientData:
    """This node's share of Fashion-MNIST, read from local files (nothing is downloaded)."""
    return client_data(
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        dataset="fashion-mnist",
        fraction=float(context.run_config["data-fraction"]),
        test_fraction=float(context.run_config["test-fraction"]),
        seed=int(context.run_config["seed"]),
    )


def edge_model(context: Context) -> EdgeModel:
    """The node's edge model: feature extractor + small classifier."""
    return build_edge_model(str(context.run_config["edge-model"]), NUM_CLASSES, IN_CHANNELS)

"""Pre-train an edge model on public data and save it (EcoFed's frozen extractor).

EcoFed starts every device from a pre-trained feature extractor that stays
frozen, so each sample's features never change and can be uploaded once. Our
offline stand-in for "pre-trained on a public dataset" is the part of the
training set the federation does not use: with ``data-fraction < 1`` the
nodes share a random subset (:func:`flwr_gkt.data.partition.partition_indices`),
and :func:`flwr_gkt.data.partition.held_out_indices` gives the rest -- samples no
node holds. Weights are written with ``torch.save`` to a local path; runs load
them with ``edge-pretrained: PATH`` (:func:`flwr_gkt.core.models.load_pretrained`).

.. code-block:: console

    python -m flwr_gkt.data.pretrain --out edge-resnet8.pt --fraction 0.5 --samples 5000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flwr_gkt.core.centralized import CentralizedConfig, train_centralized
from flwr_gkt.core.registry import build_edge_model, build_full_model
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    fit,
    get_device,
    make_optimizer,
    predict,
)
from flwr_gkt.data.datasets import load_dataset
from flwr_gkt.data.partition import add_held_out_arguments, held_out_options, held_out_sample
from flwr_gkt.data.transforms import normalize

__all__ = ["pretrain_edge", "pretrain_pooled"]


def pretrain_edge(
    out: str | Path,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str = "",
    edge_model: str = "resnet8",
    fraction: float = 0.5,
    num_partitions: int = 4,
    seed: int = 0,
    samples: int = 5000,
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 0.002,
    device: str = "auto",
) -> dict[str, float]:
    """Train ``edge_model`` with CE on samples the federation does not use; save it.

    ``fraction``, ``num_partitions`` and ``seed`` must be those of the
    federation (``data-fraction``, ``num-clients``, ``seed``) so that the
    samples are held out from every node
    (:func:`flwr_gkt.data.partition.held_out_sample`). Training uses Adam
    (:func:`flwr_gkt.core.training.make_optimizer`) without augmentation; the whole
    edge model's ``state_dict`` is saved, on the CPU.

    Parameters
    ----------
    out : str | Path
        File to write (``torch.save``); parent directories are created.
    dataset : str
        Dataset name (see :func:`flwr_gkt.data.load_dataset`).
    data_dir : str
        Where the dataset files are; ``""`` for the default location.
    edge_model : str
        Registered edge model name (see :func:`flwr_gkt.core.registry.build_edge_model`).
    fraction : float
        The federation's ``data-fraction``; must be below 1.
    num_partitions : int
        The federation's ``num-clients``.
    seed : int
        The federation's ``seed``; also seeds the model's initialisation and
        training.
    samples : int
        Largest number of held-out samples to train on.
    epochs : int
        Passes over those samples.
    batch_size : int
        Mini-batch size.
    lr : float
        Adam learning rate.
    device : str
        ``auto``, ``cpu``, ``cuda``... (see :func:`flwr_gkt.core.training.get_device`).

    Returns
    -------
    dict[str, float]
        ``"samples"``: the number of training samples; ``"test-accuracy"``:
        the edge model's accuracy on the whole test set.

    Raises
    ------
    ValueError
        If nothing is held out (``fraction`` 1).
    KeyError
        If ``edge_model`` is not registered.
    """
    raw = load_dataset(dataset, data_dir)
    idx = torch.from_numpy(
        held_out_sample(
            len(raw.y_train), num_partitions, samples, seed=seed, fraction=fraction, stream=7
        )
    )
    x, y = normalize(raw.x_train[idx], raw.info), raw.y_train[idx]
    torch.manual_seed(seed)
    model = build_edge_model(edge_model, raw.info.num_classes, raw.info.channels)
    dev = get_device(device)
    model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    fit(
        model,
        TensorBatches(x, y, batch_size, True, gen),
        make_optimizer("adam", model.parameters(), lr),
        epochs=epochs,
        device=dev,
    )
    x_test, y_test = normalize(raw.x_test, raw.info), raw.y_test
    logits = predict(model, TensorBatches(x_test, y_test, 256), dev)
    _, correct = evaluate_logits(logits, y_test)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return {"samples": float(len(idx)), "test-accuracy": correct / len(y_test)}


def pretrain_pooled(
    out: str | Path,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    server_model: str = "resnet55",
    epochs: int = 2,
    batch_size: int = 64,
    lr: float = 0.002,
    seed: int = 0,
    device: str = "auto",
) -> dict[str, float]:
    """Train the full model centrally on the pooled training data; save its stem.

    The reference code's protocol (``extractor-init: pooled``): FedML's FedGKT
    initialises every client's extractor from a ResNet-56 trained centrally
    on the whole training set. Here the full model of ``server_model`` (edge
    stem + server body, :func:`flwr_gkt.core.registry.build_full_model`) is trained
    with Adam on ``(x, y)`` -- the union of the federation's partitions -- and
    its stem, which has the edge extractor's shape, is written to ``out``
    (load it with :func:`flwr_gkt.core.models.load_pretrained`). Every node's data
    has been seen centrally: the result is *not* federated-fair. ``x`` is
    normalised; ``seed`` seeds the initialisation and the shuffling; the other
    training settings are those of :func:`pretrain_edge`.

    Returns
    -------
    dict[str, float]
        ``"samples"`` and the last epoch's ``"train-accuracy"``.
    """
    torch.manual_seed(seed)
    model = build_full_model(server_model, num_classes, int(x.shape[1]))
    dev = get_device(device)
    model.to(dev)
    cfg = CentralizedConfig(
        rounds=1, epochs_per_round=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    history = train_centralized(model, (x, y), None, cfg, dev)
    stem = model.stem
    assert isinstance(stem, torch.nn.Module)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in stem.state_dict().items()}, path)
    return {"samples": float(len(y)), "train-accuracy": history[-1]["train-accuracy"]}


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m flwr_gkt.data.pretrain``: pre-train an edge model and save it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_held_out_arguments(parser, "the weights", epochs=2)
    parser.add_argument("--edge-model", default="resnet8")
    args = parser.parse_args(argv)
    result = pretrain_edge(args.out, edge_model=args.edge_model, **held_out_options(args))
    print(
        f"pre-trained {args.edge_model} on {int(result['samples'])} held-out {args.dataset} images: "
        f"test accuracy {result['test-accuracy']:.4f}; saved to {args.out}"
    )


if __name__ == "__main__":
    main()

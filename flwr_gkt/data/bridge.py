"""Pre-training and loading FedAgg's bridge autoencoder on a dataset's local files.

The official weights were pre-trained on ImageNet, which is not available
offline here. :func:`pretrain_autoencoder` (``python -m flwr_gkt.data.bridge``)
trains the :class:`~flwr_gkt.core.bridge.BridgeAutoencoder` on training images
no node holds (the complement of the federation's ``data-fraction`` subset, as
:mod:`flwr_gkt.data.pretrain` does), writes it to a file, and
:func:`load_autoencoder` reads it back by path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from flwr_gkt.core.bridge import BridgeAutoencoder
from flwr_gkt.core.training import get_device
from flwr_gkt.data.datasets import DatasetInfo, dataset_info, load_dataset
from flwr_gkt.data.partition import add_held_out_arguments, held_out_options, held_out_sample

__all__ = ["load_autoencoder", "pretrain_autoencoder"]


def _for_dataset(info: DatasetInfo) -> BridgeAutoencoder:
    return BridgeAutoencoder(info.channels, tuple(info.mean), tuple(info.std))


def pretrain_autoencoder(
    out: str | Path,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str = "",
    fraction: float = 0.5,
    num_partitions: int = 4,
    seed: int = 0,
    samples: int = 5000,
    epochs: int = 3,
    batch_size: int = 64,
    lr: float = 0.003,
    device: str = "auto",
) -> dict[str, float]:
    """Train the autoencoder (MSE on pixels) on images no node holds; save it to ``out``.

    ``fraction`` / ``num_partitions`` / ``seed`` are the federation's
    (``data-fraction``, ``num-clients``, ``seed``), as for
    :func:`flwr_gkt.data.pretrain.pretrain_edge`: the images are drawn from the
    training samples the federation leaves out
    (:func:`flwr_gkt.data.partition.held_out_sample`). Training uses Adam on the
    MSE between images in ``[0, 1]`` and their reconstructions. The
    parameters are those of :func:`~flwr_gkt.data.pretrain.pretrain_edge`
    (without ``edge_model``); ``out`` receives ``torch.save`` of
    ``{"dataset", "state"}``.

    Returns
    -------
    dict[str, float]
        ``"samples"``: the number of training images; ``"test-mse"``: the
        reconstruction MSE on the first 2,000 test images.

    Raises
    ------
    ValueError
        If nothing is held out (``fraction`` 1).
    """
    raw = load_dataset(dataset, data_dir)
    idx = torch.from_numpy(
        held_out_sample(
            len(raw.y_train), num_partitions, samples, seed=seed, fraction=fraction, stream=11
        )
    )
    x = raw.x_train[idx].float() / 255.0
    torch.manual_seed(seed)
    model = _for_dataset(raw.info)
    dev = get_device(device)
    model.to(dev).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).split(batch_size):
            pixels = x[batch].to(dev)
            loss = nn.functional.mse_loss(model(pixels), pixels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        test = raw.x_test[:2000].float().to(dev) / 255.0
        mse = float(nn.functional.mse_loss(model(test), test))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"dataset": dataset, "state": {k: v.cpu() for k, v in model.state_dict().items()}}, path
    )
    return {"samples": float(len(idx)), "test-mse": mse}


def load_autoencoder(path: str | Path, dataset: str = "fashion-mnist") -> BridgeAutoencoder:
    """Load the frozen autoencoder saved by :func:`pretrain_autoencoder` (a local file, no download).

    The file is read onto the CPU with ``weights_only=True``; ``dataset``
    gives the channels and normalisation when the file does not name one.
    """
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = _for_dataset(dataset_info(str(saved.get("dataset", dataset))))
    model.load_state_dict(saved["state"])
    return model.freeze()


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m flwr_gkt.data.bridge``: pre-train the bridge autoencoder and save it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_held_out_arguments(parser, "the autoencoder", epochs=3)
    args = parser.parse_args(argv)
    result = pretrain_autoencoder(args.out, **held_out_options(args))
    print(
        f"bridge autoencoder trained on {int(result['samples'])} held-out {args.dataset} images: "
        f"test reconstruction MSE {result['test-mse']:.4f}; saved to {args.out}"
    )


if __name__ == "__main__":
    main()

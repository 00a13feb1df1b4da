"""Bridge samples (FedAgg, Wu et al., INFOCOM 2024): a small frozen autoencoder.

End devices encode their training images once into small embeddings
``eps = enc(x)`` (``4 x 8 x 8`` for ``32 x 32`` inputs, ``4 x 7 x 7`` for
``28 x 28``) and send them with the labels up the tree; every node holds the
same frozen decoder and regenerates the *bridge samples* ``dec(eps)`` itself,
so that afterwards a parent and a child exchange only logits computed on them
(BSBODP). The architecture is the one of the official code
(``autoencoder_pretrained.py``: encoder 1.9K, decoder 2.5K parameters for RGB).

The official weights were pre-trained on ImageNet, which is not available
offline here. :func:`pretrain_autoencoder` (``python -m flwr_gkt.core.bridge``)
trains it on training images no node holds (the complement of the
federation's ``data-fraction`` subset, as :mod:`flwr_gkt.data.pretrain` does),
writes it to a file, and :func:`load_autoencoder` reads it back by path.

Difference from the official code: the decoder ends in a Sigmoid (pixels in
``[0, 1]``) while the models are trained on mean/std-normalised images; the
official code feeds the ``[0, 1]`` bridge samples unnormalised. We normalise
them with the dataset's mean and std (:meth:`BridgeAutoencoder.bridge`), so
real and bridge samples have the same scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor, nn

from flwr_gkt.core.training import get_device
from flwr_gkt.data import DatasetInfo, dataset_info, load_dataset
from flwr_gkt.data.partition import add_held_out_arguments, held_out_options, held_out_sample

__all__ = ["EMBEDDING_CHANNELS", "BridgeAutoencoder", "load_autoencoder", "pretrain_autoencoder"]

#: Channels of an embedding (the encoder output, 1/4 of the image side).
EMBEDDING_CHANNELS = 4


def _conv(cin: int, cout: int, bn: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    return [*layers, nn.ReLU(inplace=True)]


class BridgeAutoencoder(nn.Module):
    """Encoder (end devices) and decoder (every node) of the bridge samples.

    The encoder (two conv-BN-ReLU + max-pool stages, then a conv to
    :data:`EMBEDDING_CHANNELS` channels) divides height and width by 4; the
    decoder upsamples back and ends in a Sigmoid.

    Parameters
    ----------
    channels : int
        Image channels (1 for Fashion-MNIST, 3 for CIFAR).
    mean, std : tuple[float, ...], optional
        Per-channel normalisation of the models' inputs; :meth:`bridge`
        applies it to the decoded ``[0, 1]`` images. ``None``: mean 0, std 1
        (no normalisation). Kept as buffers, so saved with the weights.
    """

    mean: Tensor  # buffers: the dataset's per-channel normalisation
    std: Tensor

    def __init__(
        self,
        channels: int = 3,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            *_conv(channels, 16),
            nn.MaxPool2d(2),
            *_conv(16, 8),
            nn.MaxPool2d(2),
            nn.Conv2d(8, EMBEDDING_CHANNELS, 3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.decoder = nn.Sequential(
            *_conv(EMBEDDING_CHANNELS, 8, bn=False),
            *_conv(8, 8),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            *_conv(8, 16),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(16, channels, 3, padding=1),
            nn.Sigmoid(),
        )
        self.register_buffer("mean", torch.tensor(mean or (0.0,) * channels).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std or (1.0,) * channels).view(1, -1, 1, 1))

    def forward(self, pixels: Tensor) -> Tensor:
        """Return the reconstruction ``dec(enc(pixels))`` in ``[0, 1]`` of images in ``[0, 1]``.

        Parameters
        ----------
        pixels : Tensor
            Unnormalised images in ``[0, 1]``, ``N x channels x H x W`` (``H`` and
            ``W`` multiples of 4 for an exact-size reconstruction).

        Returns
        -------
        Tensor
            The reconstructed images (not normalised), differentiable.
        """
        out: Tensor = self.decoder(self.encoder(pixels))
        return out

    @torch.no_grad()
    def encode(self, pixels: Tensor, batch_size: int = 256) -> Tensor:
        """Return the embeddings ``eps = enc(x)`` of images in ``[0, 1]`` (eval mode, no gradient).

        Puts the module in eval mode.

        Parameters
        ----------
        pixels : Tensor
            Unnormalised images in ``[0, 1]``, ``N x channels x H x W``, on the
            module's device.
        batch_size : int
            Number of images per encoder pass.

        Returns
        -------
        Tensor
            Embeddings ``N x 4 x H/4 x W/4`` (``4 x 8 x 8`` for ``32 x 32``).
        """
        self.eval()
        return torch.cat(
            [self.encoder(pixels[i : i + batch_size]) for i in range(0, len(pixels), batch_size)]
        )

    @torch.no_grad()
    def bridge(self, embeddings: Tensor, batch_size: int = 256) -> Tensor:
        """Return the bridge samples ``dec(eps)``, normalised like the models' real inputs.

        Puts the module in eval mode; runs without gradient. The decoded
        ``[0, 1]`` images are normalised as ``(dec(eps) - mean) / std``.

        Parameters
        ----------
        embeddings : Tensor
            Embeddings ``eps`` from :meth:`encode`, on the module's device.
        batch_size : int
            Number of embeddings per decoder pass.

        Returns
        -------
        Tensor
            Normalised bridge samples ``N x channels x H x W``.
        """
        self.eval()
        out = [
            self.decoder(embeddings[i : i + batch_size])
            for i in range(0, len(embeddings), batch_size)
        ]
        return (torch.cat(out) - self.mean) / self.std

    def freeze(self) -> BridgeAutoencoder:
        """Freeze the autoencoder: eval mode, no gradients.

        The autoencoder is identical on every node and never trained during a
        run.

        Returns
        -------
        BridgeAutoencoder
            The module itself.
        """
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self


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
    MSE between images in ``[0, 1]`` and their reconstructions.

    Parameters
    ----------
    out : str | Path
        File to write (``torch.save`` of ``{"dataset", "state"}``); parent
        directories are created.
    dataset : str
        Dataset name (see :func:`flwr_gkt.data.load_dataset`).
    data_dir : str
        Where the dataset files are; ``""`` for the default location.
    fraction : float
        The federation's ``data-fraction``; must be below 1.
    num_partitions : int
        The federation's ``num-clients``.
    seed : int
        The federation's ``seed``; also seeds the autoencoder's training.
    samples : int
        Largest number of held-out images to train on.
    epochs : int
        Passes over those images.
    batch_size : int
        Mini-batch size.
    lr : float
        Adam learning rate.
    device : str
        ``auto``, ``cpu``, ``cuda``... (see :func:`flwr_gkt.core.training.get_device`).

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

    Parameters
    ----------
    path : str | Path
        The file written by :func:`pretrain_autoencoder`; read onto the CPU
        with ``weights_only=True``.
    dataset : str
        Dataset whose channels and normalisation to use when the file does
        not name one.

    Returns
    -------
    BridgeAutoencoder
        The autoencoder with the saved weights, frozen (see
        :meth:`BridgeAutoencoder.freeze`).
    """
    saved = torch.load(Path(path), map_location="cpu", weights_only=True)
    model = _for_dataset(dataset_info(str(saved.get("dataset", dataset))))
    model.load_state_dict(saved["state"])
    return model.freeze()


def main(argv: list[str] | None = None) -> None:
    """Run ``python -m flwr_gkt.core.bridge``: pre-train the bridge autoencoder and save it."""
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

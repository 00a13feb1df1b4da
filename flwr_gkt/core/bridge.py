"""Bridge samples (FedAgg, Wu et al., INFOCOM 2024): a small frozen autoencoder.

End devices encode their training images once into small embeddings
``eps = enc(x)`` (``4 x 8 x 8`` for ``32 x 32`` inputs, ``4 x 7 x 7`` for
``28 x 28``) and send them with the labels up the tree; every node holds the
same frozen decoder and regenerates the *bridge samples* ``dec(eps)`` itself,
so that afterwards a parent and a child exchange only logits computed on them
(BSBODP). The architecture is the one of the official code
(``autoencoder_pretrained.py``: encoder 1.9K, decoder 2.5K parameters for RGB).

The official weights were pre-trained on ImageNet, which is not available
offline here. :func:`flwr_gkt.data.bridge.pretrain_autoencoder`
(``python -m flwr_gkt.data.bridge``) trains it on training images no node
holds, writes it to a file, and :func:`flwr_gkt.data.bridge.load_autoencoder`
reads it back by path.

Difference from the official code: the decoder ends in a Sigmoid (pixels in
``[0, 1]``) while the models are trained on mean/std-normalised images; the
official code feeds the ``[0, 1]`` bridge samples unnormalised. We normalise
them with the dataset's mean and std (:meth:`BridgeAutoencoder.bridge`), so
real and bridge samples have the same scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["EMBEDDING_CHANNELS", "BridgeAutoencoder"]

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

        ``pixels`` are unnormalised, ``N x channels x H x W`` (``H`` and ``W``
        multiples of 4 for an exact-size reconstruction); differentiable.
        """
        out: Tensor = self.decoder(self.encoder(pixels))
        return out

    @torch.no_grad()
    def encode(self, pixels: Tensor, batch_size: int = 256) -> Tensor:
        """Return the embeddings ``eps = enc(x)`` of images in ``[0, 1]`` (eval mode, no gradient).

        Puts the module in eval mode. ``pixels`` (on the module's device) are
        encoded ``batch_size`` at a time into ``N x 4 x H/4 x W/4``
        (``4 x 8 x 8`` for ``32 x 32``).
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
        ``embeddings`` (from :meth:`encode`, on the module's device) are
        decoded ``batch_size`` at a time.
        """
        self.eval()
        out = [
            self.decoder(embeddings[i : i + batch_size])
            for i in range(0, len(embeddings), batch_size)
        ]
        return (torch.cat(out) - self.mean) / self.std

    def freeze(self) -> BridgeAutoencoder:
        """Freeze the autoencoder in place (eval mode, no gradients); return it.

        The autoencoder is identical on every node and never trained during a
        run.
        """
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

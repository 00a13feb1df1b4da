"""Normalisation and the paper's training augmentation, on image tensors.

:func:`normalize` turns ``uint8`` images into float32 standardised with a
dataset's channel statistics; :class:`RandomCropFlip` is the CIFAR / CINIC
training augmentation (random crop with 4-pixel padding + horizontal flip),
per sample, for normalised batches.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flwr_gkt.data.datasets import DatasetInfo


def normalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Convert ``uint8`` images to float32, scaled to [0, 1] and standardised per channel.

    Computes ``(x / 255 - mean) / std`` of images ``N x C x H x W`` with
    ``info``'s per-channel statistics.
    """
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


class RandomCropFlip:
    """Random crop with zero (black) padding + horizontal flip, per sample.

    The batched counterpart of torchvision's ``RandomCrop(side, padding=4)`` +
    ``RandomHorizontalFlip()`` used by the reference implementation, for
    normalised tensors: every sample of a batch gets its own crop offset and
    flip, drawn from ``generator``. (torchvision's transforms draw one set of
    parameters per call, i.e. per batch when given a batch tensor.)

    Parameters
    ----------
    padding : int
        Pixels of padding on each side before cropping back to the input size.
    fill : tuple[float, ...]
        Per-channel value of the padding in normalised units (black:
        ``-mean / std``).
    """

    def __init__(self, padding: int = 4, fill: tuple[float, ...] = (0.0,)) -> None:
        self.padding = int(padding)
        self.fill = tuple(float(v) for v in fill)

    @classmethod
    def for_dataset(cls, info: DatasetInfo, padding: int = 4) -> RandomCropFlip:
        """Build the augmentation with black padding (``-mean / std`` per channel of ``info``)."""
        return cls(padding, tuple(-m / s for m, s in zip(info.mean, info.std, strict=True)))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return a randomly cropped and flipped copy of a batch.

        Each sample is padded by ``padding`` pixels of ``fill``, cropped back to
        ``H x W`` at a uniform random offset and flipped horizontally with
        probability 1/2, drawn from ``generator``. Shape and dtype are kept.
        """
        n, c, h, w = x.shape
        p = self.padding
        fill = (
            torch.tensor(self.fill, dtype=x.dtype)
            .view(1, -1, 1, 1)
            .expand(n, c, h + 2 * p, w + 2 * p)
        )
        padded = fill.clone()
        padded[:, :, p : p + h, p : p + w] = x
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < 0.5
        # Gather each sample's window with one advanced-indexing operation.
        rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)
        cols = dx.view(n, 1) + torch.arange(w)
        cols = torch.where(flip.view(n, 1), cols.flip(1), cols).view(n, 1, 1, w)
        batch = torch.arange(n).view(n, 1, 1, 1)
        chans = torch.arange(c).view(1, c, 1, 1)
        return padded[batch, chans, rows, cols]

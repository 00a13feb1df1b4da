"""CINIC-10 from the ImageFolder layout of its release.

``<dir>/train/<class>/*.png`` and ``<dir>/test/<class>/*.png`` (``valid/`` is
not used, as in the reference implementation). Read with
:class:`torchvision.datasets.ImageFolder`; the decoded images are cached as one
``.npz`` per split in the cache directory
(:func:`~flwr_gkt.data.sources.files.cache_dir`).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import pil_loader

from flwr_gkt.data.sources.files import DatasetMissingError, cache_dir


def _load_image_folder(
    split_dir: Path, classes: list[str] | None
) -> tuple[Tensor, Tensor, list[str]]:
    """Decode an ImageFolder split to uint8 tensors, cached as ``.npz``."""
    folder = ImageFolder(str(split_dir), loader=str)
    if classes is not None and folder.classes != classes:
        raise ValueError(
            f"{split_dir}: classes {folder.classes} differ from the train split's {classes}"
        )
    key = hashlib.sha1(
        f"{split_dir.resolve()}|{len(folder.samples)}|{split_dir.stat().st_mtime_ns}".encode()
    ).hexdigest()[:16]
    cache = cache_dir() / "imagefolder" / f"{split_dir.name}-{key}.npz"
    if cache.is_file():
        with np.load(cache) as npz:
            return torch.from_numpy(npz["x"]), torch.from_numpy(npz["y"]), folder.classes
    images = [
        torch.from_numpy(np.array(pil_loader(path))).permute(2, 0, 1) for path, _ in folder.samples
    ]
    if len({tuple(img.shape) for img in images}) > 1:
        raise ValueError(f"{split_dir}: images of different sizes; expected 32x32 CINIC-10 images")
    x = torch.stack(images) if images else torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    y = torch.tensor(folder.targets, dtype=torch.long)
    cache.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=cache.parent, suffix=".npz", delete=False) as f:
        np.savez(f, x=x.numpy(), y=y.numpy())
    os.replace(f.name, cache)
    return x, y, folder.classes


def load_cinic10(data_dir: Path) -> tuple[Tensor, ...]:
    """Read CINIC-10's ImageFolder splits ``train/<class>/*.png`` and ``test/...`` in ``data_dir``.

    Returns ``x_train, y_train, x_test, y_test``: ``uint8`` images
    ``N x 3 x H x W`` and int64 labels.

    Raises
    ------
    DatasetMissingError
        If a split directory is missing.
    ValueError
        If the test split's classes differ from the train split's, or images
        differ in size.
    """
    if not all((data_dir / split).is_dir() for split in ("train", "test")):
        raise DatasetMissingError(
            f"CINIC-10 not found in {data_dir}: expected the ImageFolder layout of the CINIC-10 "
            f"release, {data_dir}/train/<class>/*.png and {data_dir}/test/<class>/*.png (extract "
            "CINIC-10.tar.gz from the University of Edinburgh's DataShare there). Set data-dir "
            "to that directory."
        )
    x_tr, y_tr, classes = _load_image_folder(data_dir / "train", None)
    x_te, y_te, _ = _load_image_folder(data_dir / "test", classes)
    return x_tr, y_tr, x_te, y_te

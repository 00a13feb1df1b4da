"""The supported datasets: their static facts and one loader for all of them.

:data:`DATASETS` names each dataset with its classes, image shape, channel
statistics and augmentation choice (:class:`DatasetInfo`);
:func:`load_dataset` reads a whole dataset from local files, never downloaded,
as ``uint8`` ``N x C x H x W`` tensors (:class:`RawDataset`), cached per
process. The file formats are read by :mod:`flwr_gkt.data.sources`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from flwr_gkt.data.sources import (
    DEFAULT_FASHION_MNIST_DIR,
    cache_dir,
    load_cifar,
    load_cinic10,
    load_fashion_mnist,
)


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset.

    Attributes
    ----------
    name : str
        Key in :data:`DATASETS` and value of the ``dataset`` config key.
    num_classes, channels, side : int
        Classes, image channels and image side (square images).
    mean, std : tuple[float, ...]
        Per-channel statistics used for normalisation.
    augment : bool
        Whether training batches get random crop + flip (the paper's CIFAR /
        CINIC augmentation).
    """

    name: str
    num_classes: int
    channels: int
    side: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool


#: The supported datasets by name, with their normalisation statistics.
DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 28, (0.2860,), (0.3530,), False),
    # Statistics as in the reference implementation's data loaders.
    "cifar10": DatasetInfo(
        "cifar10",
        10,
        3,
        32,
        (0.49139968, 0.48215827, 0.44653124),
        (0.24703233, 0.24348505, 0.26158768),
        True,
    ),
    "cifar100": DatasetInfo(
        "cifar100",
        100,
        3,
        32,
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
        True,
    ),
    "cinic10": DatasetInfo(
        "cinic10",
        10,
        3,
        32,
        (0.47889522, 0.47227842, 0.43047404),
        (0.24205776, 0.23828046, 0.25874835),
        True,
    ),
}


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of dataset ``name``, a key of :data:`DATASETS`.

    Raises
    ------
    ValueError
        If ``name`` is not a known dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def default_data_dir(name: str) -> Path:
    """Return where a dataset is looked for when ``data-dir`` is not set.

    Fashion-MNIST: the Debian package's directory. Others:
    ``$FLWR_GKT_DATA/<name>`` (default ``$FLWR_GKT_CACHE/data/<name>``, with
    ``FLWR_GKT_CACHE`` defaulting to ``~/.cache/flwr_gkt``).
    """
    if name == "fashion-mnist":
        return Path(DEFAULT_FASHION_MNIST_DIR)
    root = os.environ.get("FLWR_GKT_DATA", str(cache_dir() / "data"))
    return Path(root) / name


@dataclass(frozen=True)
class RawDataset:
    """A whole dataset as ``uint8`` images ``N x C x H x W`` and int64 labels.

    Attributes
    ----------
    x_train, y_train : Tensor
        Training images and labels.
    x_test, y_test : Tensor
        Test images and labels.
    info : DatasetInfo
        The dataset's static facts.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: DatasetInfo


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> RawDataset:
    """Load a whole dataset as ``uint8`` images (cached per process).

    ``data_dir`` ``""`` reads :func:`default_data_dir`. The same object is
    returned for the same arguments until
    :func:`~flwr_gkt.data.node_data.clear_caches`.

    Raises
    ------
    DatasetMissingError
        The files are not there; the message says what is expected and how to
        obtain it.
    ValueError
        If ``name`` is unknown, or the images do not have the dataset's shape.
    """
    info = dataset_info(name)
    path = Path(data_dir).expanduser() if data_dir else default_data_dir(name)
    if name == "fashion-mnist":
        tensors = load_fashion_mnist(path)
    elif name == "cinic10":
        tensors = load_cinic10(path)
    else:
        tensors = load_cifar(name, path)
    x_tr, y_tr, x_te, y_te = tensors
    for x in (x_tr, x_te):
        if len(x) and tuple(x.shape[1:]) != (info.channels, info.side, info.side):
            raise ValueError(
                f"{name}: images of shape {tuple(x.shape[1:])}, expected "
                f"{(info.channels, info.side, info.side)}"
            )
    return RawDataset(x_tr, y_tr, x_te, y_te, info)

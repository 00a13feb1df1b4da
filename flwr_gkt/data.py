"""Datasets and partitions.

Fashion-MNIST is read offline from IDX files: by default those of the Debian
package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, gzip
compressed), or from any directory holding the four IDX files (compressed or
not), or from torchvision's own layout (``<dir>/FashionMNIST/raw``). Loading
goes through :class:`torchvision.datasets.FashionMNIST`; gzip files are
unpacked once into a cache directory in torchvision's layout.
"""

from __future__ import annotations

import functools
import gzip
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import FashionMNIST

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "DatasetMissingError",
    "ClientData",
    "load_fashion_mnist",
    "iid_partition",
    "client_data",
]

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
# Channel statistics of the Fashion-MNIST training set.
_FMNIST_MEAN, _FMNIST_STD = 0.2860, 0.3530


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not where they are expected."""


def _cache_dir() -> Path:
    return Path(os.environ.get("FLWR_GKT_CACHE", Path.home() / ".cache" / "flwr_gkt"))


def _torchvision_root(data_dir: Path) -> Path:
    """Return a root that torchvision's ``FashionMNIST`` can read without download."""
    if all((data_dir / "FashionMNIST" / "raw" / f).is_file() for f in _IDX_FILES):
        return data_dir
    sources = {}
    for name in _IDX_FILES:
        for candidate in (data_dir / name, data_dir / f"{name}.gz"):
            if candidate.is_file():
                sources[name] = candidate
                break
        else:
            raise DatasetMissingError(
                f"Fashion-MNIST file {name}[.gz] not found in {data_dir}. Install the "
                "Debian package with `apt-get install dataset-fashion-mnist` (files land "
                f"in {DEFAULT_FASHION_MNIST_DIR}) or set data-dir to a directory holding "
                "the four IDX files."
            )
    root = _cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime:
            continue
        opener = gzip.open if src.suffix == ".gz" else open
        # Unpack to a temporary file, then rename: concurrent loaders never see
        # a half-written file.
        with opener(src, "rb") as fin, tempfile.NamedTemporaryFile(dir=raw, delete=False) as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(fout.name, dst)
    return root


@functools.lru_cache(maxsize=4)
def load_fashion_mnist(data_dir: str = "") -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Load Fashion-MNIST as normalised float tensors.

    Returns
    -------
    tuple
        ``(x_train, y_train, x_test, y_test)`` with images ``N x 1 x 28 x 28``
        (float32, normalised) and int64 labels.
    """
    root = _torchvision_root(Path(data_dir or DEFAULT_FASHION_MNIST_DIR))
    out: list[Tensor] = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        x = (ds.data.unsqueeze(1).float() / 255.0 - _FMNIST_MEAN) / _FMNIST_STD
        out += [x, ds.targets.long()]
    return out[0], out[1], out[2], out[3]


def iid_partition(
    num_samples: int, num_partitions: int, seed: int, fraction: float = 1.0
) -> list[np.ndarray]:
    """Split ``fraction`` of ``range(num_samples)`` into equal random parts.

    The same seed gives the same parts; each part keeps a fixed order, which is
    the sample order the node and the server agree on.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    perm = np.random.default_rng(seed).permutation(num_samples)
    used = perm[: max(num_partitions, int(round(num_samples * fraction)))]
    return np.array_split(used, num_partitions)


@dataclass
class ClientData:
    """A node's local data: training split and local test split."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])


def client_data(
    partition_id: int,
    num_partitions: int,
    *,
    data_dir: str = "",
    fraction: float = 1.0,
    test_fraction: float = 1.0,
    seed: int = 0,
) -> ClientData:
    """Fashion-MNIST partition ``partition_id`` of ``num_partitions`` (IID).

    ``fraction`` of the 60k training images is split across the nodes, and
    ``test_fraction`` of the 10k test images (all of it by default), so that
    the example-weighted evaluation over all nodes covers that test set.
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir)
    train_idx = torch.from_numpy(iid_partition(len(y_tr), num_partitions, seed, fraction)[partition_id])
    test_idx = torch.from_numpy(
        iid_partition(len(y_te), num_partitions, seed + 1, test_fraction)[partition_id]
    )
    return ClientData(x_tr[train_idx], y_tr[train_idx], x_te[test_idx], y_te[test_idx])

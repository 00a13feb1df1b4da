"""Fashion-MNIST from local IDX files, read with torchvision's ``FashionMNIST``.

By default the files of the Debian package ``dataset-fashion-mnist``
(:data:`DEFAULT_FASHION_MNIST_DIR`, gzip compressed), or any directory holding
the four IDX files (compressed or not), or torchvision's layout
(``<dir>/FashionMNIST/raw``). Gzip files are unpacked once into the cache
directory (:func:`~flwr_gkt.data.sources.files.cache_dir`).
"""

from __future__ import annotations

import gzip
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import Tensor
from torchvision.datasets import FashionMNIST

from flwr_gkt.data.sources.files import DatasetMissingError, cache_dir

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _atomic_copy(src: Path, dst: Path, opener: Callable[..., Any] = open) -> None:
    """Copy ``src`` to ``dst`` via a temporary file and a rename."""
    with (
        opener(src, "rb") as fin,
        tempfile.NamedTemporaryFile(dir=dst.parent, delete=False) as fout,
    ):
        shutil.copyfileobj(fin, fout)
    os.replace(fout.name, dst)


def _fashion_mnist_root(data_dir: Path) -> Path:
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
    root = cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if not (dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime):
            _atomic_copy(src, dst, gzip.open if src.suffix == ".gz" else open)
    return root


def load_fashion_mnist(data_dir: Path) -> tuple[Tensor, ...]:
    """Read Fashion-MNIST's four IDX files (gzip compressed or not) in ``data_dir``.

    ``data_dir`` may also have torchvision's layout (``<data_dir>/FashionMNIST/raw``).
    Returns ``x_train, y_train, x_test, y_test``: ``uint8`` images
    ``N x 1 x 28 x 28`` and int64 labels.

    Raises
    ------
    DatasetMissingError
        If an IDX file is not found.
    """
    root = _fashion_mnist_root(data_dir)
    out: list[Tensor] = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        out += [ds.data.unsqueeze(1).contiguous(), ds.targets.long()]
    return tuple(out)

"""The dataset file formats, read from local files, never downloaded.

One module per source: :mod:`~flwr_gkt.data.sources.fashion_mnist` (IDX files),
:mod:`~flwr_gkt.data.sources.cifar` (torchvision's pickled batches, with a
restricted unpickler and safe archive extraction),
:mod:`~flwr_gkt.data.sources.cinic` (ImageFolder PNGs); what they share is in
:mod:`~flwr_gkt.data.sources.files`. Each loader returns ``x_train, y_train,
x_test, y_test`` as ``uint8`` images and int64 labels.
"""

from flwr_gkt.data.sources.cifar import CifarUnpickler, extract_tar, load_cifar
from flwr_gkt.data.sources.cinic import load_cinic10
from flwr_gkt.data.sources.fashion_mnist import DEFAULT_FASHION_MNIST_DIR, load_fashion_mnist
from flwr_gkt.data.sources.files import DatasetMissingError, cache_dir

__all__ = [
    "DEFAULT_FASHION_MNIST_DIR",
    "CifarUnpickler",
    "DatasetMissingError",
    "cache_dir",
    "extract_tar",
    "load_cifar",
    "load_cinic10",
    "load_fashion_mnist",
]

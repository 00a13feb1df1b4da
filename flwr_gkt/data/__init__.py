"""Datasets: offline loaders, normalisation, augmentation and node data.

The package by concern (everything below is re-exported here):

:mod:`~flwr_gkt.data.datasets`
    The supported datasets (:data:`DATASETS`) and :func:`load_dataset`.
:mod:`~flwr_gkt.data.sources`
    Their file formats: Fashion-MNIST IDX files, CIFAR pickles, CINIC-10
    folders, all read from local files, never downloaded.
:mod:`~flwr_gkt.data.transforms`
    :func:`normalize` and the training augmentation :class:`RandomCropFlip`.
:mod:`~flwr_gkt.data.node_data`
    A node's data (:data:`NodeData`): :class:`ClientData` and
    :func:`client_data`.
:mod:`~flwr_gkt.data.streaming`
    :class:`DatasetData`: map-style datasets a node brings, streamed in batches.
:mod:`~flwr_gkt.data.partition`, :mod:`~flwr_gkt.data.pretrain`, :mod:`~flwr_gkt.data.bridge`
    Partitions and held-out samples; pre-training of edge models and of the
    bridge autoencoder.
"""

from flwr_gkt.data.datasets import DATASETS, DatasetInfo, RawDataset, dataset_info, load_dataset
from flwr_gkt.data.node_data import ClientData, NodeData, clear_caches, client_data
from flwr_gkt.data.sources import DEFAULT_FASHION_MNIST_DIR, DatasetMissingError
from flwr_gkt.data.streaming import DatasetData, HFImageDataset, as_torch_dataset
from flwr_gkt.data.transforms import RandomCropFlip, normalize

__all__ = [
    "DATASETS",
    "DEFAULT_FASHION_MNIST_DIR",
    "ClientData",
    "DatasetData",
    "DatasetInfo",
    "DatasetMissingError",
    "HFImageDataset",
    "NodeData",
    "RandomCropFlip",
    "RawDataset",
    "as_torch_dataset",
    "clear_caches",
    "client_data",
    "dataset_info",
    "load_dataset",
    "normalize",
]

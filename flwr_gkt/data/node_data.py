"""A node's data: its partition of a dataset, normalised, or datasets it brings.

A node's data (:data:`NodeData`) is either a :class:`ClientData` of in-memory
tensors (what :func:`client_data` returns: the node's partition of a dataset,
normalised with the dataset's channel statistics, with the training
augmentation of :class:`~flwr_gkt.data.transforms.RandomCropFlip` for CIFAR /
CINIC) or a :class:`~flwr_gkt.data.streaming.DatasetData` of map-style datasets
the node brings itself, streamed in batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import torch
from torch import Tensor

from flwr_gkt.data.datasets import load_dataset
from flwr_gkt.data.partition import label_matched_split, partition_indices
from flwr_gkt.data.streaming import DatasetData
from flwr_gkt.data.transforms import RandomCropFlip, normalize


@dataclass
class ClientData:
    """A node's local data: training split and local test split.

    ``augment`` (when set) is applied to training batches, see
    :class:`RandomCropFlip`.

    Parameters
    ----------
    x_train, y_train : Tensor
        Normalised float32 training images ``N x C x H x W`` and their labels.
    x_test, y_test : Tensor
        Normalised float32 test images and their labels.
    num_classes : int
        Number of classes of the dataset.
    augment : Callable[[Tensor, torch.Generator | None], Tensor] | None
        ``augment(inputs, generator)`` for training batches, or ``None``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int = 10
    augment: Callable[[Tensor, torch.Generator | None], Tensor] | None = None

    @property
    def in_channels(self) -> int:
        """Image channels of the training images (``x_train.shape[1]``)."""
        return int(self.x_train.shape[1])


#: A node's data as the ClientApp handlers take it: in-memory tensors or
#: streamed map-style datasets.
NodeData: TypeAlias = ClientData | DatasetData


@functools.lru_cache(maxsize=8)
def _partitions(
    dataset: str,
    data_dir: str,
    split: str,
    num_partitions: int,
    method: str,
    seed: int,
    fraction: float,
    alpha: float,
    min_size: int,
) -> list[np.ndarray]:
    """Return all nodes' index arrays of one split.

    Cached: a process serving many nodes computes the partition once.
    """
    raw = load_dataset(dataset, data_dir)
    labels = (raw.y_train if split == "train" else raw.y_test).numpy()
    return partition_indices(
        labels,
        num_partitions,
        method,
        seed=seed,
        fraction=fraction,
        alpha=alpha,
        min_partition_size=min_size,
    )


def client_data(
    partition_id: int,
    num_partitions: int,
    *,
    dataset: str = "fashion-mnist",
    data_dir: str = "",
    fraction: float = 1.0,
    test_fraction: float = 1.0,
    partition: str = "iid",
    dirichlet_alpha: float = 0.5,
    min_partition_size: int = 10,
    test_split: str = "global",
    augment: bool | None = None,
    seed: int = 0,
) -> ClientData:
    """Return node ``partition_id``'s data of ``num_partitions``, reproducible by ``seed``.

    The partitions are computed once per process and cached; images are
    normalised with the dataset's channel statistics.

    Parameters
    ----------
    partition_id, num_partitions : int
        This node and the number of nodes.
    dataset, data_dir : str
        See :func:`load_dataset`.
    fraction : float
        Share of the training set split across the nodes.
    test_fraction : float
        Share of the test set used for evaluation.
    partition : str
        ``"iid"`` or ``"dirichlet"`` (label skew), see
        :func:`flwr_gkt.data.partition.partition_indices`.
    dirichlet_alpha, min_partition_size : float, int
        Concentration and minimum size of the Dirichlet partition.
    test_split : str
        ``"global"``: the test set is split IID across the nodes, so that the
        example-weighted evaluation over all nodes covers it (the paper's global
        test accuracy). ``"local"``: each node's test split follows its own
        training label distribution (personalised evaluation). ``"whole"``:
        every node holds the whole (``test_fraction`` of the) test set, so the
        example-weighted evaluation is the average of the nodes' accuracies on
        it (the reference code's evaluation).
    augment : bool, optional
        Random crop + flip on training batches; default: the dataset's choice.
    seed : int
        Seed of every random choice.

    Raises
    ------
    ValueError
        If ``partition_id`` is not in ``[0, num_partitions)``, ``test_split``
        is unknown, or the partition cannot be made (see
        :func:`flwr_gkt.data.partition.partition_indices`).
    DatasetMissingError
        If the dataset files are not found (see :func:`load_dataset`).
    """
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} not in [0, {num_partitions})")
    raw = load_dataset(dataset, data_dir)
    info = raw.info
    train_idx = _partitions(
        dataset,
        data_dir,
        "train",
        num_partitions,
        partition,
        seed,
        fraction,
        dirichlet_alpha,
        min_partition_size,
    )[partition_id]
    if test_split == "global":
        test_idx = _partitions(
            dataset, data_dir, "test", num_partitions, "iid", seed + 1, test_fraction, 0.0, 0
        )[partition_id]
    elif test_split == "whole":
        test_idx = _partitions(
            dataset, data_dir, "test", 1, "iid", seed + 1, test_fraction, 0.0, 0
        )[0]
    elif test_split == "local":
        y_te = raw.y_test.numpy()
        size = max(1, round(len(y_te) * test_fraction / num_partitions))
        test_idx = label_matched_split(
            y_te,
            raw.y_train.numpy()[train_idx],
            size,
            info.num_classes,
            seed=seed * 7919 + partition_id,
        )
    else:
        raise ValueError(
            f"unknown test-split {test_split!r} (expected 'global', 'local' or 'whole')"
        )
    tr, te = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    use_aug = info.augment if augment is None else augment
    return ClientData(
        normalize(raw.x_train[tr], info),
        raw.y_train[tr],
        normalize(raw.x_test[te], info),
        raw.y_test[te],
        num_classes=info.num_classes,
        augment=RandomCropFlip.for_dataset(info) if use_aug else None,
    )


def clear_caches() -> None:
    """Forget the datasets and partitions cached in this process."""
    load_dataset.cache_clear()
    _partitions.cache_clear()

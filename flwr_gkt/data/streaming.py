"""Node data a node brings itself: map-style datasets streamed in batches.

:class:`DatasetData` is the streamed counterpart of
:class:`~flwr_gkt.data.ClientData`: instead of whole in-memory tensors, a
node hands the ClientApp handlers any map-style dataset -- a
:class:`torch.utils.data.Dataset` returning ``(image, label)``, or a Hugging
Face ``datasets.Dataset`` (e.g. a partition of flwr-datasets'
``FederatedDataset``) with a transform -- and the edge reads it a batch at a
time through a :class:`torch.utils.data.DataLoader`
(:class:`~flwr_gkt.core.training.DatasetBatches`). The split never has to fit
in memory as one tensor.

**Sample order.** FedGKT uploads ``H``, ``Z_c`` and ``Y`` of every training
sample and gets back the server logits ``Z_s``, one row per sample, in the
order of the upload. The extraction pass reads indices ``0..N-1`` in order, so
row ``i`` is sample ``i``; training reads a seeded permutation and looks each
sample's ``Z_s`` row up by its index. A random transform inside the dataset
(augmentation) changes the images, never which index a sample has, so the
alignment holds whatever the transform does. The dataset must return the same
*label* for an index every time, and keep its length and order across rounds.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset

from flwr_gkt.core.training import DatasetBatches, SizedDataset

__all__ = ["DatasetData", "HFImageDataset", "as_torch_dataset"]


def _is_hf_dataset(dataset: object) -> bool:
    """Whether ``dataset`` is a Hugging Face ``datasets.Dataset`` (without importing ``datasets``)."""
    module = sys.modules.get("datasets")  # a datasets.Dataset exists only once it is imported
    return module is not None and isinstance(dataset, module.Dataset)


def _image(value: Any) -> Tensor:
    """Return one image as a tensor (from a tensor, an array or nested lists)."""
    return value if isinstance(value, Tensor) else torch.as_tensor(value)


class HFImageDataset(Dataset[tuple[Tensor, int]]):
    """A Hugging Face ``datasets.Dataset`` as a map-style torch dataset of ``(image, label)``.

    ``dataset[i]`` reads row ``i`` and returns its ``image_key`` column as a
    tensor and its ``label_key`` column as an ``int``. The HF dataset's format
    or transform (``with_transform`` / ``set_transform`` / ``with_format``)
    applies; it must turn the images into float ``C x H x W`` tensors (or
    arrays), normalised as the edge model expects. A batch of indices is read
    with one batched read (``__getitems__``), so the transform sees the batch.

    Parameters
    ----------
    dataset : datasets.Dataset
        The rows, e.g. a partition from a flwr-datasets partitioner.
    image_key, label_key : str
        Columns of the image and of the label.

    Raises
    ------
    KeyError
        If a column is missing from the dataset.
    """

    def __init__(self, dataset: Any, image_key: str = "image", label_key: str = "label") -> None:
        missing = [k for k in (image_key, label_key) if k not in dataset.column_names]
        if missing:
            raise KeyError(
                f"column(s) {missing} not in the dataset (columns: {dataset.column_names}); "
                "set image_key / label_key"
            )
        self.dataset = dataset
        self.image_key, self.label_key = image_key, label_key

    def __len__(self) -> int:
        """Return the number of rows."""
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Return row ``index`` as ``(image tensor, label)``."""
        row = self.dataset[int(index)]
        return _image(row[self.image_key]), int(row[self.label_key])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[Tensor, int]]:
        """Return rows ``indices`` as ``(image tensor, label)`` pairs, read in one batch."""
        batch = self.dataset[[int(i) for i in indices]]
        images, labels = batch[self.image_key], batch[self.label_key]
        return [(_image(images[j]), int(labels[j])) for j in range(len(indices))]


def as_torch_dataset(
    dataset: Any, image_key: str = "image", label_key: str = "label"
) -> SizedDataset:
    """Return ``dataset`` as a map-style torch dataset of ``(image, label)``.

    A map-style torch dataset is returned as is; a Hugging Face
    ``datasets.Dataset`` is wrapped in :class:`HFImageDataset` with its
    columns ``image_key`` and ``label_key``.

    Raises
    ------
    TypeError
        If ``dataset`` is an iterable-style dataset (no indices, so no stable
        sample order) or has no length.
    """
    if _is_hf_dataset(dataset):
        return HFImageDataset(dataset, image_key, label_key)
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        raise TypeError(
            f"{type(dataset).__name__} is not a map-style dataset with a length: FedGKT needs "
            "indices 0..N-1 in a stable order (sample i's server logits are row i)"
        )
    if not hasattr(dataset, "__getitem__"):
        raise TypeError(f"{type(dataset).__name__} has no __getitem__")
    return dataset  # type: ignore[no-any-return]


@dataclass
class DatasetData:
    """A node's local data as map-style datasets, streamed in batches.

    Wherever the ClientApp handlers take a :class:`~flwr_gkt.data.ClientData`
    they take this too (see :mod:`flwr_gkt.data.streaming` for the sample
    order). Hugging Face datasets are wrapped in :class:`HFImageDataset`.

    Parameters
    ----------
    train : SizedDataset or datasets.Dataset
        The training split: ``train[i] -> (image, label)``, images float
        ``C x H x W`` (normalised, augmented if you want: a random transform
        is applied afresh every time a sample is read).
    test : SizedDataset or datasets.Dataset, optional
        The local test split (a deterministic transform); ``None``: the node
        has no test data and refuses evaluate instructions.
    num_classes : int
        Number of classes (the width of the server logits).
    plain_train : SizedDataset or datasets.Dataset, optional
        The training split without random augmentation: same samples, same
        order. The extraction pass reads it in rounds whose instruction turns
        extraction augmentation off (``extract-augment`` false, replay rounds:
        the logits must come from the very inputs the stored features came
        from). Default: ``train``.
    image_key, label_key : str
        Columns of Hugging Face datasets.
    num_workers : int
        DataLoader worker processes (``0``: read in the node's process).

    Raises
    ------
    TypeError
        If a split is not a map-style dataset with a length.
    ValueError
        If the training split is empty, ``plain_train`` differs from it in
        length, or ``num_workers`` is negative.
    """

    train: SizedDataset
    test: SizedDataset | None = None
    num_classes: int = 10
    plain_train: SizedDataset | None = None
    image_key: str = "image"
    label_key: str = "label"
    num_workers: int = 0

    def __post_init__(self) -> None:
        """Wrap Hugging Face datasets; check the splits."""
        keys = (self.image_key, self.label_key)
        self.train = as_torch_dataset(self.train, *keys)
        if self.test is not None:
            self.test = as_torch_dataset(self.test, *keys)
        if self.plain_train is not None:
            self.plain_train = as_torch_dataset(self.plain_train, *keys)
            if len(self.plain_train) != len(self.train):
                raise ValueError(
                    f"plain_train has {len(self.plain_train)} samples, train {len(self.train)}: "
                    "they must be the same samples in the same order"
                )
        if len(self.train) == 0:
            raise ValueError("the training split is empty")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")

    @property
    def num_train(self) -> int:
        """Number of training samples (rows of ``H``, ``Z_c``, ``Y`` and ``Z_s``)."""
        return len(self.train)

    def _batches(
        self,
        dataset: SizedDataset,
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
        pin_memory: bool,
    ) -> DatasetBatches:
        return DatasetBatches(
            dataset,
            batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
        )

    def train_batches(
        self, batch_size: int, generator: torch.Generator | None = None, pin_memory: bool = False
    ) -> DatasetBatches:
        """Return the training batches: a new permutation of ``train`` from ``generator`` per pass.

        ``index`` of a batch is each sample's row; ``pin_memory`` pins batches
        for faster copies to a CUDA device.
        """
        return self._batches(self.train, batch_size, True, generator, pin_memory)

    def extraction_batches(
        self,
        batch_size: int,
        augment: bool = True,
        generator: torch.Generator | None = None,
        pin_memory: bool = False,
    ) -> DatasetBatches:
        """Return the extraction pass over the training split: indices ``0..N-1`` in order.

        ``augment`` reads ``train`` (its transform, random or not); ``False``
        reads ``plain_train`` when given. ``generator`` seeds the loader's
        workers (it is not drawn from).
        """
        source = self.train if augment or self.plain_train is None else self.plain_train
        return self._batches(source, batch_size, False, generator, pin_memory)

    def test_batches(self, batch_size: int, pin_memory: bool = False) -> DatasetBatches:
        """Return one pass over the test split, in index order.

        Raises
        ------
        ValueError
            If the node has no test split.
        """
        if self.test is None:
            raise ValueError("this node has no test split (DatasetData.test is None)")
        return self._batches(self.test, batch_size, False, None, pin_memory)

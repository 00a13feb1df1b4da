"""Datasets: offline loaders, normalisation, augmentation and node data.

Supported datasets (see :data:`DATASETS`), all read from local files, never
downloaded:

``fashion-mnist``
    IDX files: by default those of the Debian package ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``, gzip compressed), or any directory
    holding the four IDX files (compressed or not), or torchvision's layout
    (``<dir>/FashionMNIST/raw``). Read with :class:`torchvision.datasets.FashionMNIST`;
    gzip files are unpacked once into a cache directory.
``cifar10`` / ``cifar100``
    torchvision's format: ``<dir>/cifar-10-batches-py`` (``data_batch_1..5``,
    ``test_batch``, ``batches.meta``) or ``<dir>/cifar-100-python`` (``train``,
    ``test``, ``meta``); the downloaded archive ``cifar-10-python.tar.gz`` /
    ``cifar-100-python.tar.gz`` lying in ``<dir>`` is extracted once. Read with
    torchvision's ``CIFAR10`` / ``CIFAR100`` (without their MD5 check, so that
    re-packed or test files load too).
``cinic10``
    The ImageFolder layout of the CINIC-10 release: ``<dir>/train/<class>/*.png``
    and ``<dir>/test/<class>/*.png`` (``valid/`` is not used, as in the
    reference implementation). Read with :class:`torchvision.datasets.ImageFolder`;
    the decoded images are cached as one ``.npz`` per split.

Images are kept as ``uint8`` ``N x C x H x W`` tensors per process; a node's
partition is normalised to float32 with the dataset's channel statistics.
Training batches of CIFAR/CINIC get the paper's augmentation (random crop with
4-pixel padding + horizontal flip), see :class:`RandomCropFlip`.

A node's data (:data:`NodeData`) is either a :class:`ClientData` of in-memory
tensors (what :func:`client_data` returns) or a :class:`DatasetData` of
map-style datasets the node brings itself -- any torch ``Dataset``, or a
Hugging Face ``datasets.Dataset`` with a transform -- streamed in batches
(:mod:`flwr_gkt.data.streaming`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100, FashionMNIST, ImageFolder
from torchvision.datasets.folder import pil_loader

from flwr_gkt.data.partition import label_matched_split, partition_indices
from flwr_gkt.data.streaming import DatasetData, HFImageDataset, as_torch_dataset

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

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
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


class DatasetMissingError(FileNotFoundError):
    """The dataset files are not where they are expected."""


def dataset_info(name: str) -> DatasetInfo:
    """Return the :class:`DatasetInfo` of dataset ``name``.

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`: ``fashion-mnist``, ``cifar10``, ``cifar100``
        or ``cinic10``.

    Returns
    -------
    DatasetInfo
        Classes, image shape, channel statistics and augmentation choice.

    Raises
    ------
    ValueError
        If ``name`` is not a known dataset.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name]


def _cache_dir() -> Path:
    return Path(os.environ.get("FLWR_GKT_CACHE", Path.home() / ".cache" / "flwr_gkt"))


def default_data_dir(name: str) -> Path:
    """Return where a dataset is looked for when ``data-dir`` is not set.

    Fashion-MNIST: the Debian package's directory. Others:
    ``$FLWR_GKT_DATA/<name>`` (default ``$FLWR_GKT_CACHE/data/<name>``, with
    ``FLWR_GKT_CACHE`` defaulting to ``~/.cache/flwr_gkt``).

    Parameters
    ----------
    name : str
        The dataset name.

    Returns
    -------
    Path
        The default data directory of ``name``.
    """
    if name == "fashion-mnist":
        return Path(DEFAULT_FASHION_MNIST_DIR)
    root = os.environ.get("FLWR_GKT_DATA", str(_cache_dir() / "data"))
    return Path(root) / name


def _atomic_copy(src: Path, dst: Path, opener: Callable[..., Any] = open) -> None:
    """Copy ``src`` to ``dst`` via a temporary file and a rename."""
    with (
        opener(src, "rb") as fin,
        tempfile.NamedTemporaryFile(dir=dst.parent, delete=False) as fout,
    ):
        shutil.copyfileobj(fin, fout)
    os.replace(fout.name, dst)


# ----------------------------------------------------------------- raw loaders
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
    root = _cache_dir() / "fashion-mnist"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        dst = raw / name
        if not (dst.is_file() and dst.stat().st_mtime >= src.stat().st_mtime):
            _atomic_copy(src, dst, gzip.open if src.suffix == ".gz" else open)
    return root


def _load_fashion_mnist(data_dir: Path) -> tuple[Tensor, ...]:
    root = _fashion_mnist_root(data_dir)
    out: list[Tensor] = []
    for train in (True, False):
        ds = FashionMNIST(str(root), train=train, download=False)
        out += [ds.data.unsqueeze(1).contiguous(), ds.targets.long()]
    return tuple(out)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickle CIFAR batches: plain containers and NumPy arrays, no other globals.

    A tampered batch file cannot run code: ``pickle`` would import and call
    any global a file names; this one resolves only what a NumPy array needs.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),  # protocol 5
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}: refused")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="latin1").load()


class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader: presence checks, and a restricted unpickler.

    MD5 checks against the published checksums would refuse a re-packed or
    generated copy; instead every pickle is read with
    :class:`_CifarUnpickler`, which cannot run code.
    """

    def __init__(self, root: str, train: bool = True) -> None:
        self.root, self.train = root, train
        folder = Path(root) / self.base_folder
        files = self.train_list if train else self.test_list
        data, targets = [], []
        for name, _ in files:
            entry = _load_pickle(folder / name)
            data.append(np.asarray(entry["data"], dtype=np.uint8))
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = [int(t) for t in targets]
        self._load_meta()

    def _check_integrity(self) -> bool:
        folder = Path(self.root) / self.base_folder
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return all((folder / name).is_file() for name in names)

    def _load_meta(self) -> None:
        meta = _load_pickle(Path(self.root) / self.base_folder / self.meta["filename"])
        self.classes = meta[self.meta["key"]]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class _LocalCIFAR100(_LocalCIFAR10, CIFAR100):
    pass


def _extract_tar(archive: Path, root: Path) -> None:
    """Extract a dataset archive with tarfile's ``data`` filter (no links out, no devices).

    Python before 3.11.4 (Debian 12 ships 3.11.2) has no extraction filters:
    there, only regular files and directories inside ``root`` are accepted,
    and an archive with anything else raises :class:`tarfile.TarError` (as the
    filter does) before anything is written.
    """
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(root, filter="data")
            return
        base = root.resolve()
        members = tar.getmembers()
        for member in members:
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()):
                raise tarfile.TarError(
                    f"{archive.name}: {member.name!r} is not a file or a directory"
                )
            if target != base and base not in target.parents:
                raise tarfile.TarError(f"{archive.name}: {member.name!r} points outside {root}")
        tar.extractall(root, members=members)


_CIFAR = {
    "cifar10": (
        _LocalCIFAR10,
        "CIFAR-10",
        "cifar-10-batches-py",
        "cifar-10-python.tar.gz",
        "CIFAR10",
    ),
    "cifar100": (
        _LocalCIFAR100,
        "CIFAR-100",
        "cifar-100-python",
        "cifar-100-python.tar.gz",
        "CIFAR100",
    ),
}


def _load_cifar(name: str, data_dir: Path) -> tuple[Tensor, ...]:
    cls, title, folder, archive, tv_name = _CIFAR[name]
    root = data_dir.parent if data_dir.name == folder else data_dir
    if not (root / folder).is_dir() and (root / archive).is_file():
        _extract_tar(root / archive, root)
    probe = cls.__new__(cls)
    probe.root = str(root)
    if not probe._check_integrity():
        files = ", ".join([n for n, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]])
        raise DatasetMissingError(
            f"{title} not found in {root}: expected {root / folder}/ with {files} "
            f"(torchvision's format: the '{title} python version' archive {archive} extracted "
            f"there, or placed in {root} to be extracted on first use; "
            f"`torchvision.datasets.{tv_name}(root, download=True)` fetches it on "
            "a machine with internet access). Set data-dir to that directory."
        )
    out: list[Tensor] = []
    for train in (True, False):
        ds = cls(str(root), train=train)
        out += [
            torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(ds.targets, dtype=torch.long),
        ]
    return tuple(out)


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
    cache = _cache_dir() / "imagefolder" / f"{split_dir.name}-{key}.npz"
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


def _load_cinic10(data_dir: Path) -> tuple[Tensor, ...]:
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


@functools.lru_cache(maxsize=4)
def load_dataset(name: str, data_dir: str = "") -> RawDataset:
    """Load a whole dataset as ``uint8`` images (cached per process).

    Parameters
    ----------
    name : str
        A key of :data:`DATASETS`.
    data_dir : str
        Directory of the files; ``""`` for :func:`default_data_dir`.

    Returns
    -------
    RawDataset
        Training and test images (``uint8``) and labels (int64), with the
        dataset's :class:`DatasetInfo`. The same object is returned for the
        same arguments until :func:`clear_caches`.

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
        tensors = _load_fashion_mnist(path)
    elif name == "cinic10":
        tensors = _load_cinic10(path)
    else:
        tensors = _load_cifar(name, path)
    x_tr, y_tr, x_te, y_te = tensors
    for x in (x_tr, x_te):
        if len(x) and tuple(x.shape[1:]) != (info.channels, info.side, info.side):
            raise ValueError(
                f"{name}: images of shape {tuple(x.shape[1:])}, expected "
                f"{(info.channels, info.side, info.side)}"
            )
    return RawDataset(x_tr, y_tr, x_te, y_te, info)


def clear_caches() -> None:
    """Forget the datasets and partitions cached in this process."""
    load_dataset.cache_clear()
    _partitions.cache_clear()


def normalize(x: Tensor, info: DatasetInfo) -> Tensor:
    """Convert ``uint8`` images to float32, scaled to [0, 1] and standardised per channel.

    Computes ``(x / 255 - mean) / std`` with ``info``'s per-channel statistics.

    Parameters
    ----------
    x : Tensor
        Images ``N x C x H x W`` with values in ``[0, 255]``.
    info : DatasetInfo
        The dataset whose ``mean`` and ``std`` to use.

    Returns
    -------
    Tensor
        The normalised float32 images, same shape.
    """
    mean = torch.tensor(info.mean).view(1, -1, 1, 1)
    std = torch.tensor(info.std).view(1, -1, 1, 1)
    return (x.float() / 255.0 - mean) / std


# ---------------------------------------------------------------- augmentation
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
        """Build the augmentation with black padding in ``info``'s normalised units.

        Parameters
        ----------
        info : DatasetInfo
            The dataset; the fill is ``-mean / std`` per channel.
        padding : int
            Pixels of padding on each side.

        Returns
        -------
        RandomCropFlip
            The augmentation for ``info``'s normalised images.
        """
        return cls(padding, tuple(-m / s for m, s in zip(info.mean, info.std, strict=True)))

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Return a randomly cropped and flipped copy of a batch.

        Each sample is padded by ``padding`` pixels of ``fill``, cropped back to
        ``H x W`` at a uniform random offset and flipped horizontally with
        probability 1/2.

        Parameters
        ----------
        x : Tensor
            A batch of normalised images, ``N x C x H x W``.
        generator : torch.Generator, optional
            Source of the crop offsets and flips.

        Returns
        -------
        Tensor
            The augmented batch, same shape and dtype.
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


# ------------------------------------------------------------------ node data
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

    Returns
    -------
    ClientData
        The node's normalised training and test splits, with the dataset's
        number of classes and the training augmentation (or ``None``).

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

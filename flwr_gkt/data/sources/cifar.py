"""CIFAR-10 / CIFAR-100 from local files in torchvision's format.

``<dir>/cifar-10-batches-py`` (``data_batch_1..5``, ``test_batch``,
``batches.meta``) or ``<dir>/cifar-100-python`` (``train``, ``test``,
``meta``); the downloaded archive ``cifar-10-python.tar.gz`` /
``cifar-100-python.tar.gz`` lying in ``<dir>`` is extracted once, safely
(:func:`extract_tar`). Read with torchvision's ``CIFAR10`` / ``CIFAR100``
without their MD5 check, so that re-packed or test files load too; every
pickle goes through :class:`CifarUnpickler`, which cannot run code.
"""

from __future__ import annotations

import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets import CIFAR10, CIFAR100

from flwr_gkt.data.sources.files import DatasetMissingError


class CifarUnpickler(pickle.Unpickler):
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
        """Return the global ``module.name`` the pickle names if a NumPy array needs it.

        Raises
        ------
        pickle.UnpicklingError
            If the global is not one of the allowed ones.
        """
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}: refused")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> Any:
    with open(path, "rb") as f:
        return CifarUnpickler(f, encoding="latin1").load()


class _LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader: presence checks, and a restricted unpickler.

    MD5 checks against the published checksums would refuse a re-packed or
    generated copy; instead every pickle is read with
    :class:`CifarUnpickler`, which cannot run code.
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


def extract_tar(archive: Path, root: Path) -> None:
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


def load_cifar(name: str, data_dir: Path) -> tuple[Tensor, ...]:
    """Read CIFAR-10 or CIFAR-100 in torchvision's format from ``data_dir``.

    The archive lying in ``data_dir`` is extracted once (:func:`extract_tar`)
    when the batch folder is not there (``data_dir`` may be the batch folder
    itself). Returns ``x_train, y_train, x_test, y_test``: ``uint8`` images
    ``N x 3 x 32 x 32`` and int64 labels.

    Raises
    ------
    DatasetMissingError
        If the batch files are not found.
    tarfile.TarError
        If the archive holds anything but files and directories inside
        ``data_dir`` (see :func:`extract_tar`).
    pickle.UnpicklingError
        If a batch file names a global other than a NumPy array's (see
        :class:`CifarUnpickler`).
    """
    cls, title, folder, archive, tv_name = _CIFAR[name]
    root = data_dir.parent if data_dir.name == folder else data_dir
    if not (root / folder).is_dir() and (root / archive).is_file():
        extract_tar(root / archive, root)
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

"""Partitions of a labelled dataset across nodes, reproducible by seed.

The splitting itself is done by flwr-datasets' partitioners
(:class:`flwr_datasets.partitioner.IidPartitioner` and
:class:`~flwr_datasets.partitioner.DirichletPartitioner`), applied to a
one-column ``datasets.Dataset`` of the labels: our images are local tensors
(not Hugging Face datasets), so the partitioners see only the labels and hand
back sample indices.

``dirichlet`` is the reference implementation's "hetero" setting: for every
class, the share of each node is drawn from ``Dir(alpha)``; a node that already
holds more than the average number of samples gets no more
(``self_balancing``); draws are repeated until every node has at least
``min_partition_size`` samples.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

__all__ = [
    "add_held_out_arguments",
    "held_out_indices",
    "held_out_options",
    "held_out_sample",
    "label_counts",
    "label_matched_split",
    "partition_indices",
]

#: The built-in partition schemes (the ``partition`` config key).
PARTITIONS = ("iid", "dirichlet")


def _subset(
    num_samples: int, fraction: float, minimum: int, rng: np.random.Generator
) -> np.ndarray:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    perm = rng.permutation(num_samples)
    return perm[: max(minimum, round(num_samples * fraction))]


def held_out_indices(
    num_samples: int, num_partitions: int, *, seed: int = 0, fraction: float = 1.0
) -> np.ndarray:
    """Return the indices :func:`partition_indices` leaves out with the same ``seed`` and ``fraction``.

    With ``fraction < 1`` the nodes share a random subset of the samples; the
    rest can serve as public data the nodes never see (e.g. to pre-train an
    EcoFed extractor). The indices are sorted; empty when ``fraction`` is 1.

    Raises
    ------
    ValueError
        If ``fraction`` is not in ``(0, 1]``.
    """
    used = _subset(num_samples, fraction, num_partitions, np.random.default_rng(seed))
    return np.setdiff1d(np.arange(num_samples), used)


def held_out_sample(
    num_samples: int,
    num_partitions: int,
    samples: int,
    *,
    seed: int = 0,
    fraction: float = 1.0,
    stream: int = 0,
) -> np.ndarray:
    """Draw up to ``samples`` distinct random indices of :func:`held_out_indices`, in random order.

    The draw uses seed ``seed + stream``, so different users of the held-out
    data get different samples.

    Raises
    ------
    ValueError
        If nothing is held out (``fraction`` 1), or ``fraction`` is not in
        ``(0, 1]``.
    """
    held_out = held_out_indices(num_samples, num_partitions, seed=seed, fraction=fraction)
    if len(held_out) == 0:
        raise ValueError(
            "no held-out samples: the federation uses the whole training set "
            "(pre-train with a data-fraction below 1)"
        )
    return np.random.default_rng(seed + stream).permutation(held_out)[:samples]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str = "iid",
    *,
    seed: int = 0,
    fraction: float = 1.0,
    alpha: float = 0.5,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Split ``fraction`` of the samples into ``num_partitions`` index arrays.

    Parameters
    ----------
    labels : np.ndarray
        Label of every sample of the dataset.
    num_partitions : int
        Number of nodes.
    method : str
        ``"iid"`` (equal random parts) or ``"dirichlet"`` (label skew).
    seed : int
        Same seed, same partitions.
    fraction : float
        Share of the dataset used; a random subset drawn first.
    alpha : float
        Dirichlet concentration (smaller: more skew).
    min_partition_size : int
        Dirichlet: every node gets at least this many samples.

    Returns
    -------
    list[np.ndarray]
        Disjoint int64 index arrays into ``labels``, one per node; each in a fixed
        (shuffled) order, the sample order node and server agree on.

    Raises
    ------
    ValueError
        If ``num_partitions < 1``, ``method`` is unknown, ``fraction`` is not in
        ``(0, 1]``, or (Dirichlet) the used samples cannot give every node
        ``min_partition_size`` samples.
    """
    if num_partitions < 1:
        raise ValueError("num_partitions must be >= 1")
    if method not in PARTITIONS:
        raise ValueError(f"unknown partition {method!r}; expected one of {PARTITIONS}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    used = _subset(len(labels), fraction, num_partitions, rng)

    from datasets import Dataset  # imported here: pulls in pyarrow
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    table = Dataset.from_dict({"label": labels[used].tolist(), "row": np.arange(len(used))})
    if method == "iid":
        partitioner = IidPartitioner(num_partitions)
    else:
        if min_partition_size * num_partitions > len(used):
            raise ValueError(
                f"dirichlet: {len(used)} samples cannot give {num_partitions} nodes "
                f"{min_partition_size} samples each; lower min-partition-size or raise data-fraction"
            )
        partitioner = DirichletPartitioner(
            num_partitions,
            "label",
            alpha,
            min_partition_size=min_partition_size,
            self_balancing=True,
            shuffle=True,
            seed=int(rng.integers(2**31)),
        )
    partitioner.dataset = table
    return [
        used[np.asarray(partitioner.load_partition(i)["row"], dtype=np.int64)]
        for i in range(num_partitions)
    ]


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Return ``counts[c]``, the number of samples with label ``c`` (length ``num_classes``)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def label_matched_split(
    pool_labels: np.ndarray,
    reference_labels: np.ndarray,
    size: int,
    num_classes: int,
    *,
    seed: int = 0,
) -> np.ndarray:
    """Draw ``size`` samples of a pool with the class mix of ``reference_labels``.

    Used for local test splits under label skew: a node is evaluated on test
    samples distributed like its own training data. Classes are drawn without
    replacement within one call (different nodes may share test samples).

    Parameters
    ----------
    pool_labels : np.ndarray
        Labels of the pool to draw from (e.g. the whole test set).
    reference_labels : np.ndarray
        Labels whose class proportions the draw follows (the node's training
        labels).
    size : int
        Number of samples wanted; class quotas are ``floor(share * size)``,
        the remainder going to the classes with the largest fractional parts.
    num_classes : int
        Number of classes.
    seed : int
        Seed of the draw.

    Returns
    -------
    np.ndarray
        Shuffled int64 indices into ``pool_labels``; fewer than ``size`` when
        the pool has too few samples of a class.
    """
    rng = np.random.default_rng(seed)
    pool_labels = np.asarray(pool_labels)
    share = label_counts(reference_labels, num_classes) / max(len(reference_labels), 1)
    wanted = np.floor(share * size).astype(int)
    # Hand the remainder to the classes with the largest fractional parts.
    rest = size - int(wanted.sum())
    if rest > 0:
        wanted[np.argsort(-(share * size - wanted), kind="stable")[:rest]] += 1
    picked = []
    for cls in np.nonzero(wanted)[0]:
        candidates = np.nonzero(pool_labels == cls)[0]
        picked.append(
            rng.choice(candidates, size=min(int(wanted[cls]), len(candidates)), replace=False)
        )
    out = np.concatenate(picked) if picked else np.empty(0, dtype=np.int64)
    return rng.permutation(out).astype(np.int64)


def add_held_out_arguments(parser: argparse.ArgumentParser, what: str, epochs: int) -> None:
    """Add the options shared by the commands that pre-train on held-out samples.

    ``--out``, ``--dataset``, ``--data-dir``, the federation's ``--fraction`` /
    ``--num-partitions`` / ``--seed`` (whose samples are left out),
    ``--samples``, ``--epochs`` (default ``epochs``) and ``--device``; ``what``
    is what ``--out`` receives, for its help text (e.g. ``"the weights"``).
    """
    parser.add_argument("--out", required=True, help=f"where to write {what} (.pt)")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--data-dir", default="")
    parser.add_argument(
        "--fraction", type=float, default=0.5, help="the federation's data-fraction"
    )
    parser.add_argument(
        "--num-partitions", type=int, default=4, help="the federation's num-clients"
    )
    parser.add_argument("--seed", type=int, default=0, help="the federation's seed")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--device", default="auto")


def held_out_options(args: argparse.Namespace) -> dict[str, Any]:
    """Return a pre-training function's keyword arguments from :func:`add_held_out_arguments`' options."""
    keys = "dataset data_dir fraction num_partitions seed samples epochs device".split()
    return {key: getattr(args, key) for key in keys}

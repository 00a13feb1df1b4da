"""Nodes bring their own data: FedGKT over datasets streamed in batches.

A node's data does not have to be a tensor in memory. The project's ClientApp
takes, through its ``data_fn`` hook (:func:`flwr_gkt.app.client_app.make_client_app`),
a :class:`flwr_gkt.data.DatasetData` wrapping any map-style dataset -- a
Hugging Face ``datasets.Dataset`` with a transform, such as a partition of
flwr-datasets' ``FederatedDataset``, or any ``torch.utils.data.Dataset``
returning ``(image, label)`` -- and the edge reads it a batch at a time
through a ``DataLoader``. This script

1. builds a ``FederatedDataset``-style dataset offline: a random subset of the
   local Fashion-MNIST files (:func:`flwr_gkt.data.load_dataset`) as a
   ``datasets.Dataset`` with an ``image`` column of PIL images and a ``label``
   column, the layout of ``zalando-datasets/fashion_mnist`` on the Hugging Face
   Hub;
2. partitions it with a flwr-datasets partitioner (``--partitioner iid`` or
   ``dirichlet``), the test subset IID;
3. gives each node its partition, either (``--source hf``) as the Hugging Face
   partition with ``with_transform`` (PIL image -> normalised float tensor;
   ``--flip`` adds a random horizontal flip to the training view) or
   (``--source torch``) read by a plain ``torch.utils.data.Dataset`` class of
   the node's own;
4. runs FedGKT in this process (``run`` of ``examples/_common.py``): the
   project's ServerApp logic (:func:`flwr_gkt.app.server_app.run_fedgkt`,
   unchanged) against the project's ClientApp, whose ``data_fn`` returns each
   node's ``DatasetData``.

On a real SuperNode with internet access the partition would come from the
Hub, the rest unchanged::

    fds = FederatedDataset(dataset="zalando-datasets/fashion_mnist",
                           partitioners={"train": DirichletPartitioner(10, "label", alpha=0.5)})
    train = fds.load_partition(partition_id).with_transform(train_transform)

Run it from the repository root::

    .venv/bin/python examples/own_dataset.py                        # 3 nodes, IID: ~1-2 min
    .venv/bin/python examples/own_dataset.py --partitioner dirichlet --alpha 0.5 --flip
    .venv/bin/python examples/own_dataset.py --source torch --workers 2
    .venv/bin/python examples/own_dataset.py --tiny                 # ~20 s (CI)

The last line of the output is ``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import argparse
from typing import Any

import _common
import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features, Image
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from PIL import Image as PILImage

from flwr_gkt.data import DatasetData, DatasetInfo, RawDataset, load_dataset


# ----------------------------------------------------------------- data
def to_hf_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    """``uint8`` images ``N x 1 x 28 x 28`` -> a ``datasets.Dataset`` as on the Hub (PIL images)."""
    features = Features({"image": Image(), "label": ClassLabel(num_classes=10)})
    pil = [PILImage.fromarray(a) for a in images[:, 0].numpy()]
    return Dataset.from_dict({"image": pil, "label": labels.numpy()}, features=features)


def to_tensor(image: Any, info: DatasetInfo) -> torch.Tensor:
    """A PIL / ``uint8`` image -> a normalised float ``1 x H x W`` tensor."""
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).unsqueeze(0)
    return (x - info.mean[0]) / info.std[0]


def hf_transform(info: DatasetInfo, flip: bool):
    """A ``with_transform`` function: batches of PIL images -> normalised tensors.

    With ``flip``, each image is flipped horizontally with probability 1/2,
    afresh every time it is read: a random transform inside the dataset. The
    edge still distils sample ``i`` from the server's row ``i`` (the loader
    carries each sample's index; see :mod:`flwr_gkt.data.streaming`).
    """

    def transform(batch: dict[str, list]) -> dict[str, list]:
        images = [to_tensor(im, info) for im in batch["image"]]
        if flip:
            images = [x.flip(-1) if torch.rand(()) < 0.5 else x for x in images]
        return {"image": images, "label": batch["label"]}

    return transform


class LocalImages(torch.utils.data.Dataset):
    """A node's own map-style torch dataset: its images, decoded and normalised on read.

    A stand-in for whatever a device keeps (files on disk, a database, ...):
    only ``__len__`` and ``__getitem__(i) -> (float image, label)`` matter, in
    a stable order.
    """

    def __init__(self, part: Dataset, info: DatasetInfo, flip: bool = False) -> None:
        self.part, self.info, self.flip = part, info, flip

    def __len__(self) -> int:
        return len(self.part)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        row = self.part[i]
        x = to_tensor(row["image"], self.info)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, int(row["label"])


def make_partitioner(args: argparse.Namespace) -> Partitioner:
    if args.partitioner == "dirichlet":
        return DirichletPartitioner(
            args.num_nodes,
            "label",
            alpha=args.alpha,
            min_partition_size=10,
            self_balancing=True,
            seed=args.seed,
        )
    return IidPartitioner(args.num_nodes)


def node_datasets(
    raw: RawDataset, args: argparse.Namespace
) -> tuple[list[DatasetData], list[list[int]]]:
    """Every node's :class:`DatasetData` (its partitions, never turned into one tensor)
    and its training labels in dataset order (read from the label column)."""
    partitioner, test_partitioner = _common.subset_partitioners(
        raw, args, make_partitioner(args), to_hf_dataset
    )

    info, nodes, labels = raw.info, [], []
    for pid in range(args.num_nodes):
        part, test_part = partitioner.load_partition(pid), test_partitioner.load_partition(pid)
        labels.append([int(y) for y in part["label"]])  # no transform set yet: the column as is
        if args.source == "hf":  # the HF partitions themselves, with a transform
            train_view = part.with_transform(hf_transform(info, args.flip))
            plain = part.with_transform(hf_transform(info, flip=False))
            test_view = test_part.with_transform(hf_transform(info, flip=False))
        else:  # the node's own torch Dataset class
            train_view = LocalImages(part, info, args.flip)
            plain, test_view = LocalImages(part, info), LocalImages(test_part, info)
        nodes.append(
            DatasetData(
                train_view,
                test_view,
                num_classes=info.num_classes,
                # the same samples without the random flip, for replay rounds
                plain_train=plain if args.flip else None,
                num_workers=args.workers,
            )
        )
    return nodes, labels


# ----------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--source",
            choices=("hf", "torch"),
            default="hf",
            help="hf: the HF partitions with a transform; torch: a torch Dataset class",
        )
        parser.add_argument("--partitioner", choices=("iid", "dirichlet"), default="iid")
        parser.add_argument("--alpha", type=float, default=0.5, help="dirichlet concentration")
        parser.add_argument("--num-nodes", type=int, default=3)
        parser.add_argument(
            "--train-size", type=int, default=3000, help="training images, all nodes"
        )
        parser.add_argument("--test-size", type=int, default=1000, help="test images, all nodes")
        parser.add_argument(
            "--flip", action="store_true", help="random horizontal flip in training"
        )
        parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per node")

    return _common.parse_args(
        __doc__,
        "3 nodes, 450 training images, 2 rounds",
        add_arguments,
        {"train_size": 450, "test_size": 150, "rounds": 2, "server_epochs": 1},
        argv,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    raw = load_dataset("fashion-mnist")  # offline, cached per process
    nodes, labels = node_datasets(raw, args)

    counts = [np.bincount(y, minlength=10).tolist() for y in labels]
    print(f"\n{args.partitioner} partitions ({args.source} datasets): label counts per node")
    for pid, row in enumerate(counts):
        print(f"{pid:>4}  " + " ".join(f"{v:>5}" for v in row) + f"   {sum(row):>5}")
    print(flush=True)

    # Server-side settings from the `smoke` preset; its data keys are unused:
    # the nodes' data comes from data_fn.
    cfg = _common.smoke_config(args, **{"run-name": f"own-dataset-{args.source}"})
    strategy = _common.run(cfg, nodes)
    # What the server holds of each node (node ids 1001, 1002, ... are partitions
    # 0, 1, ...): its labels, in the order of the node's dataset.
    labels_in_order = all(
        strategy.server.store[nid].labels.tolist() == y
        for nid, y in zip(sorted(strategy.server.store), labels, strict=True)
    )
    result = {
        "source": args.source,
        "partitioner": args.partitioner,
        "flip": args.flip,
        "nodes": args.num_nodes,
        "label-counts": counts,
        "labels-in-order": labels_in_order,
        **_common.history_result(strategy.history),
    }
    return _common.report(result)


if __name__ == "__main__":
    main()

"""Run FedGKT on partitions made by flwr-datasets partitioners.

The built-in configs offer ``partition: iid`` and ``partition: dirichlet``.
Any other split -- one of the partitioners of ``flwr_datasets.partitioner``
or your own -- plugs into the project's ClientApp through its ``data_fn``
hook (:func:`flwr_gkt.app.client_app.make_client_app`): this script

1. loads Fashion-MNIST offline with the project's loader
   (:func:`flwr_gkt.data.load_dataset`, from ``/usr/share/datasets/fashion-mnist``)
   and turns a random subset of it into a Hugging Face ``datasets.Dataset``
   (columns ``image`` and ``label``);
2. partitions it with a flwr-datasets partitioner chosen by ``--partitioner``
   (``pathological``: each node holds ``--classes-per-node`` classes;
   ``shard``: label-sorted shards, ``--shards-per-node`` each; ``dirichlet``:
   label skew with ``--alpha``; ``iid``) and prints every node's label counts;
3. runs FedGKT in this process (``run`` of ``examples/_common.py``): the
   project's ServerApp logic (:func:`flwr_gkt.app.server_app.run_fedgkt`,
   unchanged) and the project's ClientApp whose ``data_fn`` hands each node
   its partition.

Evaluation (``--test-split``): ``global`` splits a test subset IID across the
nodes, so the example-weighted accuracy is the accuracy on that whole subset;
``local`` gives each node test images with its own training label mix
(:func:`flwr_gkt.data.partition.label_matched_split`), i.e. personalised accuracy.
Under extreme skew (``pathological``, ``shard``) expect a low *global*
accuracy: each node's extractor has only ever seen its own few classes, and
the server has only seen each node's feature maps of those classes.

Run it from the repository root::

    .venv/bin/python examples/flwr_datasets_partitioners.py                       # dirichlet(0.5), 5 nodes: ~1-2 min
    .venv/bin/python examples/flwr_datasets_partitioners.py --partitioner pathological --test-split local
    .venv/bin/python examples/flwr_datasets_partitioners.py --partitioner shard --shards-per-node 3
    .venv/bin/python examples/flwr_datasets_partitioners.py --tiny --partitioner pathological   # ~10 s (CI)

The last line of the output is ``RESULT {...}`` (JSON).
"""

from __future__ import annotations

import argparse

import _common
import numpy as np
import torch
from datasets import Array3D, ClassLabel, Dataset, Features
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    IidPartitioner,
    Partitioner,
    PathologicalPartitioner,
    ShardPartitioner,
)

from flwr_gkt.data import ClientData, RawDataset, load_dataset, normalize
from flwr_gkt.data.partition import label_matched_split

CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


# ----------------------------------------------------------------- data
def to_hf_dataset(images: torch.Tensor, labels: torch.Tensor) -> Dataset:
    """``uint8`` images ``N x 1 x 28 x 28`` and labels -> a ``datasets.Dataset``."""
    features = Features(
        {
            "image": Array3D(shape=tuple(images.shape[1:]), dtype="uint8"),
            "label": ClassLabel(names=CLASSES),
        }
    )
    return Dataset.from_dict({"image": images.numpy(), "label": labels.numpy()}, features=features)


def make_partitioner(args: argparse.Namespace) -> Partitioner:
    """The flwr-datasets partitioner of ``--partitioner`` (all split by the ``label`` column)."""
    n = args.num_nodes
    if args.partitioner == "pathological":
        # "first-deterministic": node i's first class is class i (so with as many
        # nodes as classes every class is used), the others are drawn at random.
        return PathologicalPartitioner(
            n,
            "label",
            num_classes_per_partition=args.classes_per_node,
            class_assignment_mode="first-deterministic",
            seed=args.seed,
        )
    if args.partitioner == "shard":
        return ShardPartitioner(
            n, "label", num_shards_per_partition=args.shards_per_node, seed=args.seed
        )
    if args.partitioner == "dirichlet":
        return DirichletPartitioner(
            n, "label", alpha=args.alpha, min_partition_size=10, self_balancing=True, seed=args.seed
        )
    return IidPartitioner(n)


def load_partition(
    partitioner: Partitioner, partition_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One partition as ``(uint8 images, int64 labels)`` tensors."""
    part = partitioner.load_partition(partition_id).with_format("numpy")[:]
    images = torch.from_numpy(np.asarray(part["image"], dtype=np.uint8))
    return images, torch.from_numpy(np.asarray(part["label"], dtype=np.int64))


def node_datasets(raw: RawDataset, args: argparse.Namespace) -> list[ClientData]:
    """Every node's :class:`ClientData`: its partition of the training subset and its test images."""
    partitioner, test_partitioner = _common.subset_partitioners(
        raw, args, make_partitioner(args), to_hf_dataset
    )

    nodes = []
    for pid in range(args.num_nodes):
        x_train, y_train = load_partition(partitioner, pid)
        if args.test_split == "global":
            x_test, y_test = load_partition(test_partitioner, pid)
        else:  # "local": test images drawn with this node's training label mix
            idx = label_matched_split(
                raw.y_test.numpy(),
                y_train.numpy(),
                args.test_size // args.num_nodes,
                raw.info.num_classes,
                seed=args.seed + pid,
            )
            x_test, y_test = raw.x_test[idx], raw.y_test[idx]
        # What the library's edge code trains on: normalised float32 images.
        nodes.append(
            ClientData(
                normalize(x_train, raw.info),
                y_train,
                normalize(x_test, raw.info),
                y_test,
                num_classes=raw.info.num_classes,
            )
        )
    return nodes


# ----------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--partitioner",
            choices=("pathological", "shard", "dirichlet", "iid"),
            default="dirichlet",
        )
        parser.add_argument("--num-nodes", type=int, default=5)
        parser.add_argument("--classes-per-node", type=int, default=2, help="pathological")
        parser.add_argument("--shards-per-node", type=int, default=2, help="shard")
        parser.add_argument("--alpha", type=float, default=0.5, help="dirichlet concentration")
        parser.add_argument(
            "--train-size", type=int, default=3000, help="training images, all nodes"
        )
        parser.add_argument("--test-size", type=int, default=1000, help="test images, all nodes")
        parser.add_argument(
            "--test-split",
            choices=("global", "local"),
            default="global",
            help="global: IID shares of one test subset; local: each node's own label mix",
        )

    return _common.parse_args(
        __doc__,
        "3 nodes, 450 training images, 2 rounds",
        add_arguments,
        {"num_nodes": 3, "train_size": 450, "test_size": 150, "rounds": 2, "server_epochs": 1},
        argv,
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    raw = load_dataset("fashion-mnist")  # offline, cached per process
    nodes = node_datasets(raw, args)

    counts = [np.bincount(d.y_train.numpy(), minlength=10).tolist() for d in nodes]
    test_counts = [np.bincount(d.y_test.numpy(), minlength=10).tolist() for d in nodes]
    print(f"\n{args.partitioner} partitions: training label counts per node")
    print("node  " + " ".join(f"{c:>5}" for c in range(10)) + "   total")
    for pid, row in enumerate(counts):
        print(f"{pid:>4}  " + " ".join(f"{v:>5}" for v in row) + f"   {sum(row):>5}")
    print(flush=True)

    # Server-side settings from the `smoke` preset; the data keys (data-fraction,
    # partition, ...) are unused: the nodes' data comes from the partitioner.
    cfg = _common.smoke_config(args, **{"run-name": f"partitioner-{args.partitioner}"})
    history = _common.run(cfg, nodes).history
    result = {
        "partitioner": args.partitioner,
        "nodes": args.num_nodes,
        "label-counts": counts,
        "test-split": args.test_split,
        "test-label-counts": test_counts,
        **_common.history_result(history),
    }
    return _common.report(result)


if __name__ == "__main__":
    main()

"""What the example scripts share: their command line, run config and in-process run.

Not an example itself: each script here imports it (``python
examples/<script>.py`` puts this folder first on ``sys.path``).

- :func:`parse_args`: ``--tiny`` (CI sizes, explicit flags still win), the
  script's own arguments, then ``--rounds``, ``--server-epochs``, ``--seed``,
  ``--results-dir`` and ``--set KEY=VALUE``;
- :func:`smoke_config`: the run config, the ``smoke`` preset
  (``flwr_gkt/app/presets/smoke.yaml``) with those on top;
- :func:`run`: the project's ServerApp logic against its ClientApp, in this
  process;
- :func:`subset_partitioners`: the data subsets of the partitioning examples;
- :func:`history_result` and :func:`report`: the ``RESULT {...}`` line (JSON)
  the tests read.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flwr_gkt.app.client_app import make_client_app
from flwr_gkt.app.inprocess import run_inprocess
from flwr_gkt.app.server_app import run_fedgkt
from flwr_gkt.app.task import PRESETS_DIR, NodeSetup
from flwr_gkt.config import RunConfig, add_override_argument, parse_overrides, resolve_config
from flwr_gkt.data import NodeData, RawDataset
from flwr_gkt.flower.strategy import FedGKT

if TYPE_CHECKING:
    from flwr_datasets.partitioner import Partitioner


def parse_args(
    description: str,
    tiny_help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    tiny_defaults: dict[str, Any],
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """Parse an example's command line (``tiny_help``: what ``--tiny`` sets, in words)."""
    tiny = argparse.ArgumentParser(add_help=False)
    tiny.add_argument(
        "--tiny", action="store_true", help=f"CI size: {tiny_help} (explicit flags still win)"
    )
    parser = argparse.ArgumentParser(
        description=description,
        parents=[tiny],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", default="results/examples")
    add_override_argument(
        parser,
        "any other config key (flwr_gkt.config.RunConfig), as in `python -m simulation --set`",
    )
    if tiny.parse_known_args(argv)[0].tiny:
        parser.set_defaults(**tiny_defaults)
    return parser.parse_args(argv)


def smoke_config(args: argparse.Namespace, **keys: Any) -> RunConfig:
    """The ``smoke`` preset with the common arguments and ``keys`` on top, ``--set`` last.

    The same keys as ``python -m simulation --set ...``; no ``checkpoint.pt``
    after every round.
    """
    return resolve_config(
        {
            "preset": "smoke",
            "num-clients": args.num_nodes,
            "num-server-rounds": args.rounds,
            "server-epochs": args.server_epochs,
            "seed": args.seed,
            "results-dir": args.results_dir,
            "checkpoint": 0,
            **keys,
            **parse_overrides(args.overrides),  # --set KEY=VALUE: last, wins
        },
        PRESETS_DIR,
    )


def run(cfg: RunConfig, nodes: Sequence[NodeData] | None = None) -> FedGKT:
    """Run the project's ServerApp logic against its ClientApp in this process.

    With ``nodes``, node ``i`` trains on ``nodes[i]`` instead of its partition
    of the configured dataset. Returns the strategy (``history``: one dict per
    round, as in ``results.json``).
    """
    done: dict[str, FedGKT] = {}

    def server_main(grid, context) -> None:
        # What the ServerApp's main does: build the server model and FedGKT from
        # cfg, run the rounds, write results.json / metrics.csv / metrics.png.
        # The server never sees the nodes' data, only their feature maps.
        done["strategy"] = run_fedgkt(grid, cfg)

    if nodes is None:
        run_inprocess(server_main, make_client_app(cfg), cfg.num_clients)
        return done["strategy"]

    # The project's ClientApp, with our data instead of the configured
    # `partition` scheme: data_fn gets each node's setup (partition id, number
    # of partitions, config). On a real SuperNode it would load its own
    # partition here, e.g. `partitioner.load_partition(node.partition_id)`.
    def data_fn(node: NodeSetup) -> NodeData:
        return nodes[node.partition_id]

    run_inprocess(server_main, make_client_app(cfg, data_fn=data_fn), len(nodes))
    return done["strategy"]


def subset_partitioners(
    raw: RawDataset,
    args: argparse.Namespace,
    partitioner: Partitioner,
    to_dataset: Callable[[torch.Tensor, torch.Tensor], Any],
) -> tuple[Partitioner, Partitioner]:
    """Random ``--train-size`` / ``--test-size`` subsets (``--seed``) of ``raw``, partitioned.

    Each subset becomes a Hugging Face dataset (``to_dataset(images,
    labels)``); the training one goes to ``partitioner``, the test one to an
    IID partitioner of ``--num-nodes`` partitions. Returns both partitioners.
    """
    from flwr_datasets.partitioner import IidPartitioner  # only the partitioning examples

    rng = np.random.default_rng(args.seed)
    train = torch.from_numpy(rng.permutation(len(raw.y_train))[: args.train_size])
    test = torch.from_numpy(rng.permutation(len(raw.y_test))[: args.test_size])
    partitioner.dataset = to_dataset(raw.x_train[train], raw.y_train[train])
    test_partitioner = IidPartitioner(args.num_nodes)
    test_partitioner.dataset = to_dataset(raw.x_test[test], raw.y_test[test])
    return partitioner, test_partitioner


def history_result(history: Sequence[dict[str, float]]) -> dict[str, Any]:
    """The RESULT entries of a run's history: rounds, replies per round, final accuracies."""
    final = history[-1]
    return {
        "rounds": len(history),
        "nodes-replied": [int(row["nodes-replied"]) for row in history],
        "accuracy": round(final["accuracy"], 4),
        "edge-accuracy": round(final["edge-accuracy"], 4),
        "test-examples": int(final["num-examples"]),
    }


def report(result: dict[str, Any]) -> dict[str, Any]:
    """Print ``result`` as the last line, ``RESULT {...}`` (JSON); return it."""
    print("RESULT " + json.dumps(result), flush=True)
    return result

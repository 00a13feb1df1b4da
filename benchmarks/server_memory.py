"""Benchmark: peak server memory with and without the feature store's memory budget.

``python benchmarks/server_memory.py [--budget-mb 64 --ratios 2,4 --nodes 16 --per-round 4]``

Runs the real strategy path (``FedGKT.configure_train`` -> replies encoded
with the wire format -> ``aggregate_train``: decode, validate, store, train the
server model on every stored node's features) for as many rounds as it takes
for every node to have replied once: ``--per-round`` nodes reply per round
(client sampling), so the store grows round by round to the whole dataset,
``ratio x budget`` bytes of 16x28x28 float32 features. Each configuration runs
in a fresh process; the script prints the process's peak RSS (``ru_maxrss``)
above its baseline (model built, one warm-up step done), next to the budget.

With the budget, the store keeps at most ``budget`` bytes in memory and
streams the rest from disk: the peak should be the budget plus a fixed
overhead (one round's replies in flight, a mini-batch, the optimizer), the
same whatever the dataset size. Without it, the peak grows with the dataset.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_MB = 1024 * 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    import os

    return pages * os.sysconf("SC_PAGE_SIZE") / _MB


def child(args: argparse.Namespace) -> dict:
    """One configuration, in this process; returns the measurements."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from flwr_gkt.core.registry import build_server_model
    from flwr_gkt.core.server import GKTServer
    from flwr_gkt.flower.options import SamplingOptions
    from flwr_gkt.flower.strategy import FedGKT
    from flwr_gkt.wire import ARRAYS_KEY, METRICS_KEY, Payload, encode_payload, metrics_record

    class Grid:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

        def get_node_ids(self) -> list[int]:
            return list(self.ids)

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(args.threads)
    side, classes = 28, 10
    row = 16 * side * side * 4
    dataset_bytes = (
        int(args.ratio * args.budget_mb * _MB) if args.ratio else int(args.dataset_mb * _MB)
    )
    per_node = max(1, dataset_bytes // row // args.nodes)
    budget = int(args.budget_mb * _MB) if args.budget_mb > 0 else None
    spill = tempfile.mkdtemp(prefix="gkt-bench-spill-")
    torch.manual_seed(0)
    server = GKTServer(
        build_server_model(args.server_model, classes, 16),
        epochs=args.epochs,
        batch_size=args.batch_size,
        device="cpu",
        memory_budget=budget,
        spill_dir=spill,
    )
    strategy = FedGKT(
        server,
        classes,
        feature_shape=(16, side, side),
        sampling=SamplingOptions(
            min_train_nodes=args.per_round, min_available_nodes=args.per_round
        ),
    )
    # Warm-up: one training step on a tiny payload, then forget it.
    g = torch.Generator().manual_seed(1)
    server.put(
        -1,
        Payload(
            torch.randn(args.batch_size, 16, side, side, generator=g),
            torch.randint(0, classes, (args.batch_size,), generator=g),
        ),
    )
    server.train_round()
    server.evict(before_round=1)
    base = _rss_mb()
    start = time.perf_counter()
    nodes = list(range(1, args.nodes + 1))
    for rnd, first in enumerate(range(0, len(nodes), args.per_round), start=1):
        group = nodes[first : first + args.per_round]
        instructions = strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), Grid(group))
        replies = []
        for msg in instructions:
            feats = torch.relu(torch.randn(per_node, 16, side, side, generator=g))
            labels = torch.randint(0, classes, (per_node,), generator=g)
            logits = torch.randn(per_node, classes, generator=g)
            content = RecordDict(
                {
                    ARRAYS_KEY: encode_payload(feats, labels, logits),
                    METRICS_KEY: metrics_record(per_node),
                }
            )
            del feats
            replies.append(Message(content=content, reply_to=msg))
        del instructions
        strategy.aggregate_train(rnd, replies)
        del replies
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    last = strategy.history[-1]
    server.store.close()
    return {
        "budget-mb": args.budget_mb,
        "dataset-mb": per_node * args.nodes * row / _MB,
        "samples": per_node * args.nodes,
        "reply-mb": per_node * row / _MB,
        "base-rss-mb": base,
        "peak-rss-mb": peak,
        "peak-above-base-mb": peak - base,
        "store-memory-mb": last["store-memory-mb"],
        "store-disk-mb": last["store-disk-mb"],
        "trained-samples-last-round": last["server-train-examples"],
        "seconds": seconds,
    }


def run_child(argv: list[str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *argv], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    budget_mb: float,
    ratios: list[float],
    nodes: int = 16,
    per_round: int = 4,
    server_model: str = "resnet10",
    epochs: int = 1,
) -> list[dict]:
    """Peak RSS without the budget (largest dataset) and with it (each ratio)."""
    common = [
        "--nodes",
        str(nodes),
        "--per-round",
        str(per_round),
        "--server-model",
        server_model,
        "--epochs",
        str(epochs),
    ]
    biggest = max(ratios) * budget_mb
    results = [
        run_child([*common, "--budget-mb", "0", "--dataset-mb", str(biggest), "--ratio", "0"])
    ]
    for ratio in ratios:
        results.append(run_child([*common, "--budget-mb", str(budget_mb), "--ratio", str(ratio)]))
    return results


def print_table(results: list[dict]) -> None:
    print(
        f"{'budget MB':>10} {'dataset MB':>11} {'one reply MB':>13} {'peak RSS above base MB':>23} "
        f"{'store RAM MB':>13} {'store disk MB':>14} {'time s':>7}"
    )
    for r in results:
        budget = f"{r['budget-mb']:.0f}" if r["budget-mb"] > 0 else "none"
        print(
            f"{budget:>10} {r['dataset-mb']:>11.0f} {r['reply-mb']:>13.0f} {r['peak-above-base-mb']:>23.0f} "
            f"{r['store-memory-mb']:>13.0f} {r['store-disk-mb']:>14.0f} {r['seconds']:>7.1f}"
        )
    budgeted = [r for r in results if r["budget-mb"] > 0]
    for r in budgeted:
        overhead = r["peak-above-base-mb"] - r["budget-mb"]
        print(
            f"dataset {r['dataset-mb'] / r['budget-mb']:.0f}x the budget: peak - base = budget + "
            f"{overhead:.0f} MB ({overhead / r['reply-mb']:.1f} replies' worth of overhead)"
        )
    unbounded = [r for r in results if r["budget-mb"] <= 0]
    if unbounded and budgeted:
        print(
            f"peak RSS above base, no budget / with budget at the same dataset size = "
            f"{unbounded[0]['peak-above-base-mb'] / budgeted[-1]['peak-above-base-mb']:.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--budget-mb", type=float, default=64)
    parser.add_argument("--ratios", default="2,4", help="dataset sizes as multiples of the budget")
    parser.add_argument("--ratio", type=float, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--dataset-mb", type=float, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, default=16)
    parser.add_argument("--per-round", type=int, default=4, help="nodes replying per round")
    parser.add_argument("--server-model", default="resnet10")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    ratios = [float(r) for r in args.ratios.split(",")]
    print(
        f"server {args.server_model}, {args.nodes} nodes, {args.per_round} replying per round, "
        f"16x28x28 float32 features, E_s={args.epochs}"
    )
    print_table(
        measure(args.budget_mb, ratios, args.nodes, args.per_round, args.server_model, args.epochs)
    )


if __name__ == "__main__":
    main()

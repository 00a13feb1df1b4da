"""Benchmark: server-side training of one round inside the strategy vs a plain loop.

``python benchmarks/server_overhead.py [--nodes 4 --samples 1000 --server-model resnet10 --epochs 1]``

Times ``FedGKT.aggregate_train`` -- decode and validate every node's reply,
store the payloads, train the server model ``E_s`` epochs on all features
(CE + KD), capture the per-sample server logits, return the weights -- against
a plain PyTorch loop that trains the same server model (same initial weights,
same optimizer, same batch size, same memory format) on the same feature
tensors with the same loss. Prints both times and the overhead ratio
(goal: <= 1.05). Repetitions alternate between the two to share any drift of
the machine; the medians are compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flwr_gkt.core.registry import build_server_model
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import get_device, make_optimizer, prepare_model, to_device
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.wire import ARRAYS_KEY, METRICS_KEY, encode_payload, metrics_record


class _Grid:
    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def _data(nodes: int, samples: int, side: int, classes: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(nodes):
        feats = torch.relu(torch.randn(samples, 16, side, side, generator=g))
        labels = torch.randint(0, classes, (samples,), generator=g)
        logits = torch.randn(samples, classes, generator=g)
        out.append((feats, labels, logits))
    return out


def time_strategy(model, data, args, device: str) -> float:
    """Seconds of ``aggregate_train`` for one round (replies already received)."""
    server = GKTServer(
        copy.deepcopy(model),
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer="adam",
        lr=1e-3,
        temperature=3.0,
        alpha=1.0,
        kd_mode="both",
        device=device,
        seed=0,
    )
    strategy = FedGKT(server, args.classes, feature_shape=(16, args.side, args.side))
    node_ids = list(range(1, len(data) + 1))
    instructions = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(node_ids)))
    replies = []
    for msg, (feats, labels, logits) in zip(instructions, data, strict=True):
        content = RecordDict(
            {
                ARRAYS_KEY: encode_payload(feats, labels, logits),
                METRICS_KEY: metrics_record(len(labels)),
            }
        )
        replies.append(Message(content=content, reply_to=msg))
    start = time.perf_counter()
    arrays, _ = strategy.aggregate_train(1, replies)
    elapsed = time.perf_counter() - start
    assert arrays is not None and strategy.history[-1]["nodes-replied"] == len(data)
    return elapsed


def time_plain(model, data, args, device: str) -> float:
    """Seconds of a textbook PyTorch loop over the same tensors."""
    dev = get_device(device)
    model = prepare_model(copy.deepcopy(model), dev)
    optimizer = make_optimizer("adam", model.parameters(), 1e-3)
    feats = torch.cat([d[0] for d in data])
    labels = torch.cat([d[1] for d in data])
    teacher = torch.cat([d[2] for d in data])
    g = torch.Generator().manual_seed(0)
    t = 3.0
    start = time.perf_counter()
    model.train()
    for _ in range(args.epochs):
        order = torch.randperm(len(labels), generator=g)
        for i in range(0, len(labels), args.batch_size):
            idx = order[i : i + args.batch_size]
            x, y, z = to_device(feats[idx], dev), labels[idx].to(dev), teacher[idx].to(dev)
            out = model(x)
            kd = (
                F.kl_div(
                    F.log_softmax(out / t, 1),
                    F.log_softmax(z / t, 1),
                    reduction="batchmean",
                    log_target=True,
                )
                * t
                * t
            )
            loss = F.cross_entropy(out, y) + kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--samples", type=int, default=1000, help="samples per node")
    parser.add_argument(
        "--side", type=int, default=28, help="feature map side (28 Fashion-MNIST, 32 CIFAR)"
    )
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--server-model", default="resnet10")
    parser.add_argument("--epochs", type=int, default=1, help="server epochs E_s")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    torch.manual_seed(0)
    model = build_server_model(args.server_model, args.classes, 16)
    data = _data(args.nodes, args.samples, args.side, args.classes, seed=1)
    n = args.nodes * args.samples
    print(
        f"server {args.server_model} on {get_device(args.device)}, {args.nodes} nodes x {args.samples} "
        f"samples of 16x{args.side}x{args.side}, E_s={args.epochs}, batch {args.batch_size}, "
        f"{torch.get_num_threads()} threads"
    )
    time_strategy(model, data, args, args.device)  # warm-up (allocator, kernels)
    time_plain(model, data, args, args.device)
    strat, plain = [], []
    for rep in range(args.repeats):
        strat.append(time_strategy(model, data, args, args.device))
        plain.append(time_plain(model, data, args, args.device))
        print(f"  repeat {rep + 1}: strategy {strat[-1]:.2f}s, plain loop {plain[-1]:.2f}s")
    s, p = statistics.median(strat), statistics.median(plain)
    print(f"strategy aggregate_train: {s:.2f}s ({n * args.epochs / s:.0f} samples/s)")
    print(f"plain PyTorch loop:       {p:.2f}s ({n * args.epochs / p:.0f} samples/s)")
    print(f"overhead ratio strategy / plain = {s / p:.3f} (goal <= 1.05)")


if __name__ == "__main__":
    main()

"""Benchmark: how many of the default run's edge features float16 would change.

``python benchmarks/float16_features.py [--preset fmnist --node 0 --set k=v ...]``

Trains one node of the preset for one round as the project does (its edge
model, ``E_c`` epochs, its precision: bf16 on a CPU that runs it), extracts
its training and test features, and counts the values that float16 changes
and by how much: what ``feature-dtype: auto`` checks before it sends a
reply as float16 (``flwr_gkt.wire.resolve_feature_dtype``). Prints the codec
``auto`` picks for each split.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    """Train and extract one node; print what float16 changes in its features."""
    from flwr_gkt.app.task import (
        config_from_run_config,
        edge_builder,
        edge_config,
        load_client_data,
    )
    from flwr_gkt.config import parse_overrides
    from flwr_gkt.core.edge import extract, train_edge
    from flwr_gkt.core.training import get_device, resolve_precision
    from flwr_gkt.wire import FLOAT16_TOLERANCE, resolve_feature_dtype

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="fmnist")
    parser.add_argument("--node", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    cfg = config_from_run_config({"preset": args.preset, **parse_overrides(args.set)})
    device = get_device(cfg.device)
    precision = resolve_precision(device, cfg.edge_precision)
    start = time.perf_counter()
    data = load_client_data(cfg, args.node, cfg.num_clients)
    model = edge_builder(cfg, args.node)().to(device)
    edge = replace(edge_config(cfg), precision=precision)
    train_edge(
        model, data.x_train, data.y_train, None, edge, device, torch.Generator().manual_seed(0)
    )
    print(f"node {args.node} of {cfg.num_clients}, edge {cfg.edge_model}, precision {precision}")
    for split, x in (("train", data.x_train), ("test", data.x_test)):
        h, _ = extract(model, x, cfg.batch_size, device, precision=precision)
        moved = (h.half().float() - h).abs()
        changed = int((moved > 0).sum())
        print(
            f"{split}: {h.numel():,} values, {changed:,} changed by float16 "
            f"({100 * changed / h.numel():.5f} %), largest change {float(moved.max()):.3g} "
            f"(tolerance {FLOAT16_TOLERANCE:.3g}), largest |value| {float(h.abs().max()):.4g}; "
            f"auto sends {resolve_feature_dtype('auto', h)}"
        )
    print(f"{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

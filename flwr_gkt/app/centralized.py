"""Table 1's centralized baselines: one model trained on the pooled partitions.

``python -m simulation --algorithm centralized --set centralized-model=full``
trains the full model (edge stem + server body, FedAvg's model) or, with
``centralized-model=edge``, the edge model alone on the union of the
federation's training partitions, for as many epochs as a node sees in the
federated runs (``num-server-rounds`` x ``edge-epochs``), with the edge
training settings. It is evaluated after every round's worth of epochs on the
same test samples as the federated runs and writes the same files
(``metrics.csv``, ``results.json``, ``metrics.png``). No Flower: nothing is
communicated.
"""

from __future__ import annotations

import time

import torch

from flwr_gkt.config import RunConfig
from flwr_gkt.core.centralized import CentralizedConfig, train_centralized
from flwr_gkt.core.training import get_device, prepare_model
from flwr_gkt.data import client_data

from .task import (
    build_full,
    edge_builder,
    load_client_data,
    pooled_training_data,
    results_dir,
    write_results,
)


def test_data(cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The test samples the federated runs evaluate on (each once)."""
    if cfg.test_split == "local":
        parts = [load_client_data(cfg, i, cfg.num_clients) for i in range(cfg.num_clients)]
        return torch.cat([p.x_test for p in parts]), torch.cat([p.y_test for p in parts])
    # global and whole both cover the test-fraction subset (once)
    data = client_data(
        0,
        1,
        dataset=cfg.dataset,
        data_dir=cfg.data_dir,
        fraction=cfg.data_fraction,
        test_fraction=cfg.test_fraction,
        test_split="whole",
        seed=cfg.seed,
    )
    return data.x_test, data.y_test


def run_centralized(cfg: RunConfig) -> list[dict[str, float]]:
    """Train the ``centralized-model`` on the pooled data; write the run's results."""
    if cfg.centralized_model == "full":
        model = build_full(cfg)
    elif cfg.centralized_model == "edge":
        model = edge_builder(cfg, 0)()
    else:
        raise ValueError(
            f"unknown centralized-model {cfg.centralized_model!r} (expected 'full' or 'edge')"
        )
    if cfg.client_threads > 0:
        torch.set_num_threads(max(cfg.client_threads, cfg.server_threads))
    device = get_device(cfg.device)
    model = prepare_model(model, device)
    train = pooled_training_data(cfg)
    test = test_data(cfg)
    augment = load_client_data(cfg, 0, cfg.num_clients).augment
    settings = CentralizedConfig(
        rounds=cfg.num_server_rounds,
        epochs_per_round=cfg.edge_epochs,
        batch_size=cfg.batch_size,
        optimizer=cfg.edge_optimizer,
        lr=cfg.edge_lr,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        plateau_factor=cfg.plateau_factor,
        plateau_patience=cfg.plateau_patience,
        seed=cfg.seed,
    )
    run_start = time.perf_counter()

    def progress(row: dict[str, float]) -> None:
        print(
            f"Centralized ({cfg.centralized_model}) round {int(row['round'])} eval: accuracy "
            f"{row['accuracy']:.4f}, loss {row['loss']:.4f} on {len(test[1])} test samples "
            f"[{time.perf_counter() - run_start:.0f}s]",
            flush=True,
        )

    history = train_centralized(model, train, test, settings, device, augment, progress)
    out = results_dir(cfg)
    write_results(
        out,
        cfg,
        history,
        {
            "algorithm": f"centralized-{cfg.centralized_model}",
            "seconds": time.perf_counter() - run_start,
            "final": history[-1] if history else {},
            "train-samples": len(train[1]),
        },
    )
    return history

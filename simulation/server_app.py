"""ServerApp: trains the large server model with the FedGKT strategy."""

from __future__ import annotations

import time
from logging import INFO

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_gkt.config import RunConfig
from flwr_gkt.edge import EdgeRoundConfig
from flwr_gkt.losses import KDMode
from flwr_gkt.server import GKTServer
from flwr_gkt.strategy import FedGKT

from .task import build_server, config_from_run_config, dataset_info, feature_shape, results_dir, write_results


def run_fedgkt(grid: Grid, cfg: RunConfig) -> FedGKT:
    """Run ``cfg.num_server_rounds`` rounds of FedGKT on ``grid``; write results."""
    if cfg.server_threads > 0:
        torch.set_num_threads(cfg.server_threads)
    num_classes, _, _ = dataset_info(cfg)
    kd_mode = KDMode(cfg.kd_mode)
    server = GKTServer(
        build_server(cfg),
        epochs=cfg.server_epochs,
        batch_size=cfg.server_batch_size,
        optimizer=cfg.server_optimizer,
        lr=cfg.server_lr,
        weight_decay=cfg.weight_decay,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        kd_mode=kd_mode,
        device=cfg.device,
        seed=cfg.seed,
    )
    strategy = FedGKT(
        server,
        num_classes,
        feature_shape=feature_shape(cfg),
        edge_config=EdgeRoundConfig(
            epochs=cfg.edge_epochs,
            batch_size=cfg.batch_size,
            optimizer=cfg.edge_optimizer,
            lr=cfg.edge_lr,
            weight_decay=cfg.weight_decay,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            kd_mode=kd_mode,
        ),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=cfg.min_nodes,
        feature_dtype=cfg.feature_dtype,
        lr_schedule=cfg.lr_schedule,
        seed=cfg.seed,
    )
    out = results_dir(cfg)
    log(INFO, "FedGKT: results go to %s", out)
    start = time.perf_counter()
    strategy.start(grid=grid, initial_arrays=strategy.initial_arrays(), num_rounds=cfg.num_server_rounds)
    elapsed = time.perf_counter() - start
    final = strategy.history[-1] if strategy.history else {}
    torch.save(server.model.state_dict(), out / "server_model.pt")
    write_results(out, cfg, strategy.history, {"seconds": elapsed, "final": final})
    log(
        INFO,
        "FedGKT finished %d rounds in %.1fs: accuracy %.4f (edge+server), edge-only %.4f; results in %s",
        cfg.num_server_rounds, elapsed, final.get("accuracy", float("nan")),
        final.get("edge-accuracy", float("nan")), out,
    )
    return strategy


def make_server_app(fixed: RunConfig | None = None) -> ServerApp:
    """Build the ServerApp; ``fixed`` replaces the Flower run config when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedgkt(grid, fixed or config_from_run_config(context.run_config))

    return app


app = make_server_app()

"""The same FedGKT run through Flower's legacy API: ``server_fn`` + ``NumPyClient``.

``FedGKTLegacy`` is a thin adapter over the server logic of the Message API
strategy; prefer ``simulation.server_app`` / ``simulation.client_app``.
"""

from __future__ import annotations

import dataclasses
import functools

from flwr.app import Context
from flwr.client import Client, ClientApp
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from flwr_gkt.config import RunConfig
from flwr_gkt.flower.legacy import FedGKTLegacy, GKTNumPyClient

from .task import (
    build_server,
    config_from_run_config,
    dataset_info,
    edge_builder,
    edge_config,
    feature_shape,
    make_gkt_server,
    node_data,
    results_dir,
    write_results,
)


class _RecordingFedGKTLegacy(FedGKTLegacy):
    """Writes metrics.csv / results.json after every evaluated round."""

    def __init__(self, *args, cfg: RunConfig, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cfg = cfg
        self.out = results_dir(cfg)

    def aggregate_evaluate(self, server_round, results, failures):
        out = super().aggregate_evaluate(server_round, results, failures)
        write_results(self.out, self.cfg, self.history, {"api": "legacy"})
        return out


def make_legacy_apps(fixed: RunConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """Build the legacy ServerApp and ClientApp."""

    def server_fn(context: Context) -> ServerAppComponents:
        cfg = fixed or config_from_run_config(context.run_config)
        strategy = _RecordingFedGKTLegacy(
            make_gkt_server(cfg),
            dataset_info(cfg)[0],
            feature_shape=feature_shape(cfg),
            edge_config=edge_config(cfg),
            min_fit_clients=cfg.min_nodes,
            min_evaluate_clients=cfg.min_nodes,
            min_available_clients=cfg.min_nodes,
            lr_schedule=cfg.lr_schedule,
            num_rounds=cfg.num_server_rounds,
            cfg=cfg,
        )
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=cfg.num_server_rounds)
        )

    def client_fn(context: Context) -> Client:
        cfg = fixed or config_from_run_config(context.run_config)
        node, data = node_data(cfg, context.node_config, fixed is not None)
        return GKTNumPyClient(
            context,
            data,
            edge_builder(dataclasses.replace(cfg, edge_model=node.edge_model), node.partition_id),
            functools.partial(build_server, cfg),
            cfg.device,
        ).to_client()

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


server_app, client_app = make_legacy_apps()

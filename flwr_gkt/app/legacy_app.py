"""The same FedGKT run through Flower's legacy API: ``server_fn`` + ``NumPyClient``.

``FedGKTLegacy`` is a thin adapter over the server logic of the Message API
strategy; prefer ``flwr_gkt.app.server_app`` / ``flwr_gkt.app.client_app``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from flwr.app import Context
from flwr.client import Client, ClientApp
from flwr.common import EvaluateRes, Scalar
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.client_proxy import ClientProxy

from flwr_gkt.config import RunConfig
from flwr_gkt.core.server import GKTServer
from flwr_gkt.flower.legacy import FedGKTLegacy, GKTNumPyClient
from flwr_gkt.flower.strategy_utils import call_on_round
from flwr_gkt.flower.tensorboard import open_tensorboard

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
    run_config_trusted,
    write_results,
)


class _RecordingFedGKTLegacy(FedGKTLegacy):
    """Writes metrics.csv / results.json (and TensorBoard) after every evaluated round."""

    def __init__(
        self, server: GKTServer, num_classes: int, *, cfg: RunConfig, **kwargs: Any
    ) -> None:
        super().__init__(server, num_classes, **kwargs)
        self.cfg = cfg
        self.out = results_dir(cfg)
        self.on_round = open_tensorboard(cfg.tensorboard_dir, self.out.name, cfg.to_dict())

    def aggregate_evaluate(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, EvaluateRes]],
        failures: list[tuple[ClientProxy, EvaluateRes] | BaseException],
    ) -> tuple[float | None, dict[str, Scalar]]:
        out = super().aggregate_evaluate(server_round, results, failures)
        write_results(self.out, self.cfg, self.history, {"api": "legacy"})
        call_on_round(self.on_round, self.history, (), server_round)
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
        strategy.gate.max_abs_value = cfg.max_abs_value
        return ServerAppComponents(
            strategy=strategy, config=ServerConfig(num_rounds=cfg.num_server_rounds)
        )

    def client_fn(context: Context) -> Client:
        cfg = fixed or config_from_run_config(context.run_config)
        node, data = node_data(cfg, context.node_config, run_config_trusted(fixed))
        return GKTNumPyClient(
            context,
            data,
            edge_builder(
                dataclasses.replace(cfg, edge_model=node.edge_model),
                node.partition_id,
                cfg.edge_model,
            ),
            functools.partial(build_server, cfg),
            cfg.device,
        ).to_client()

    return ServerApp(server_fn=server_fn), ClientApp(client_fn=client_fn)


# Module-level components (flwr run), one per assignment: Flower finds them statically.
_apps = make_legacy_apps()
server_app = _apps[0]
client_app = _apps[1]

"""The same FedGKT run through Flower's legacy API: ``server_fn`` + ``NumPyClient``.

``FedGKTLegacy`` drives the Message API strategy :class:`~flwr_gkt.flower.strategy.FedGKT`;
prefer ``flwr_gkt.app.server_app`` / ``flwr_gkt.app.client_app``.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

from flwr.app import Context
from flwr.client import Client, ClientApp
from flwr.server import ServerApp, ServerAppComponents, ServerConfig

from flwr_gkt.config import RunConfig
from flwr_gkt.flower.legacy import FedGKTLegacy, GKTNumPyClient
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.flower.tensorboard import open_tensorboard

from .server_app import build_strategy
from .task import (
    build_server,
    config_from_run_config,
    edge_builder,
    make_gkt_server,
    node_data,
    results_dir,
    run_config_trusted,
    write_results,
)


class _RecordingFedGKTLegacy(FedGKTLegacy):
    """Writes metrics.csv / nodes.csv / results.json after every round."""

    def __init__(self, strategy: FedGKT, cfg: RunConfig, out: Path) -> None:
        super().__init__(strategy, cfg.num_server_rounds)
        self.cfg = cfg
        self.out = out

    def round_done(self, server_round: int) -> None:
        write_results(
            self.out, self.cfg, self.history, {"api": "legacy"}, nodes=self.strategy.node_history
        )
        super().round_done(server_round)


def make_legacy_apps(fixed: RunConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """Build the legacy ServerApp and ClientApp.

    The server drives the FedGKT of :func:`flwr_gkt.app.server_app.build_strategy`
    (every run setting). Checkpoints are FedGKT's round loop's: the legacy run
    writes none, and ``resume`` and ``server-mode async`` are refused.
    """

    def server_fn(context: Context) -> ServerAppComponents:
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.resume:
            raise ValueError("resume needs the Message API ServerApp (flwr_gkt.app.server_app)")
        cfg = dataclasses.replace(cfg, checkpoint=0)
        out = results_dir(cfg)
        tensorboard = open_tensorboard(cfg.tensorboard_dir, out.name, cfg.to_dict())
        strategy = build_strategy(cfg, make_gkt_server(cfg), out, tensorboard)
        return ServerAppComponents(
            strategy=_RecordingFedGKTLegacy(strategy, cfg, out),
            config=ServerConfig(num_rounds=cfg.num_server_rounds),
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

"""ClientApp: the edge node of FedGKT (ResNet-8 on local Fashion-MNIST data)."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_gkt.client_app import handle_evaluate, handle_train
from flwr_gkt.config import RunConfig

from .task import config_from_run_config, edge_builder, load_client_data


def make_client_app(fixed: RunConfig | None = None) -> ClientApp:
    """Build the ClientApp; ``fixed`` replaces the Flower run config when given."""
    app = ClientApp()

    def setup(context: Context):
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.client_threads > 0:
            torch.set_num_threads(cfg.client_threads)
        pid = int(context.node_config["partition-id"])
        num = int(context.node_config["num-partitions"])
        return cfg, load_client_data(cfg, pid, num), edge_builder(cfg, pid)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data, build = setup(context)
        return handle_train(msg, context, data, build, cfg.device)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, data, build = setup(context)
        return handle_evaluate(msg, context, data, build, cfg.device)

    return app


app = make_client_app()

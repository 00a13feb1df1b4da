"""ClientApp: the edge node of FedGKT (ResNet-8 on its local data, by default).

The node's data, partition, state directory and edge model come from its node
config (see :class:`flwr_gkt.app.task.NodeSetup`; the edge model by default from
the run config's ``edge-models`` / ``edge-model``), the training settings from
the server's instructions and the run config.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from flwr_gkt.config import RunConfig
from flwr_gkt.core.models import EdgeModel
from flwr_gkt.data import NodeData
from flwr_gkt.flower.client_app import handle_evaluate, handle_query, handle_train

from .task import (
    NodeSetup,
    config_from_run_config,
    edge_builder,
    node_data,
    node_setup,
    run_config_trusted,
)


def make_client_app(
    fixed: RunConfig | None = None,
    data_fn: Callable[[NodeSetup], NodeData] | None = None,
) -> ClientApp:
    """Build the FedGKT ClientApp.

    Parameters
    ----------
    fixed : RunConfig | None
        Replaces the Flower run config when given; it is then trusted to set the
        nodes' own settings too (state, data dir, pre-trained weights, privacy;
        see :class:`flwr_gkt.app.task.NodeSetup`).
    data_fn : Callable[[NodeSetup], NodeData] | None
        Builds a node's data from its setup (``partition_id``,
        ``num_partitions``, resolved config) instead of the configured
        ``partition`` scheme, e.g. with a flwr-datasets partitioner
        (``examples/flwr_datasets_partitioners.py``): a ``ClientData`` of
        tensors, or a ``DatasetData`` of map-style datasets streamed in
        batches (``examples/own_dataset.py``). Called on every message;
        cache inside it. State directory, privacy and node uid work as usual.

    Returns
    -------
    ClientApp
        The app with ``train``, ``evaluate`` and ``query`` handlers.
    """
    app = ClientApp()
    # A config fixed by the local process is the node's own; Flower's run config
    # (flwr run, a SuperNode) is the server's and does not decide node-side settings,
    # unless this machine runs the whole federation (run_config_trusted).

    def setup(context: Context) -> tuple[NodeSetup, NodeData, Callable[[], EdgeModel]]:
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.client_threads > 0:
            torch.set_num_threads(cfg.client_threads)
        trusted = run_config_trusted(fixed)
        data: NodeData
        if data_fn is None:
            node, data = node_data(cfg, context.node_config, trusted)
        else:
            node = node_setup(cfg, context.node_config, trusted)
            data = data_fn(node)
        return node, data, edge_builder(node.cfg, node.partition_id, cfg.edge_model)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node, data, build = setup(context)
        return handle_train(
            msg,
            context,
            data,
            build,
            node.cfg.device,
            node.state_dir or None,
            node.privacy,
            node.uid,
            node.edge_model,
        )

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node, data, build = setup(context)
        return handle_evaluate(
            msg, context, data, build, node.cfg.device, node.state_dir or None, node.privacy
        )

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = fixed or config_from_run_config(context.run_config)
        node = node_setup(cfg, context.node_config, run_config_trusted(fixed))
        return handle_query(msg, context, node.uid, node.state_dir or None)

    return app


app = make_client_app()

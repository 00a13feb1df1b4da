"""Split-learning baselines: vanilla SL and SplitFed V1 / V2 (``split-mode``).

The same split as FedGKT: the nodes hold the edge extractor (``edge-model``'s
``f_e``, initialised as FedGKT's: ``edge-init``, ``edge-pretrained``), the
server the ``server-model`` on its feature maps, the same partitions and the
same test splits; activations travel as ``feature-dtype``, gradients as
``gradient-dtype``, one wave of messages per mini-batch
(:class:`flwr_gkt.flower.split_strategy.SplitLearning`). Results are written
like a FedGKT run's (``metrics.csv``, ``results.json`` with the analytic
per-epoch costs of :func:`flwr_gkt.core.efficiency.communication_costs`,
``metrics.png``, ``nodes.csv``).

``python -m simulation --algorithm sl|splitfed-v1|splitfed-v2`` runs them;
for a deployment, point the app's components at ``flwr_gkt.app.split_app:server_app``
and ``flwr_gkt.app.split_app:client_app`` and choose the mode with ``split-mode``
(``python -m deploy.loopback --algorithm sl`` does both; ``docs/split-learning.md``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from logging import INFO

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_gkt.config import RunConfig
from flwr_gkt.core.efficiency import communication_costs, state_bytes
from flwr_gkt.data import ClientData
from flwr_gkt.flower.split_client import handle_split_evaluate, handle_split_train
from flwr_gkt.flower.split_strategy import SplitLearning

from .task import (
    NodeSetup,
    build_full,
    build_server,
    config_from_run_config,
    dataset_info,
    edge_builder,
    feature_shape,
    node_data,
    results_dir,
    write_results,
)


def _extractor_builder(cfg: RunConfig, partition_id: int) -> Callable[[], torch.nn.Module]:
    """Builds the node's extractor ``f_e``, trainable (split learning trains it end to end)."""
    build = edge_builder(dataclasses.replace(cfg, freeze_extractor=0), partition_id)

    def extractor() -> torch.nn.Module:
        return build().extractor

    return extractor


def analytic_costs(cfg: RunConfig, num_samples: int) -> dict[str, float]:
    """The analytic bytes per epoch of this run's algorithm (see ``communication_costs``)."""
    num_classes, _, _ = dataset_info(cfg)
    return communication_costs(
        num_samples=num_samples,
        activation_numel=int(torch.Size(feature_shape(cfg)).numel()),
        num_classes=num_classes,
        num_nodes=cfg.num_clients,
        edge_state_bytes=state_bytes(_extractor_builder(cfg, 0)()),
        full_state_bytes=state_bytes(build_full(cfg)),
        feature_dtype=cfg.feature_dtype,
        gradient_dtype=cfg.gradient_dtype,
        logit_dtype=cfg.logit_dtype,
    )


def run_split(grid: Grid, cfg: RunConfig) -> SplitLearning:
    """Run ``cfg.num_server_rounds`` rounds of ``cfg.split_mode``; write the results."""
    out = results_dir(cfg)
    num_classes, _, _ = dataset_info(cfg)
    strategy = SplitLearning(
        build_server(cfg),
        _extractor_builder(cfg, 0)(),
        num_classes,
        feature_shape(cfg),
        mode=cfg.split_mode,
        epochs=cfg.edge_epochs,
        batch_size=cfg.batch_size,
        edge_optimizer=cfg.edge_optimizer,
        edge_lr=cfg.edge_lr,
        server_optimizer=cfg.server_optimizer,
        server_lr=cfg.server_lr,
        weight_decay=cfg.weight_decay,
        lr_schedule=cfg.lr_schedule,
        feature_dtype=cfg.feature_dtype,
        gradient_dtype=cfg.gradient_dtype,
        device=cfg.device,
        precision=cfg.server_precision,
        seed=cfg.seed,
        min_nodes=cfg.min_nodes,
        node_wait_timeout=cfg.node_wait_timeout,
        max_payload_bytes=int(cfg.max_payload_mb * 1024 * 1024) or None,
        max_samples=cfg.max_samples or None,
        eval_batch_size=cfg.server_batch_size,
        outlier_threshold=cfg.outlier_threshold,
        max_weight_change=cfg.max_weight_change or None,
    )
    strategy.gate.max_abs_value = cfg.max_abs_value
    start = time.perf_counter()
    strategy.start(grid, num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout)
    elapsed = time.perf_counter() - start
    torch.save(strategy.model.state_dict(), out / "server_model.pt")
    torch.save(strategy.edge_state, out / "edge_extractor.pt")
    final = strategy.history[-1] if strategy.history else {}
    samples = max((int(r.get("server-train-examples", 0)) for r in strategy.history), default=0)
    write_results(
        out,
        cfg,
        strategy.history,
        {
            "algorithm": cfg.split_mode,
            "seconds": elapsed,
            "final": final,
            "analytic": analytic_costs(cfg, samples // max(cfg.edge_epochs, 1)),
        },
        nodes=strategy.node_history,
    )
    log(
        INFO,
        "%s finished %d rounds in %.1fs: accuracy %.4f; results in %s",
        cfg.split_mode,
        cfg.num_server_rounds,
        elapsed,
        final.get("accuracy", float("nan")),
        out,
    )
    return strategy


def make_split_apps(fixed: RunConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """The split-learning ServerApp and ClientApp; ``fixed`` replaces the Flower run config."""
    server, client = ServerApp(), ClientApp()
    trusted = fixed is not None

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_split(grid, fixed or config_from_run_config(context.run_config))

    def setup(context: Context) -> tuple[NodeSetup, ClientData, Callable[[], torch.nn.Module]]:
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.client_threads > 0:
            torch.set_num_threads(cfg.client_threads)
        node, data = node_data(cfg, context.node_config, trusted)
        return node, data, _extractor_builder(node.cfg, node.partition_id)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        node, data, build = setup(context)
        return handle_split_train(msg, context, data, build, node.cfg.device)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        node, data, build = setup(context)
        return handle_split_evaluate(msg, data, build, node.cfg.device)

    return server, client


# Module-level components (flwr run), one per assignment: Flower finds them statically.
_apps = make_split_apps()
server_app = _apps[0]
client_app = _apps[1]

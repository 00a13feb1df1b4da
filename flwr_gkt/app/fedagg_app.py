"""FedAgg / FedEEC apps: the cloud ServerApp and the end-device / edge ClientApp.

The federation has ``num-clients`` end devices -- holding exactly the data
partitions FedGKT and FedAvg nodes hold with the same config -- and
``fedagg-edges`` edge servers (``0``: end devices directly under the cloud).
Roles come from the node config: explicit ``tier`` / ``parent`` / ``node-uid``
(deployment), or, in simulation, from the partition id: ids ``0 ..
num-clients - 1`` are end devices ``end-<j>`` holding partition ``j`` under
``edge-<j mod fedagg-edges>``, the next ``fedagg-edges`` ids are the edges.
Every node loads the frozen bridge autoencoder from ``bridge-autoencoder``
(``python -m flwr_gkt.data.bridge --out FILE``).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_gkt.config import RunConfig
from flwr_gkt.core.bridge import BridgeAutoencoder
from flwr_gkt.core.fedagg import BSBODPConfig
from flwr_gkt.core.registry import build_tier_model
from flwr_gkt.data import ClientData, load_dataset, normalize
from flwr_gkt.data.bridge import load_autoencoder
from flwr_gkt.flower.fedagg_client import TierRole, handle_fedagg, handle_topology_query
from flwr_gkt.flower.fedagg_strategy import FedAgg, parse_migrations
from flwr_gkt.flower.tensorboard import open_tensorboard

from .task import config_from_run_config, dataset_info, load_client_data, results_dir, write_results


@functools.lru_cache(maxsize=4)
def _autoencoder(path: str, dataset: str) -> BridgeAutoencoder:
    if not path:
        raise ValueError(
            "FedAgg needs bridge-autoencoder: a file made by `python -m flwr_gkt.data.bridge --out FILE`"
        )
    return load_autoencoder(path, dataset)


def tier_role(cfg: RunConfig, node_config: Mapping[str, Any]) -> tuple[TierRole, int, int]:
    """This node's role and data partition ``(partition-id, num-partitions)``; ``-1``: no data (an edge)."""
    pid = int(node_config.get("partition-id", 0))
    if "tier" in node_config:  # deployment: everything explicit
        tier = str(node_config["tier"])
        role = TierRole(
            str(node_config.get("node-uid", f"{tier}-{pid}")),
            tier,
            str(node_config.get("parent", "cloud")),
        )
        return role, (pid if tier == "end" else -1), int(node_config.get("num-partitions", 1))
    edges = cfg.fedagg_edges
    if pid < cfg.num_clients:
        return (
            TierRole(f"end-{pid}", "end", f"edge-{pid % edges}" if edges else "cloud"),
            pid,
            cfg.num_clients,
        )
    return TierRole(f"edge-{pid - cfg.num_clients}", "edge", "cloud"), -1, cfg.num_clients


def bsbodp(cfg: RunConfig) -> BSBODPConfig:
    return BSBODPConfig(
        temperature=cfg.temperature,
        beta=cfg.fedagg_beta,
        gamma=cfg.fedagg_gamma,
        batch_size=cfg.batch_size,
        optimizer=cfg.edge_optimizer,
        lr=cfg.edge_lr,
        weight_decay=0.0,
        epochs=cfg.edge_epochs,
    )


def _tier_model(cfg: RunConfig, tier: str) -> Callable[[], torch.nn.Module]:
    num_classes, channels, _ = dataset_info(cfg)
    name = {"end": cfg.end_model, "edge": cfg.edge_tier_model, "cloud": cfg.cloud_model}[tier]

    def build() -> torch.nn.Module:
        torch.manual_seed(cfg.seed)
        return build_tier_model(name, num_classes, channels)

    return build


def run_fedagg(grid: Grid, cfg: RunConfig) -> FedAgg:
    """Run FedAgg as the cloud; write the results like a FedGKT run."""
    out = results_dir(cfg)
    tensorboard = open_tensorboard(cfg.tensorboard_dir, out.name, cfg.to_dict())
    num_classes, _, _ = dataset_info(cfg)
    raw = load_dataset(cfg.dataset, cfg.data_dir)
    n_test = max(1, int(len(raw.y_test) * cfg.test_fraction))
    test_idx = torch.randperm(len(raw.y_test), generator=torch.Generator().manual_seed(cfg.seed))[
        :n_test
    ]
    strategy = FedAgg(
        _tier_model(cfg, "cloud")(),
        _autoencoder(cfg.bridge_autoencoder, cfg.dataset),
        num_classes,
        normalize(raw.x_test[test_idx], raw.info),
        raw.y_test[test_idx],
        bsbodp=bsbodp(cfg),
        rectify=cfg.rectify,
        migrations=parse_migrations(cfg.fedagg_migrate),
        logit_dtype=cfg.logit_dtype,
        device=cfg.device,
        seed=cfg.seed,
        max_payload_bytes=int(cfg.max_payload_mb * 1024 * 1024) or None,
        max_samples=cfg.max_samples or None,
        on_round=tensorboard,
    )
    strategy.gate.max_abs_value = cfg.max_abs_value
    start = time.perf_counter()
    try:
        strategy.start(grid, num_rounds=cfg.num_server_rounds, timeout=cfg.round_timeout)
    finally:
        if tensorboard is not None:
            tensorboard.close()
    elapsed = time.perf_counter() - start
    torch.save(strategy.model.state_dict(), out / "cloud_model.pt")
    final = strategy.history[-1] if strategy.history else {}
    write_results(
        out,
        cfg,
        strategy.history,
        {
            "algorithm": "fedagg-rectify" if cfg.rectify != "none" else "fedagg",
            "seconds": elapsed,
            "final": final,
            "migrations": [list(m) for m in strategy.moves],
        },
        nodes=strategy.node_history,
    )
    log(
        INFO,
        "FedAgg finished: cloud accuracy %.4f; results in %s",
        final.get("accuracy", float("nan")),
        out,
    )
    return strategy


def make_fedagg_apps(fixed: RunConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """The cloud ServerApp and the node ClientApp; ``fixed`` replaces the Flower run config."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedagg(grid, fixed or config_from_run_config(context.run_config))

    def setup(context: Context) -> tuple[RunConfig, TierRole, ClientData | None]:
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.client_threads > 0:
            torch.set_num_threads(cfg.client_threads)
        role, partition, num_partitions = tier_role(cfg, context.node_config)
        data = load_client_data(cfg, partition, num_partitions) if partition >= 0 else None
        return cfg, role, data

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        _, role, _ = setup(context)
        return handle_topology_query(msg, role)

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, role, data = setup(context)
        return handle_fedagg(
            msg,
            context,
            role,
            _autoencoder(cfg.bridge_autoencoder, cfg.dataset),
            _tier_model(cfg, role.tier),
            data,
            cfg.device,
        )

    return server, client


# Module-level components (flwr run), one per assignment: Flower finds them statically.
_apps = make_fedagg_apps()
server_app = _apps[0]
client_app = _apps[1]

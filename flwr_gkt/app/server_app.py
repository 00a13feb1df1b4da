"""ServerApp: trains the large server model with the FedGKT strategy."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from flwr_gkt.config import RunConfig
from flwr_gkt.core.server import GKTServer
from flwr_gkt.core.training import Plateau
from flwr_gkt.flower.async_strategy import AsyncFedGKT
from flwr_gkt.flower.faults import FaultPlan, FaultyGrid
from flwr_gkt.flower.options import (
    AsyncOptions,
    SamplingOptions,
    ScheduleOptions,
    TrustOptions,
    WireOptions,
)
from flwr_gkt.flower.strategy import FedGKT
from flwr_gkt.flower.strategy_utils import RoundCallback
from flwr_gkt.flower.tensorboard import open_tensorboard

from .task import (
    config_from_run_config,
    dataset_info,
    edge_config,
    feature_shape,
    federation_edge_models,
    make_gkt_server,
    memory_figures,
    peak_rss_mb,
    results_dir,
    write_results,
)

#: The checkpoint written after every round in the run's results directory.
CHECKPOINT_FILE = "checkpoint.pt"


def strategy_class(cfg: RunConfig) -> tuple[type[FedGKT], dict[str, Any]]:
    """The strategy of ``cfg.server_mode`` and its own arguments.

    ``sync``: :class:`FedGKT`; ``async``: :class:`AsyncFedGKT` with
    ``max-staleness`` (a negative value, the default: no bound; with ``K``
    nodes of similar speed a reply is typically ``K - 1`` updates stale) and
    ``async-update`` (``store``: each update draws from every node's stored
    features; ``node``: the replying node's features only).
    """
    if cfg.server_mode == "sync":
        return FedGKT, {}
    if cfg.server_mode == "async":
        staleness = cfg.max_staleness if cfg.max_staleness >= 0 else None
        return AsyncFedGKT, {"asynchronous": AsyncOptions(staleness, cfg.async_update)}
    raise ValueError(f"unknown server-mode {cfg.server_mode!r} (expected 'sync' or 'async')")


def build_strategy(
    cfg: RunConfig, server: GKTServer, out: Path, on_round: RoundCallback | None = None
) -> FedGKT:
    """Build the strategy of ``cfg.server_mode`` over ``server``, with every run setting.

    ``out`` is the run's results directory (its checkpoint goes there when
    ``checkpoint`` is on); ``on_round`` is called after every round.
    """
    cls, mode_args = strategy_class(cfg)
    if cfg.checkpoint:
        mode_args["checkpoint_path"] = out / CHECKPOINT_FILE
    elif cfg.resume:
        raise ValueError("resume needs checkpoint 1")
    return cls(
        server,
        dataset_info(cfg)[0],
        feature_shape=feature_shape(cfg),
        edge_config=edge_config(cfg),
        sampling=SamplingOptions(
            cfg.fraction_train,
            cfg.fraction_evaluate,
            min_train_nodes=cfg.min_nodes,
            min_evaluate_nodes=cfg.min_nodes,
            min_available_nodes=cfg.min_nodes,
            node_wait_timeout=cfg.node_wait_timeout,
        ),
        wire=WireOptions(
            cfg.feature_dtype,
            cfg.logit_dtype,
            max_payload_bytes=int(cfg.max_payload_mb * 1024 * 1024) or None,
            max_samples=cfg.max_samples or None,
        ),
        trust=TrustOptions(
            cfg.outlier_threshold,
            cfg.logit_clip,
            cfg.max_abs_value,
            min_train_replies=cfg.min_train_replies,
            store_max_age=cfg.store_max_age,
        ),
        schedule=ScheduleOptions(
            cfg.lr_schedule, Plateau(cfg.plateau_factor, cfg.plateau_patience)
        ),
        feature_upload_every=cfg.feature_upload_every,
        seed=cfg.seed,
        on_round=on_round,
        **mode_args,
    )


def _remove_stale_spill(cfg: RunConfig, spill: Path) -> None:
    """Remove the spill files a crashed run left in the run's own spill directory."""
    if cfg.spill_dir or not spill.is_dir():
        return
    removed = list(spill.glob("node-*.npy"))
    for path in removed:
        path.unlink()
    log(WARNING, "FedGKT: %d spill file(s) of an earlier run removed from %s", len(removed), spill)


def _with_faults(grid: Grid, cfg: RunConfig) -> Grid:
    """``grid``, behind fault injection when ``faults`` / ``fault-rate`` ask for it."""
    plan = FaultPlan.from_config(cfg.faults, cfg.fault_rate, cfg.fault_kinds, cfg.seed)
    if not plan:
        return grid
    log(
        WARNING,
        "FedGKT: fault injection on (%s, rate %.2f)",
        cfg.faults or "random faults only",
        cfg.fault_rate,
    )
    return FaultyGrid(grid, plan)


def run_fedgkt(grid: Grid, cfg: RunConfig) -> FedGKT:
    """Run ``cfg.num_server_rounds`` rounds of FedGKT on ``grid``; write results."""
    if cfg.resume and not cfg.run_name:
        raise ValueError(
            "resume needs run-name: the checkpoint is <results-dir>/<run-name>/checkpoint.pt"
        )
    if cfg.edge_models:  # a malformed list stops the run here, not on every node
        models = federation_edge_models(cfg)
        log(INFO, "FedGKT: edge models by partition (node configs may override): %s", models)
    out = results_dir(cfg)
    tensorboard = open_tensorboard(cfg.tensorboard_dir, out.name, cfg.to_dict())
    _remove_stale_spill(cfg, out / "spill")
    server = make_gkt_server(cfg, spill_dir=out / "spill")
    strategy = build_strategy(cfg, server, out, tensorboard)
    grid = _with_faults(grid, cfg)
    log(INFO, "FedGKT: results go to %s", out)
    if cfg.resume:
        strategy.resume()
    baseline_mb = peak_rss_mb()  # before any feature arrives
    start = time.perf_counter()
    try:
        strategy.start(
            grid=grid,
            initial_arrays=strategy.initial_arrays(),
            num_rounds=cfg.num_server_rounds,
            timeout=cfg.round_timeout,
        )
    finally:
        server.close()  # the distributed training's workers, if any
        server.store.close()  # spilled features are not results, and are private
        if tensorboard is not None:
            tensorboard.close()
    _report(cfg, strategy, grid, out, time.perf_counter() - start, baseline_mb)
    return strategy


def _report(
    cfg: RunConfig, strategy: FedGKT, grid: Grid, out: Path, elapsed: float, baseline_mb: float
) -> None:
    """Write the run's results (model, results.json, metrics) and log its summary."""
    final = strategy.history[-1] if strategy.history else {}
    torch.save(strategy.server.model.state_dict(), out / "server_model.pt")
    memory = memory_figures(baseline_mb, strategy.history)
    write_results(
        out,
        cfg,
        strategy.history,
        {
            "seconds": elapsed,
            "final": final,
            **memory,
            "faults-injected": dict(grid.injected) if isinstance(grid, FaultyGrid) else {},
        },
        nodes=strategy.node_history,
    )
    log(
        INFO,
        "FedGKT finished %d rounds in %.1fs: accuracy %.4f (edge+server), edge-only %.4f; results in %s",
        cfg.num_server_rounds,
        elapsed,
        final.get("accuracy", float("nan")),
        final.get("edge-accuracy", float("nan")),
        out,
    )
    log(
        INFO,
        "FedGKT server memory: peak RSS %.0f MB, %.0f MB before the first round, %.0f MB of "
        "features stored: %.2fx the stored bytes, %.2fx counting what came after the first round",
        memory["server-peak-rss-mb"],
        baseline_mb,
        memory["store-peak-mb"],
        memory["server-peak-rss-ratio"],
        memory["server-added-rss-ratio"],
    )


def make_server_app(fixed: RunConfig | None = None) -> ServerApp:
    """Build the ServerApp; ``fixed`` replaces the Flower run config when given."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedgkt(grid, fixed or config_from_run_config(context.run_config))

    return app


app = make_server_app()

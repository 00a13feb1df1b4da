"""FedAvg baseline: Flower's own FedAvg strategy training the full model.

The full model is the edge stem followed by the server body (``server-model``
``resnet55`` -> ResNet-56, ``resnet10`` -> ResNet-11), its stem initialised as
FedGKT's edge extractors (same weights, same pre-training, frozen or not with
``freeze-extractor``), trained on every node on
exactly the same partitions as FedGKT, with the edge training settings
(``edge-optimizer``, ``edge-lr``, ``batch-size``, ``edge-epochs``). Bytes are
measured from the messages' array payloads, as for FedGKT.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from flwr_gkt.config import RunConfig
from flwr_gkt.core.training import (
    TensorBatches,
    evaluate_logits,
    fit,
    get_device,
    lr_factor,
    make_optimizer,
    predict,
    prepare_model,
)
from flwr_gkt.data import ClientData
from flwr_gkt.flower.strategy import progress
from flwr_gkt.flower.strategy_utils import RoundCallback, call_on_round
from flwr_gkt.flower.tensorboard import open_tensorboard
from flwr_gkt.wire import metrics_record, record_nbytes, scalar

from .task import (
    build_full,
    config_from_run_config,
    node_data,
    results_dir,
    run_config_trusted,
    write_results,
)

_MB = 1024 * 1024


def build_model(cfg: RunConfig) -> torch.nn.Module:
    """The full model, its stem initialised as the FedGKT edge extractor (see ``build_full``)."""
    return build_full(cfg)


class MeasuredFedAvg(FedAvg):
    """Flower's FedAvg, plus bytes per round and a history like FedGKT's."""

    def __init__(
        self,
        *args: Any,
        lr_schedule: str = "constant",
        num_rounds: int = 1,
        on_round: RoundCallback | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.lr_schedule, self.num_rounds, self.on_round = lr_schedule, num_rounds, on_round
        self.history: list[dict[str, float]] = []
        self._down, self._down_eval, self._start = 0, 0, 0.0
        self._run_start = time.perf_counter()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._start = time.perf_counter()
        config["lr-factor"] = lr_factor(self.lr_schedule, server_round, self.num_rounds)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._down = sum(record_nbytes(m.content) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        up = sum(record_nbytes(m.content) for m in replies if not m.has_error())
        arrays, metrics = super().aggregate_train(server_round, replies)
        row: dict[str, float] = {
            "round": server_round,
            "bytes-up-train": up,
            "bytes-down-train": self._down,
            "nodes-replied": sum(not m.has_error() for m in replies),
        }
        if metrics is not None:
            row.update({k: scalar(metrics, k) for k in metrics if k != "num-examples"})
        self.history.append(row)
        log(
            INFO,
            "FedAvg round %d train: %d nodes, up %.2f MB, down %.2f MB",
            server_round,
            row["nodes-replied"],
            up / _MB,
            self._down / _MB,
        )
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self._down_eval = sum(record_nbytes(m.content) for m in messages)
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.history[-1].update({k: scalar(metrics, k) for k in metrics})
            self.history[-1]["num-examples"] = sum(
                int(scalar(m.content.metric_records["metrics"], "num-examples"))
                for m in replies
                if not m.has_error()
            )
            self.history[-1]["bytes-down-eval"] = self._down_eval
            self.history[-1]["round-seconds"] = time.perf_counter() - self._start
            log(
                INFO,
                "FedAvg round %d eval: accuracy %.4f, loss %.4f [%s]",
                server_round,
                metrics["accuracy"],
                metrics["loss"],
                progress(server_round, self.num_rounds, time.perf_counter() - self._run_start),
            )
        call_on_round(self.on_round, self.history, (), server_round)
        return metrics


def run_fedavg(grid: Grid, cfg: RunConfig) -> MeasuredFedAvg:
    """Run FedAvg for ``cfg.num_server_rounds`` rounds and write results."""
    out = results_dir(cfg)
    tensorboard = open_tensorboard(cfg.tensorboard_dir, out.name, cfg.to_dict())
    model = build_model(cfg)
    strategy = MeasuredFedAvg(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.min_nodes,
        min_evaluate_nodes=cfg.min_nodes,
        min_available_nodes=cfg.min_nodes,
        lr_schedule=cfg.lr_schedule,
        num_rounds=cfg.num_server_rounds,
        on_round=tensorboard,
    )
    start = time.perf_counter()
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=cfg.num_server_rounds,
        )
    finally:
        if tensorboard is not None:
            tensorboard.close()
    elapsed = time.perf_counter() - start
    if result.arrays is not None:
        model.load_state_dict(result.arrays.to_torch_state_dict())
    torch.save(model.state_dict(), out / "fedavg_model.pt")
    final = strategy.history[-1] if strategy.history else {}
    write_results(
        out, cfg, strategy.history, {"algorithm": "fedavg", "seconds": elapsed, "final": final}
    )
    log(
        INFO,
        "FedAvg finished %d rounds in %.1fs: accuracy %.4f; results in %s",
        cfg.num_server_rounds,
        elapsed,
        final.get("accuracy", float("nan")),
        out,
    )
    return strategy


def make_fedavg_apps(fixed: RunConfig | None = None) -> tuple[ServerApp, ClientApp]:
    """The FedAvg ServerApp and ClientApp."""
    server_app, client_app = ServerApp(), ClientApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_fedavg(grid, fixed or config_from_run_config(context.run_config))

    def setup(
        msg: Message, context: Context
    ) -> tuple[RunConfig, ClientData, torch.nn.Module, torch.device]:
        cfg = fixed or config_from_run_config(context.run_config)
        if cfg.client_threads > 0:
            torch.set_num_threads(cfg.client_threads)
        _, data = node_data(cfg, context.node_config, run_config_trusted(fixed))
        device = get_device(cfg.device)
        model = build_model(cfg)
        model.load_state_dict(msg.content.array_records["arrays"].to_torch_state_dict())
        return cfg, data, prepare_model(model, device), device

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg, data, model, device = setup(msg, context)
        config = msg.content.config_records["config"]
        lr = cfg.edge_lr * scalar(config, "lr-factor", 1.0)
        params = [p for p in model.parameters() if p.requires_grad]  # a frozen stem stays
        optimizer = make_optimizer(cfg.edge_optimizer, params, lr, cfg.weight_decay)
        gen = torch.Generator().manual_seed(
            cfg.seed * 100_003 + int(scalar(config, "server-round"))
        )
        res = fit(
            model,
            TensorBatches(data.x_train, data.y_train, cfg.batch_size, True, gen, data.augment),
            optimizer,
            epochs=cfg.edge_epochs,
            device=device,
        )
        metrics = metrics_record(
            len(data.y_train),
            **{
                "train-loss": res.loss,
                "train-accuracy": res.accuracy,
                "client-seconds": res.seconds,
            },
        )
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @client_app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        cfg, data, model, device = setup(msg, context)
        logits = predict(model, TensorBatches(data.x_test, data.y_test, cfg.batch_size), device)
        loss_sum, correct = evaluate_logits(logits, data.y_test)
        n = len(data.y_test)
        metrics = MetricRecord({"num-examples": n, "accuracy": correct / n, "loss": loss_sum / n})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return server_app, client_app


# Module-level components (flwr run), one per assignment: Flower finds them statically.
_apps = make_fedavg_apps()
server_app = _apps[0]
client_app = _apps[1]

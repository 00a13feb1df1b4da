"""FedGKT as a Flower strategy (Message API).

The strategy orchestrates; the math lives in :class:`flwr_gkt.server.GKTServer`
(server training) and :mod:`flwr_gkt.edge` (edge training).

One round (Algorithm 1):

1. ``configure_train`` samples nodes and sends each one the round config and
   *its own* per-sample server logits ``Z_s^(k)`` from the previous round.
2. The nodes train their edge models (``CE + KD``) and reply with features
   ``H^(k)``, edge logits ``Z_c^(k)`` and labels ``Y^(k)``.
3. ``aggregate_train`` validates every reply (a bad one is rejected and
   logged, the others go on), stores the accepted ones, trains the server model
   ``E_s`` epochs on all stored features shuffled together and computes the new
   ``Z_s^(k)`` for each node. It returns the server model's weights (no model
   weights are averaged anywhere).
4. ``configure_evaluate`` / ``aggregate_evaluate``: nodes send the features of
   their local test split; the server model classifies them. Reported:
   ``accuracy`` (edge extractor + server model) and ``edge-accuracy`` (edge
   model alone), both weighted by examples.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import asdict, replace
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log

from .edge import EdgeRoundConfig
from .server import GKTServer
from .training import lr_factor
from .wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    NUM_EXAMPLES,
    Payload,
    PayloadError,
    PayloadSpec,
    decode_payload,
    encode_server_logits,
    record_nbytes,
)

__all__ = ["FedGKT", "progress"]

_MB = 1024 * 1024


def progress(server_round: int, num_rounds: int, elapsed: float) -> str:
    """``"round 3/10, 42s elapsed, ~98s left"``: a progress note for long runs."""
    if num_rounds <= 0:
        return f"round {server_round}, {elapsed:.0f}s elapsed"
    left = elapsed / max(server_round, 1) * max(num_rounds - server_round, 0)
    return f"round {server_round}/{num_rounds}, {elapsed:.0f}s elapsed, ~{left:.0f}s left"


def edge_config_record(cfg: EdgeRoundConfig, **extra: Any) -> ConfigRecord:
    """The edge settings as the ConfigRecord sent with each train instruction."""
    values = {k.replace("_", "-"): v for k, v in asdict(cfg).items()}
    values["kd-mode"] = cfg.kd_mode.value
    values.update(extra)
    return ConfigRecord(values)


class FedGKT(Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) for Flower.

    Parameters
    ----------
    server : GKTServer
        Server model, optimizer and feature store; trained in ``aggregate_train``.
    num_classes : int
        Number of classes (validates logits and labels).
    feature_shape : tuple[int, int, int], optional
        Expected ``(C, H, W)`` of a feature map. When ``None``, the first
        accepted payload fixes it.
    edge_config : EdgeRoundConfig, optional
        Settings sent to the nodes each round (epochs ``E_c``, optimizer, lr,
        temperature, alpha, KD mode, batch size). Entries of the ``train_config``
        given to :meth:`start` override them.
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds for sampling, as in Flower's ``FedAvg``.
    feature_dtype : str
        Dtype the nodes use for features on the wire (``float32``/``float16``).
    max_samples : int, optional
        Largest number of samples one reply may carry.
    lr_schedule : str
        ``constant`` or ``cosine``: per-round learning-rate multiplier applied to
        the server and the edge learning rates (see
        :func:`flwr_gkt.training.lr_factor`); needs the number of rounds, taken
        from :meth:`start`.
    seed : int
        Seed sent to the nodes for their data shuffling.
    """

    def __init__(
        self,
        server: GKTServer,
        num_classes: int,
        *,
        feature_shape: tuple[int, int, int] | None = None,
        edge_config: EdgeRoundConfig | None = None,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        feature_dtype: str = "float32",
        max_samples: int | None = None,
        lr_schedule: str = "constant",
        seed: int = 0,
    ) -> None:
        self.server = server
        self.spec = PayloadSpec(num_classes, feature_shape, max_samples)
        self.edge_config = edge_config or EdgeRoundConfig(kd_mode=server.kd_mode)
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.feature_dtype = feature_dtype
        self.seed = seed
        self.lr_schedule = lr_schedule
        lr_factor(lr_schedule, 1, 1)  # raises on an unknown schedule
        self.num_rounds = 0
        #: One dict per round: metrics, bytes and times (also written to CSV).
        self.history: list[dict[str, float]] = []
        self._round_start = 0.0
        self._run_start = time.perf_counter()
        self._bytes_sent = 0

    # ------------------------------------------------------------------ helpers
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, *args: Any, **kwargs: Any) -> Any:
        """Run FedGKT (see :meth:`flwr.serverapp.strategy.Strategy.start`)."""
        self.num_rounds = num_rounds
        self._run_start = time.perf_counter()
        return super().start(grid, initial_arrays, num_rounds, *args, **kwargs)

    def _lr_factor(self, server_round: int) -> float:
        return lr_factor(self.lr_schedule, server_round, max(self.num_rounds, server_round))

    def initial_arrays(self) -> ArrayRecord:
        """The server model's weights, to pass to :meth:`start`."""
        return ArrayRecord(self.server.model.state_dict())

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(INFO, "\t├──> FedGKT: server model %s on %s", type(self.server.model).__name__, self.server.device)
        log(
            INFO,
            "\t│\t├── server: E_s=%d, batch %d, T=%.1f, alpha=%.2f, KD mode %s",
            self.server.epochs,
            self.server.batch_size,
            self.server.temperature,
            self.server.alpha,
            self.server.kd_mode.value,
        )
        log(INFO, "\t│\t└── edge: %s", self.edge_config)
        log(
            INFO,
            "\t└──> Sampling: fraction train %.2f | evaluate %.2f, min nodes %d/%d/%d",
            self.fraction_train,
            self.fraction_evaluate,
            self.min_train_nodes,
            self.min_evaluate_nodes,
            self.min_available_nodes,
        )

    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        if fraction == 0.0:
            return []
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, self.min_available_nodes, max(num_nodes, min_nodes))
        return sorted(node_ids)

    def _accept(
        self, server_round: int, replies: Iterable[Message], with_logits: bool
    ) -> tuple[list[tuple[int, Payload, MetricRecord]], int, int]:
        """Decode and validate replies; return accepted ones, bytes and rejects."""
        accepted: list[tuple[int, Payload, MetricRecord]] = []
        nbytes, rejected = 0, 0
        stage = "train" if with_logits else "evaluate"
        for msg in replies:
            node = msg.metadata.src_node_id
            if msg.has_error():
                rejected += 1
                log(WARNING, "FedGKT round %d: %s reply of node %d rejected: node error: %s",
                    server_round, stage, node, msg.error.reason)
                continue
            nbytes += record_nbytes(msg.content)
            try:
                payload = decode_payload(msg.content, self.spec, with_logits)
            except Exception as err:  # noqa: BLE001 - a reply must never end the run
                reason = str(err) if isinstance(err, PayloadError) else f"malformed payload: {err!r}"
                rejected += 1
                log(WARNING, "FedGKT round %d: %s reply of node %d rejected: %s",
                    server_round, stage, node, reason)
                continue
            if self.spec.feature_shape is None:
                self.spec = replace(self.spec, feature_shape=tuple(payload.features.shape[1:]))
            accepted.append((node, payload, msg.content.metric_records[METRICS_KEY]))
        return accepted, nbytes, rejected

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the round config and its own server logits."""
        self._round_start = time.perf_counter()
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        round_config = edge_config_record(
            self.edge_config, **{"feature-dtype": self.feature_dtype, "seed": self.seed}
        )
        round_config["lr"] = self.edge_config.lr * self._lr_factor(server_round)
        round_config.update(config)
        round_config["server-round"] = server_round
        messages = []
        for node in node_ids:
            content = RecordDict({CONFIG_KEY: round_config})
            # Z_s travels only when the edge distils from it (not in KD modes without it).
            logits = self.server.server_logits(node) if self.edge_config.kd_mode.edge_distills else None
            if logits is not None:
                content[ARRAYS_KEY] = encode_server_logits(logits)
            messages.append(Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._bytes_sent = sum(record_nbytes(m.content) for m in messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store replies, then train the server model on all stored features."""
        replies = list(replies)
        accepted, nbytes, rejected = self._accept(server_round, replies, with_logits=True)
        for node, payload, _ in accepted:
            self.server.put(node, payload)
        result = self.server.train_round(lr_scale=self._lr_factor(server_round))
        n_edge = sum(len(p) for _, p, _ in accepted)
        row: dict[str, float] = {
            "round": server_round,
            "nodes-replied": len(accepted),
            "nodes-rejected": rejected,
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-examples": result.num_examples,
            "server-seconds": result.seconds,
            "bytes-up-train": nbytes,
            "bytes-down-train": self._bytes_sent,
        }
        for key in ("edge-train-loss", "edge-train-accuracy"):
            if n_edge:
                row[key] = sum(float(m[key]) * len(p) for _, p, m in accepted if key in m) / n_edge
        edge_seconds = [float(m.get("edge-seconds", 0.0)) for *_, m in accepted]
        row["edge-seconds-max"] = max(edge_seconds, default=0.0)
        row["edge-seconds-mean"] = sum(edge_seconds) / max(len(edge_seconds), 1)
        self.history.append(row)
        log(
            INFO,
            "FedGKT round %d train: %d nodes (%d rejected), server loss %.4f acc %.4f on %d samples "
            "(%.1fs), edge loss %.4f acc %.4f, up %.2f MB, down %.2f MB",
            server_round, len(accepted), rejected, result.loss, result.accuracy, result.num_examples,
            result.seconds, row.get("edge-train-loss", float("nan")),
            row.get("edge-train-accuracy", float("nan")), nbytes / _MB, self._bytes_sent / _MB,
        )
        if result.num_examples == 0:
            return None, MetricRecord({k: float(v) for k, v in row.items()})
        return ArrayRecord(self.server.model.state_dict()), MetricRecord(
            {k: float(v) for k, v in row.items()}
        )

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the features of their local test split."""
        node_ids = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        eval_config = ConfigRecord(
            {"batch-size": self.edge_config.batch_size, "feature-dtype": self.feature_dtype}
        )
        eval_config.update(config)
        eval_config["server-round"] = server_round
        return [
            Message(content=RecordDict({CONFIG_KEY: eval_config}), dst_node_id=node,
                    message_type=MessageType.EVALUATE)
            for node in node_ids
        ]

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Classify the nodes' test features with the server model."""
        accepted, nbytes, rejected = self._accept(server_round, replies, with_logits=False)
        if not accepted:
            return None
        loss_sum, correct, n, edge_correct, edge_loss = 0.0, 0, 0, 0.0, 0.0
        for _, payload, metrics in accepted:
            l_sum, c = self.server.evaluate(payload.features, payload.labels)
            loss_sum, correct, n = loss_sum + l_sum, correct + c, n + len(payload)
            edge_correct += float(metrics.get("edge-accuracy", 0.0)) * len(payload)
            edge_loss += float(metrics.get("edge-loss", 0.0)) * len(payload)
        metrics = {
            "accuracy": correct / n,
            "loss": loss_sum / n,
            "edge-accuracy": edge_correct / n,
            "edge-loss": edge_loss / n,
            NUM_EXAMPLES: n,
            "eval-nodes": len(accepted),
            "eval-rejected": rejected,
            "bytes-up-eval": nbytes,
            "round-seconds": time.perf_counter() - self._round_start,
        }
        row = self.history[-1] if self.history and self.history[-1]["round"] == server_round else None
        if row is None:
            row = {"round": server_round}
            self.history.append(row)
        row.update({k: float(v) for k, v in metrics.items()})
        log(
            INFO,
            "FedGKT round %d eval: accuracy %.4f (edge+server), edge-only %.4f, loss %.4f on %d "
            "test samples from %d nodes, eval up %.2f MB, round %.1fs [%s]",
            server_round, metrics["accuracy"], metrics["edge-accuracy"], metrics["loss"], n,
            len(accepted), nbytes / _MB, metrics["round-seconds"],
            progress(server_round, self.num_rounds, time.perf_counter() - self._run_start),
        )
        return MetricRecord({k: float(v) if k != NUM_EXAMPLES else int(v) for k, v in metrics.items()})

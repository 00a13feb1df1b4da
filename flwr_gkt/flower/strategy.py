"""FedGKT as a Flower strategy (Message API).

The strategy orchestrates; the math lives in :class:`flwr_gkt.core.server.GKTServer`
(server training) and :mod:`flwr_gkt.core.edge` (edge training).

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

import math
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore import log

from flwr_gkt.core.checkpoint import CheckpointError, rng_state, set_rng_state
from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.server import GKTServer, ServerRoundResult
from flwr_gkt.core.store import FeatureStore
from flwr_gkt.core.training import Plateau, lr_factor
from flwr_gkt.flower.base import RoundStrategy, RunContext
from flwr_gkt.flower.nodes import NodeRegistry
from flwr_gkt.flower.options import SamplingOptions, ScheduleOptions, TrustOptions, WireOptions
from flwr_gkt.flower.strategy_utils import (
    MB,
    RoundCallback,
    edge_config_record,
    edge_train_metrics,
    progress,
    sample_connected,
    sample_trained,
)
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NODE_TOKEN,
    NUM_EXAMPLES,
    Payload,
    PayloadError,
    PayloadSpec,
    decode_logits,
    decode_payload,
    encode_server_logits,
    record_nbytes,
    scalar,
)
from flwr_gkt.wire.gate import EVALUATE_METRICS, TRAIN_METRICS, ReplyGate

__all__ = ["FeatureStaging", "FedGKT", "edge_config_record", "edge_train_metrics", "progress"]

#: What ``_accept`` hands each accepted payload to: node, payload, metrics.
Consume = Callable[[int, Payload, Mapping[str, float]], None]


def asks_features(message: Message) -> bool:
    """Whether a train instruction asks its node for features (not logits alone)."""
    return bool(message.content.config_records[CONFIG_KEY].get("send-features", True))


class FeatureStaging:
    """When the stored features wait on disk (see :class:`FedGKT`).

    Parameters
    ----------
    store : FeatureStore
        The server's feature store.
    every_round : bool
        Whether every node trains every round: then the features of the nodes
        asked again go to disk already when the evaluation starts.
    enabled : bool
        ``False``: nothing is staged (replies that come one at a time).
    """

    def __init__(self, store: FeatureStore, every_round: bool, enabled: bool = True) -> None:
        self.store = store
        self.every_round = every_round
        self.enabled = enabled
        #: Nodes whose features went to disk when the current evaluation started.
        self.staged: list[int] = []

    def before_train(self, asked: Iterable[int]) -> None:
        """Stage out the features the train replies replace: they arrive together."""
        if self.enabled:
            self.store.stage_out(asked)

    def before_evaluate(self, asked_next: Callable[[int], bool]) -> None:
        """With every node training every round, the nodes asked next round stage out now."""
        if self.enabled and self.every_round:
            self.staged = [n for n in self.store if asked_next(n)]
            self.store.stage_out(self.staged)

    def after_evaluate(self, last_round: bool) -> None:
        """After the last round's evaluation the store is left as the server trained on it."""
        if last_round:
            self.store.stage_in(self.staged)
        self.staged = []


class FedGKT(RoundStrategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) for Flower.

    Before each round, the stored features of the nodes asked for fresh ones
    move to disk until replaced (:meth:`flwr_gkt.core.store.FeatureStore.stage_out`):
    Flower hands over a round's replies together, so old and new would
    otherwise be in memory at once. When every node trains every round
    (``fraction_train=1``), that happens already when the evaluation starts:
    evaluation does not read the stored features, and the round's test
    features arrive together too. After the last round's evaluation they are
    read back (:meth:`~flwr_gkt.core.store.FeatureStore.stage_in`), so the
    store is left as the server trained on it (:class:`FeatureStaging`).

    Parameters
    ----------
    server : GKTServer
        Server model, optimizer and feature store; trained in ``aggregate_train``.
    num_classes : int
        Number of classes (validates logits and labels).
    feature_shape : tuple[int, int, int], optional
        Expected ``(C, H, W)`` of a feature map; ``None``: the shape a strict
        majority of a round's train replies carry (never the first reply alone).
    edge_config : EdgeRoundConfig, optional
        Edge settings sent each round (``E_c``, optimizer, lr, temperature,
        alpha, KD mode, batch size); ``train_config`` entries override them.
    sampling : SamplingOptions, optional
        Fractions and minimum numbers of nodes, the wait for them.
    wire : WireOptions, optional
        Wire dtypes, largest reply and sample count.
    trust : TrustOptions, optional
        Outlier and magnitude checks, logit clipping, fewest train replies,
        how long stored features stay in use.
    schedule : ScheduleOptions, optional
        The learning-rate schedule.
    feature_upload_every : int
        Replay (EcoFed): nodes upload features every this many rounds and
        logits alone in between (``1``: every round, FedGKT; ``0``: once).
    seed : int
        Seed sent to the nodes for their data shuffling.
    checkpoint_path : str or Path, optional
        Where a checkpoint is written after every completed round
        (:mod:`flwr_gkt.core.checkpoint`); :meth:`resume` reads it back.
    on_round : RoundCallback, optional
        Called once per completed round (training and evaluation) with its
        :attr:`history` row and its :attr:`node_history` records, e.g. a
        :class:`~flwr_gkt.flower.tensorboard.TensorBoardWriter`.
    """

    #: Stage the features to be replaced out to disk before a round (see above).
    stage_out = True

    def __init__(
        self,
        server: GKTServer,
        num_classes: int,
        *,
        feature_shape: tuple[int, int, int] | None = None,
        edge_config: EdgeRoundConfig | None = None,
        sampling: SamplingOptions | None = None,
        wire: WireOptions | None = None,
        trust: TrustOptions | None = None,
        schedule: ScheduleOptions | None = None,
        feature_upload_every: int = 1,
        seed: int = 0,
        checkpoint_path: str | Path | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        super().__init__(on_round)
        self.server = server
        self.sampling, self.wire = sampling or SamplingOptions(), wire or WireOptions()
        self.trust, self.schedule = trust or TrustOptions(), schedule or ScheduleOptions()
        self.spec = PayloadSpec(num_classes, feature_shape, self.wire.max_samples)
        self.edge_config = edge_config or EdgeRoundConfig(kd_mode=server.kd_mode)
        self.seed = seed
        if feature_upload_every < 0:
            raise ValueError("feature_upload_every must be >= 0")
        self.feature_upload_every = feature_upload_every
        if feature_upload_every != 1:  # replay: Z_c must come from the stored features' inputs
            self.edge_config = replace(self.edge_config, extract_augment=False)
        #: Round in which each node's stored features were uploaded.
        self.feature_round: dict[int, int] = {}
        lr_factor(self.schedule.lr_schedule, 1, 1)  # raises on an unknown schedule
        plateau = self.schedule.lr_schedule == "plateau"
        self.plateau = (self.schedule.plateau or Plateau()) if plateau else None
        #: The nodes' identities and tokens; train on them in the order of their
        #: identities, so that a seed reproduces a run.
        self.nodes = NodeRegistry()
        server.node_key = self.nodes.order_key
        self.staging = FeatureStaging(
            server.store, self.sampling.fraction_train >= 1.0, self.stage_out
        )
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        #: The trust boundary every reply passes (see :mod:`flwr_gkt.wire.gate`).
        self.gate = ReplyGate(
            self.wire.max_payload_bytes,
            self.trust.outlier_threshold,
            self.trust.logit_clip,
            max_abs_value=self.trust.max_abs_value,
        )
        #: Replies of the latest ``_accept`` ignored as ``late`` or ``duplicate``.
        self.ignored: Counter[str] = Counter()
        self._sent_train: list[Message] = []
        self._sent_eval: list[Message] = []
        self._bytes_sent = 0

    # ------------------------------------------------------------------ round
    def begin(self, run: RunContext) -> RunContext:
        """Go on from the restored server model's weights on a resumed run."""
        if self.completed_round > 0:
            run.arrays = self.initial_arrays()
        return run

    def run_round(self, server_round: int, run: RunContext) -> bool:
        """Train, then evaluate, through the four Message API hooks (one round)."""
        grid, timeout = run.grid, run.timeout
        messages = self.configure_train(server_round, ArrayRecord(), run.train_config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        arrays, train_metrics = self.aggregate_train(server_round, replies)
        del replies
        if arrays is not None:
            run.result.arrays = run.arrays = arrays
        if train_metrics is not None:
            run.result.train_metrics_clientapp[server_round] = train_metrics
        messages = self.configure_evaluate(server_round, ArrayRecord(), run.evaluate_config, grid)
        replies = grid.send_and_receive(messages, timeout=timeout)
        eval_metrics = self.aggregate_evaluate(server_round, replies)
        del replies
        if eval_metrics is not None:
            run.result.evaluate_metrics_clientapp[server_round] = eval_metrics
        return True

    # ------------------------------------------------------------------ train
    def train_instruction(self, node: int, server_round: int, config: ConfigRecord) -> Message:
        """Build ``node``'s train instruction of ``server_round`` (Algorithm 1, line 3).

        The config: the edge settings (lr scaled by the schedule), wire dtypes
        and seed, then ``config``'s entries, ``server-round`` and the node's
        token; ``send-features = False`` when the node need not upload its
        features (replay). ``Z_s`` travels only when the edge distils from it.
        """
        dtypes = {"feature-dtype": self.wire.feature_dtype, "logit-dtype": self.wire.logit_dtype}
        record = edge_config_record(self.edge_config, **dtypes, seed=self.seed)
        record["lr"] = self.edge_config.lr * self.lr_factor(server_round)
        record.update(config)
        record["server-round"] = server_round
        record[NODE_TOKEN] = self.nodes.token(node)
        if not self._wants_features(node, server_round):
            record["send-features"] = False
        content = RecordDict({CONFIG_KEY: record})
        logits = self.server.server_logits(node) if self.edge_config.kd_mode.edge_distills else None
        if logits is not None:
            content[ARRAYS_KEY] = encode_server_logits(logits, self.wire.logit_dtype)
        return Message(content, dst_node_id=node, message_type=MessageType.TRAIN)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node its :meth:`train_instruction` (Algorithm 1, line 3).

        ``arrays`` (the server model's weights) is not sent. The stored
        features of the nodes asked for fresh ones wait on disk
        (:meth:`FeatureStaging.before_train`).
        """
        self.rounds.round_start = time.perf_counter()
        nodes = self._sample(grid, self.sampling.fraction_train, self.sampling.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(nodes))
        self._sent_train = [self.train_instruction(n, server_round, config) for n in nodes]
        self.staging.before_train(
            m.metadata.dst_node_id for m in self._sent_train if asks_features(m)
        )
        self._bytes_sent = sum(record_nbytes(m.content) for m in self._sent_train)
        self.rounds.sent_at = time.perf_counter()
        return self._sent_train

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Store the accepted replies, then train the server model (Algorithm 1, lines 5-12).

        Each reply passes the gate (:meth:`_accept`) and is stored at once.
        With at least ``min_train_replies`` accepted, the server model trains
        ``E_s`` epochs on every stored node's features and computes each
        node's new ``Z_s``. The round's row (node counts, server and edge loss
        / accuracy, store size, seconds, bytes) goes to :attr:`history` and is
        returned with the server weights (``None`` when it trained on nothing).
        ``train-wait-seconds``: from the instructions' hand-over to the replies'
        (edge training and transport).
        """
        wait = self.rounds.waited()

        def store(node: int, payload: Payload, _: Mapping[str, float]) -> None:
            self._store(node, payload, server_round)

        accepted, nbytes, rejected = self._accept(
            server_round, "train", replies, self._sent_train, store
        )
        row: dict[str, float] = {
            "round": server_round,
            "nodes-replied": len(accepted),
            "nodes-rejected": rejected,
            "nodes-lost": self.rounds.record_lost(self._sent_train, server_round, "train"),
            "nodes-evicted": 0,
            "replies-late": self.ignored.get("late", 0),
            "replies-duplicate": self.ignored.get("duplicate", 0),
            "nodes-sent-features": sum(
                self.feature_round.get(n) == server_round for n, *_ in accepted
            ),
            "train-wait-seconds": wait,
        }
        self._drop_silent_nodes(server_round)
        result, row["nodes-evicted"] = self._train_server(server_round, len(accepted))
        row |= self._server_row(server_round, result, nbytes)
        row |= edge_train_metrics([(scalar(m, NUM_EXAMPLES), m) for *_, m in accepted])
        self.history.append(row)
        self.rounds.log_train(server_round, row)
        weights = ArrayRecord(self.server.model.state_dict()) if result.num_examples else None
        return weights, MetricRecord({k: float(v) for k, v in row.items()})

    # --------------------------------------------------------------- evaluate
    def evaluate_instruction(self, node: int, server_round: int, config: ConfigRecord) -> Message:
        """Build ``node``'s evaluate instruction: send the features of its local test split.

        The config: batch size, feature dtype and precision, then ``config``'s
        entries and ``server-round``.
        """
        record = ConfigRecord(
            {
                "batch-size": self.edge_config.batch_size,
                "feature-dtype": self.wire.feature_dtype,
                "precision": self.edge_config.precision,
            }
        )
        record.update(config)
        record["server-round"] = server_round
        content = RecordDict({CONFIG_KEY: record})
        return Message(content, dst_node_id=node, message_type=MessageType.EVALUATE)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send sampled nodes their :meth:`evaluate_instruction`.

        Only nodes whose edge model has trained are sampled
        (:attr:`NodeRegistry.trained`); the features of the nodes the next
        round asks again may wait on disk (:meth:`FeatureStaging.before_evaluate`).
        """
        nodes = self._eval_nodes(grid)
        self.staging.before_evaluate(lambda n: self._wants_features(n, server_round + 1))
        self._sent_eval = [self.evaluate_instruction(n, server_round, config) for n in nodes]
        self.rounds.sent_at = time.perf_counter()
        return self._sent_eval

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Classify the nodes' test features with the server model ("online inference").

        Replies pass the gate and are evaluated one at a time. Returned (and
        merged into the round's :attr:`history` row): ``accuracy`` / ``loss``
        (edge extractor + server model), ``edge-accuracy`` / ``edge-loss``
        (edge model alone), weighted by examples, with counts, bytes and the
        round's seconds (``eval-wait-seconds``: waiting for the replies);
        ``None`` when no reply was accepted. The plateau schedule steps with
        the accuracy.
        """
        wait = self.rounds.waited()
        sums = dict.fromkeys(("loss", "correct", "n", "edge-correct", "edge-loss"), 0.0)

        def evaluate(node: int, payload: Payload, metrics: Mapping[str, float]) -> None:
            self._evaluate_payload(payload, metrics, sums)

        accepted, nbytes, rejected = self._accept(
            server_round, "evaluate", replies, self._sent_eval, evaluate
        )
        self.rounds.record_lost(self._sent_eval, server_round, "evaluate")
        self.staging.after_evaluate(last_round=server_round >= self.num_rounds)
        if not accepted:
            return None
        ignored = sum(self.ignored.values())
        metrics = self.rounds.evaluate_row(sums, len(accepted), rejected, ignored, nbytes)
        metrics["eval-wait-seconds"] = wait
        metrics["round-seconds"] = time.perf_counter() - self.rounds.round_start
        self.rounds.merge_row(server_round, metrics)
        if self.plateau is not None:  # the reference steps its scheduler with the test accuracy
            self.plateau.step(float(metrics["accuracy"]))
        self.rounds.log_evaluate(server_round, metrics)
        return MetricRecord(dict(metrics))

    def _evaluate_payload(
        self, payload: Payload, metrics: Mapping[str, float], sums: dict[str, float]
    ) -> None:
        """Classify one reply's test features; add its losses and hits to ``sums``."""
        loss_sum, correct = self.server.evaluate(payload.dense_features(), payload.labels)
        if not math.isfinite(loss_sum):
            raise PayloadError("its features make the server's loss non-finite")
        n = len(payload)
        sums["loss"] += loss_sum
        sums["correct"] += correct
        sums["n"] += n
        sums["edge-correct"] += scalar(metrics, "edge-accuracy", 0.0) * n
        sums["edge-loss"] += scalar(metrics, "edge-loss", 0.0) * n

    # ------------------------------------------------------------------ helpers
    def initial_arrays(self) -> ArrayRecord:
        """Return the server model's current weights (its ``state_dict``), to pass to :meth:`start`."""
        return ArrayRecord(self.server.model.state_dict())

    def summary(self) -> None:
        """Log the strategy's configuration (models, KD, edge settings, sampling)."""
        server, sampling = self.server, self.sampling
        log(
            INFO, "\t├──> FedGKT: server model %s on %s", type(server.model).__name__, server.device
        )
        log(
            INFO,
            "\t│\t├── server: E_s=%d, batch %d, T=%.1f, alpha=%.2f, KD mode %s",
            server.epochs,
            server.batch_size,
            server.temperature,
            server.alpha,
            server.kd_mode.value,
        )
        log(INFO, "\t│\t└── edge: %s", self.edge_config)
        log(
            INFO,
            "\t└──> Sampling: fraction train %.2f | evaluate %.2f, min nodes %d/%d/%d",
            sampling.fraction_train,
            sampling.fraction_evaluate,
            sampling.min_train_nodes,
            sampling.min_evaluate_nodes,
            sampling.min_available_nodes,
        )

    def lr_factor(self, server_round: int) -> float:
        """Return the schedule's learning-rate multiplier of ``server_round``."""
        num_rounds = max(self.num_rounds, server_round)
        return lr_factor(self.schedule.lr_schedule, server_round, num_rounds)

    def server_lr_factor(self, server_round: int) -> float:
        """Return the server learning-rate multiplier: the plateau's, else the schedule's."""
        return self.plateau.factor if self.plateau else self.lr_factor(server_round)

    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        s = self.sampling
        return sample_connected(
            grid, fraction, min_nodes, s.min_available_nodes, s.node_wait_timeout
        )

    def _eval_nodes(self, grid: Grid) -> list[int]:
        """Sample the evaluation nodes among the connected nodes that have trained."""
        fraction, min_nodes = self.sampling.fraction_evaluate, self.sampling.min_evaluate_nodes
        if fraction == 0.0:
            return []
        connected = self._sample(grid, 1.0, min_nodes)
        # resumed nodes have trained when the server holds their Z_s
        trained = [n for n in connected if n in self.nodes.trained or n in self.server.logits]
        rng = random.Random(self.seed * 7919 + len(self.history))
        return sample_trained(connected, trained, fraction, min_nodes, rng)

    def _accept(
        self,
        server_round: int,
        stage: str,
        replies: Iterable[Message],
        sent: list[Message],
        consume: Consume | None = None,
    ) -> tuple[list[tuple[int, Payload | None, dict[str, float]]], int, int]:
        """Pass a stage's replies to ``sent`` through the gate; return accepted ones, bytes, rejects.

        :class:`~flwr_gkt.wire.gate.ReplyGate` checks everything a node sent;
        this method books the result (node-history rows, ignored counts, node
        uids). A train reply carries features unless its instruction asked
        for logits alone. With ``consume`` each accepted payload is handed
        over at once and the list holds ``None`` in its place.
        """
        train = stage == "train"
        features_asked = {m.metadata.dst_node_id: asks_features(m) for m in sent} if train else {}

        def decode(node: int, content: RecordDict) -> Payload:
            if train and not features_asked.get(node, True):
                if node not in self.server.store:
                    raise PayloadError("logits-only reply but no features stored for this node")
                n = self.server.store.num_samples(node)
                return Payload.logits_only(decode_logits(content, self.spec, n))
            if self.spec.feature_shape is None:
                raise PayloadError("no feature shape agreed by a majority of the nodes yet")
            return decode_payload(content, self.spec, train)

        replies = list(replies)
        if self.spec.feature_shape is None and train:  # the majority fixes it, not the first
            shape = self.gate.vote_feature_shape(replies)
            if shape is not None:
                self.spec = replace(self.spec, feature_shape=shape)
                log(INFO, "FedGKT: feature maps of shape %s (held by most nodes)", list(shape))
        result = self.gate.admit(
            server_round,
            stage,
            replies,
            sent,
            decode,
            TRAIN_METRICS if train else EVALUATE_METRICS,
            None if consume is None else lambda a, p: consume(a.node, p, a.metrics),
        )
        self.node_history.extend(result.records)
        self.ignored = result.ignored
        self.nodes.uids.update({a.node: a.uid for a in result.accepted if a.uid})
        accepted = [(a.node, a.payload, a.metrics) for a in result.accepted]
        return accepted, result.nbytes, result.rejected

    def _wants_features(self, node: int, server_round: int) -> bool:
        """Whether ``node`` uploads features this round (replay, see ``feature_upload_every``)."""
        if node not in self.server.store or node not in self.feature_round:
            return True
        every = self.feature_upload_every
        return every == 1 or (every > 0 and server_round - self.feature_round[node] >= every)

    def _store(self, node: int, payload: Payload, server_round: int) -> None:
        """Store an accepted train reply: new features, or new logits for stored ones."""
        self.nodes.trained.add(node)
        if payload.has_features:
            self.server.put(node, payload, server_round)
            self.feature_round[node] = server_round
        else:
            self.server.store.set_logits(node, payload.logits)
            self.server.stored_round[node] = server_round

    def _train_server(self, server_round: int, accepted: int) -> tuple[ServerRoundResult, int]:
        """Train the server model on the store (at least ``min_train_replies``); result, evictions."""
        if accepted < self.trust.min_train_replies:
            log(
                WARNING,
                "FedGKT round %d: %d accepted train replies, fewer than the minimum %d: "
                "the server model is not trained this round",
                server_round,
                accepted,
                self.trust.min_train_replies,
            )
            return ServerRoundResult(0.0, 0.0, 0, 0, 0.0), 0
        result = self.server.train_round(lr_scale=self.server_lr_factor(server_round))
        return result, self._book_evictions(server_round)

    def _server_row(
        self, server_round: int, result: ServerRoundResult, nbytes: int
    ) -> dict[str, float]:
        """Return the server-side columns of a train round's row: store, training, bytes."""
        return {
            "store-memory-mb": self.server.store.memory_bytes / MB,
            "store-disk-mb": self.server.store.disk_bytes / MB,
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-examples": result.num_examples,
            "server-lr-factor": self.server_lr_factor(server_round),
            "server-seconds": result.seconds,
            "bytes-up-train": nbytes,
            "bytes-down-train": self._bytes_sent,
        }

    def forget_node(
        self, node: int, server_round: int = 0, why: str = "", status: str = "evicted"
    ) -> None:
        """Drop everything stored for ``node``; with ``why``, log it and book a node-history row."""
        self.server.drop(node)
        self.feature_round.pop(node, None)
        self.gate.forget(node)
        if why:
            log(WARNING, "FedGKT round %d: data of node %d dropped: %s", server_round, node, why)
            row = {"round": server_round, "stage": "train", "node-id": node, "status": status}
            self.node_history.append({**row, "reason": why})

    def _book_evictions(self, server_round: int) -> int:
        """Book the payloads the server's training guard evicted; return how many."""
        evicted, self.server.evicted = self.server.evicted, []
        for node in evicted:
            self.forget_node(
                node, server_round, "its samples made the server loss non-finite or extreme"
            )
        return len(evicted)

    def _drop_silent_nodes(self, server_round: int) -> None:
        """With ``store_max_age``, drop the features of nodes silent for that many rounds."""
        age = self.trust.store_max_age
        if age > 0:
            for node in self.server.evict(server_round - age + 1):
                self.forget_node(node, server_round, f"no reply for {age} rounds", "dropped")

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return everything a resumed run needs.

        The last completed round, the server's state (model, optimizer,
        per-node server logits), the feature shape, the learning-rate
        schedule's position, the RNG states, the round and node histories
        and the nodes' ``node-uid`` and tokens. The stored features are not
        included: nodes send them again.
        """
        shape = self.spec.feature_shape
        return {
            "format": 1,
            "round": self.completed_round,
            "num-rounds": self.num_rounds,
            "server": self.server.state_dict(),
            "feature-shape": list(shape) if shape else None,
            "scheduler": {
                "lr-schedule": self.schedule.lr_schedule,
                "round": self.completed_round,
                "num-rounds": self.num_rounds,
                "next-lr-factor": self.lr_factor(self.completed_round + 1),
                "plateau": self.plateau.state_dict() if self.plateau else None,
            },
            "rng": rng_state(),
            **self.rounds.state_dict(),
            **self.nodes.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the feature store stays empty.

        Raises
        ------
        CheckpointError
            If the state has an unknown format or was written with another
            learning-rate schedule.
        """
        if state.get("format") != 1:
            raise CheckpointError(f"unknown checkpoint format {state.get('format')!r}")
        scheduler, schedule = state["scheduler"], self.schedule.lr_schedule
        if scheduler["lr-schedule"] != schedule:
            raise CheckpointError(
                f"checkpoint was written with lr-schedule "
                f"{scheduler['lr-schedule']!r}, this run uses {schedule!r}"
            )
        self.server.load_state_dict(state["server"])
        if self.plateau is not None and scheduler.get("plateau"):
            self.plateau.load_state_dict(scheduler["plateau"])
        if state["feature-shape"] is not None:
            self.spec = replace(self.spec, feature_shape=tuple(state["feature-shape"]))
        set_rng_state(state["rng"])
        self.rounds.load_state_dict(state)
        self.nodes.load_state_dict(state)
        self.gate.uid_owner = self.nodes.uid_owner()
        self.completed_round = int(state["round"])
        self.feature_round.clear()  # the store is empty: every node sends its features again

    def reidentify_nodes(self, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
        """Find the checkpointed nodes again under their current node ids.

        Every connected node is asked for its ``node-uid``
        (:meth:`NodeRegistry.reidentify`); a node whose uid the checkpoint
        knows under another id, and which holds that id's token, takes over
        that id's server logits ``Z_s``. ``timeout`` bounds both waits: for
        ``min_available_nodes`` nodes to connect (otherwise at most
        ``max(node_wait_timeout, 60)``) and for the replies (at most 60).

        Returns
        -------
        dict[int, int]
            ``{old node id: new node id}`` of the nodes found under a new id;
            empty when the checkpoint knows no ``node-uid``.
        """
        if not self.nodes.uids:
            return {}
        wait = min(timeout, max(self.sampling.node_wait_timeout, 60.0))
        moved = self.nodes.reidentify(grid, self.gate, self.sampling.min_available_nodes, wait)
        if moved:
            server = self.server
            server.logits = {moved.get(n, n): t for n, t in server.logits.items()}
            server.stored_round = {moved.get(n, n): r for n, r in server.stored_round.items()}
        self.gate.uid_owner = self.nodes.uid_owner()
        return moved

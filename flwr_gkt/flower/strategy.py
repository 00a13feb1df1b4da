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
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.server import GKTServer, ServerRoundResult
from flwr_gkt.core.training import Plateau, lr_factor
from flwr_gkt.flower.resume import Resumable
from flwr_gkt.flower.strategy_utils import (
    RoundCallback,
    call_on_round,
    edge_config_record,
    edge_train_metrics,
    evaluate_row,
    log_evaluate_round,
    log_summary,
    log_train_round,
    merge_row,
    progress,
    record_lost_nodes,
    sample_connected,
    sample_trained,
    server_row,
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

__all__ = ["FedGKT", "edge_config_record", "edge_train_metrics", "progress"]


class FedGKT(Resumable, Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) for Flower.

    Before each round, the stored features of the nodes asked for fresh ones
    move to disk until replaced (:meth:`flwr_gkt.core.store.FeatureStore.stage_out`):
    Flower hands over a round's replies together, so old and new would
    otherwise be in memory at once. When every node trains every round
    (``fraction_train=1``), that happens already when the evaluation starts:
    evaluation does not read the stored features, and the round's test
    features arrive together too. After the last round's evaluation they are
    read back (:meth:`~flwr_gkt.core.store.FeatureStore.stage_in`), so the
    store is left as the server trained on it.

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
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds for sampling, as in Flower's ``FedAvg``.
    feature_dtype, logit_dtype : str
        Wire codecs (:mod:`flwr_gkt.wire`): features ``float32``, ``float16``,
        ``int8`` or ``auto`` (each reply float16 when that moves no value by
        more than 2^-25, float32 otherwise:
        :func:`~flwr_gkt.wire.resolve_feature_dtype`);
        logits ``float32`` or ``float16`` (both directions).
    max_samples : int, optional
        Largest number of samples one reply may carry.
    min_train_replies : int
        Fewest accepted train replies for the server model to train in a round
        (otherwise the previous server logits stay in place).
    store_max_age : int
        Rounds a node's stored features stay in use without a fresh reply
        (``0``: forever).
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` before a round goes on with
        the connected nodes (``0``: forever, Flower's behaviour).
    lr_schedule : str
        ``constant``, ``cosine`` (per-round multiplier of the server and edge
        learning rates, :func:`flwr_gkt.core.training.lr_factor`) or ``plateau``
        (the reference's: the server's is cut by ``plateau`` when the test
        accuracy stops improving).
    plateau : Plateau, optional
        The plateau schedule (default: PyTorch's factor 0.1, patience 10).
    feature_upload_every : int
        Replay (EcoFed): nodes upload features every this many rounds and
        logits alone in between (``1``: every round, FedGKT; ``0``: once).
    seed : int
        Seed sent to the nodes for their data shuffling.
    max_payload_bytes : int, optional
        Largest reply (all records); larger ones are rejected undecoded.
    outlier_threshold : float
        Robust deviations from the median beyond which a payload is rejected
        (:mod:`flwr_gkt.core.robust`); ``0``: off.
    logit_clip : float
        Client logits are clipped to ``[-logit_clip, logit_clip]`` (``0``: off).
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
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        feature_dtype: str = "float32",
        logit_dtype: str = "float32",
        max_samples: int | None = None,
        min_train_replies: int = 1,
        store_max_age: int = 0,
        node_wait_timeout: float = 0.0,
        lr_schedule: str = "constant",
        plateau: Plateau | None = None,
        feature_upload_every: int = 1,
        seed: int = 0,
        max_payload_bytes: int | None = None,
        outlier_threshold: float = 10.0,
        logit_clip: float = 0.0,
        checkpoint_path: str | Path | None = None,
        on_round: RoundCallback | None = None,
    ) -> None:
        self.server = server
        self.on_round = on_round
        self.spec = PayloadSpec(num_classes, feature_shape, max_samples)
        self.edge_config = edge_config or EdgeRoundConfig(kd_mode=server.kd_mode)
        self.fraction_train = fraction_train
        self.fraction_evaluate = fraction_evaluate
        self.min_train_nodes = min_train_nodes
        self.min_evaluate_nodes = min_evaluate_nodes
        self.min_available_nodes = min_available_nodes
        self.feature_dtype = feature_dtype
        self.logit_dtype = logit_dtype
        self.min_train_replies = min_train_replies
        self.store_max_age = store_max_age
        self.node_wait_timeout = node_wait_timeout
        self.seed = seed
        if feature_upload_every < 0:
            raise ValueError("feature_upload_every must be >= 0")
        self.feature_upload_every = feature_upload_every
        if feature_upload_every != 1:  # replay: Z_c must come from the stored features' inputs
            self.edge_config = replace(self.edge_config, extract_augment=False)
        #: Round in which each node's stored features were uploaded.
        self.feature_round: dict[int, int] = {}
        self.lr_schedule = lr_schedule
        lr_factor(lr_schedule, 1, 1)  # raises on an unknown schedule
        self.plateau = (plateau or Plateau()) if lr_schedule == "plateau" else None
        #: Nodes with an accepted train reply: the only ones asked to evaluate.
        self.trained_nodes: set[int] = set()
        self.num_rounds = 0
        #: Nodes whose features went to disk when the current evaluation started.
        self._staged_at_eval: list[int] = []
        #: One dict per round: metrics, bytes and times (also written to CSV).
        self.history: list[dict[str, float]] = []
        #: One dict per node and stage per round: accepted or why not, samples,
        #: bytes, edge metrics -- lost nodes included.
        self.node_history: list[dict[str, Any]] = []
        self._sent_train: list[Message] = []
        #: Whether the latest train instruction to each node asked for features.
        self._features_asked: dict[int, bool] = {}
        self._sent_eval: list[Message] = []
        self._round_start = 0.0
        #: When the latest stage's instructions were handed to the Grid.
        self._sent_at = 0.0
        self.run_start = time.perf_counter()
        self._bytes_sent = 0
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        #: The trust boundary every reply passes (see :mod:`flwr_gkt.wire.gate`).
        self.gate = ReplyGate(max_payload_bytes, outlier_threshold, logit_clip)
        #: Stable identity (``node-uid``) each node id sent with its replies.
        self.node_uids: dict[int, str] = {}
        # Flower's node ids are random per run: train on the nodes in the order of
        # their identities, so that a seed reproduces a run
        server.node_key = lambda node: (self.node_uids.get(node, ""), node)
        #: Secret token each node gets with its first instruction; a resumed
        #: run hands a node's state back only to the node holding it.
        self.node_tokens: dict[int, str] = {}
        #: Replies of the latest ``_accept`` ignored as ``late`` or ``duplicate``.
        self.ignored: Counter[str] = Counter()
        #: Last round that ran to its end (training and evaluation).
        self.completed_round = 0

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the round config and its own server logits (Algorithm 1, line 3).

        The config: the edge settings (lr scaled by the schedule), wire dtypes
        and seed, then ``config``'s entries, ``server-round`` and the node's
        token; ``send-features = False`` when the node need not upload its
        features (replay). ``Z_s`` travels only when the edge distils from it.
        ``arrays`` (the server model's weights) is not sent.
        """
        self._round_start = time.perf_counter()
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        round_config = edge_config_record(
            self.edge_config,
            **{"feature-dtype": self.feature_dtype, "logit-dtype": self.logit_dtype},
            seed=self.seed,
        )
        round_config["lr"] = self.edge_config.lr * self.lr_factor(server_round)
        round_config.update(config)
        round_config["server-round"] = server_round
        messages = []
        for node in node_ids:
            token = self.node_tokens.setdefault(node, secrets.token_hex(16))
            node_config = ConfigRecord({**round_config, NODE_TOKEN: token})
            self._features_asked[node] = self._wants_features(node, server_round)
            if not self._features_asked[node]:
                node_config["send-features"] = False
            content = RecordDict({CONFIG_KEY: node_config})
            distills = self.edge_config.kd_mode.edge_distills
            logits = self.server.server_logits(node) if distills else None
            if logits is not None:
                content[ARRAYS_KEY] = encode_server_logits(logits, self.logit_dtype)
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        if self.stage_out:  # the replies arrive together: the features they replace wait on disk
            self.server.store.stage_out(n for n in node_ids if self._features_asked[n])
        self._bytes_sent = sum(record_nbytes(m.content) for m in messages)
        self._sent_train = messages
        self._sent_at = time.perf_counter()
        return messages

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
        wait = time.perf_counter() - self._sent_at
        sent_features = 0

        def store(node: int, payload: Payload, _: Mapping[str, float]) -> None:
            nonlocal sent_features
            sent_features += payload.has_features
            self._store(node, payload, server_round)

        accepted, nbytes, rejected = self._accept(server_round, replies, True, store)
        row: dict[str, float] = {
            "round": server_round,
            "nodes-replied": len(accepted),
            "nodes-rejected": rejected,
            "nodes-lost": self._lost_nodes(server_round, "train"),
            "nodes-evicted": 0,
            "replies-late": self.ignored.get("late", 0),
            "replies-duplicate": self.ignored.get("duplicate", 0),
            "nodes-sent-features": sent_features,
            "train-wait-seconds": wait,
        }
        self._drop_silent_nodes(server_round)
        result = ServerRoundResult(0.0, 0.0, 0, 0, 0.0)
        if len(accepted) >= self.min_train_replies:
            result = self.server.train_round(lr_scale=self.server_lr_factor(server_round))
            row["nodes-evicted"] = self._book_evictions(server_round)
        else:
            log(
                WARNING,
                "FedGKT round %d: %d accepted train replies, fewer than the minimum %d: "
                "the server model is not trained this round",
                server_round,
                len(accepted),
                self.min_train_replies,
            )
        row |= server_row(self, server_round, result, nbytes, self._bytes_sent)
        row |= edge_train_metrics([(scalar(m, NUM_EXAMPLES), m) for *_, m in accepted])
        self.history.append(row)
        log_train_round(server_round, row)
        weights = ArrayRecord(self.server.model.state_dict()) if result.num_examples else None
        return weights, MetricRecord({k: float(v) for k, v in row.items()})

    # --------------------------------------------------------------- evaluate
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Ask sampled nodes for the features of their local test split.

        Only nodes whose edge model has trained are sampled
        (:attr:`trained_nodes`). The config: batch size, feature dtype and
        precision, then ``config``'s entries and ``server-round``.
        """
        node_ids = self._eval_nodes(grid)
        if self.stage_out and self.fraction_train >= 1.0:
            # the next round asks these nodes again: their features wait on disk from now
            nxt = server_round + 1
            staged = [n for n in self.server.store if self._wants_features(n, nxt)]
            self.server.store.stage_out(staged)
            self._staged_at_eval = staged
        eval_config = ConfigRecord(
            {
                "batch-size": self.edge_config.batch_size,
                "feature-dtype": self.feature_dtype,
                "precision": self.edge_config.precision,
            }
        )
        eval_config.update(config)
        eval_config["server-round"] = server_round
        self._sent_eval = [
            Message(
                RecordDict({CONFIG_KEY: eval_config}),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in node_ids
        ]
        self._sent_at = time.perf_counter()
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
        wait = time.perf_counter() - self._sent_at
        sums = dict.fromkeys(("loss", "correct", "n", "edge-correct", "edge-loss"), 0.0)

        def evaluate(node: int, payload: Payload, metrics: Mapping[str, float]) -> None:
            loss_sum, correct = self.server.evaluate(payload.dense_features(), payload.labels)
            if not math.isfinite(loss_sum):
                raise PayloadError("its features make the server's loss non-finite")
            n = len(payload)
            sums["loss"] += loss_sum
            sums["correct"] += correct
            sums["n"] += n
            sums["edge-correct"] += scalar(metrics, "edge-accuracy", 0.0) * n
            sums["edge-loss"] += scalar(metrics, "edge-loss", 0.0) * n

        accepted, nbytes, rejected = self._accept(server_round, replies, False, evaluate)
        self._lost_nodes(server_round, "evaluate")
        if server_round >= self.num_rounds:  # no next round: the store is left as trained on
            self.server.store.stage_in(self._staged_at_eval)
        self._staged_at_eval = []
        if not accepted:
            return None
        metrics = evaluate_row(sums, len(accepted), rejected, sum(self.ignored.values()), nbytes)
        metrics["eval-wait-seconds"] = wait
        metrics["round-seconds"] = time.perf_counter() - self._round_start
        merge_row(self.history, server_round, metrics)
        if self.plateau is not None:  # the reference steps its scheduler with the test accuracy
            self.plateau.step(float(metrics["accuracy"]))
        elapsed = time.perf_counter() - self.run_start
        log_evaluate_round(server_round, metrics, progress(server_round, self.num_rounds, elapsed))
        return MetricRecord(dict(metrics))

    # ------------------------------------------------------------------ helpers
    def initial_arrays(self) -> ArrayRecord:
        """Return the server model's current weights (its ``state_dict``), to pass to :meth:`start`."""
        return ArrayRecord(self.server.model.state_dict())

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log_summary(self)

    def round_done(self, server_round: int) -> None:
        """Hand a completed round's row and node records to :attr:`on_round`, if set."""
        call_on_round(self.on_round, self.history, self.node_history, server_round)

    def lr_factor(self, server_round: int) -> float:
        """Return the schedule's learning-rate multiplier of ``server_round``."""
        return lr_factor(self.lr_schedule, server_round, max(self.num_rounds, server_round))

    def server_lr_factor(self, server_round: int) -> float:
        """Return the server learning-rate multiplier: the plateau's, else the schedule's."""
        return self.plateau.factor if self.plateau else self.lr_factor(server_round)

    def _sample(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        return sample_connected(
            grid, fraction, min_nodes, self.min_available_nodes, self.node_wait_timeout
        )

    def _eval_nodes(self, grid: Grid) -> list[int]:
        """Sample the evaluation nodes among the connected nodes that have trained."""
        if self.fraction_evaluate == 0.0:
            return []
        connected = self._sample(grid, 1.0, self.min_evaluate_nodes)
        # resumed nodes have trained when the server holds their Z_s
        trained = [n for n in connected if n in self.trained_nodes or n in self.server.logits]
        rng = random.Random(self.seed * 7919 + len(self.history))
        return sample_trained(
            connected, trained, self.fraction_evaluate, self.min_evaluate_nodes, rng
        )

    def _accept(
        self,
        server_round: int,
        replies: Iterable[Message],
        with_logits: bool,
        consume: Callable[[int, Payload, Mapping[str, float]], None] | None = None,
    ) -> tuple[list[tuple[int, Payload | None, dict[str, float]]], int, int]:
        """Pass a stage's replies through the gate; return accepted ones, bytes and rejects.

        :class:`~flwr_gkt.wire.gate.ReplyGate` checks everything a node sent;
        this method books the result (node-history rows, ignored counts, node
        uids). With ``consume`` each accepted payload is handed over at once
        and the list holds ``None`` in its place.
        """

        def decode(node: int, content: RecordDict) -> Payload:
            if with_logits and not self._features_asked.get(node, True):
                if node not in self.server.store:
                    raise PayloadError("logits-only reply but no features stored for this node")
                n = self.server.store.num_samples(node)
                return Payload.logits_only(decode_logits(content, self.spec, n))
            if self.spec.feature_shape is None:
                raise PayloadError("no feature shape agreed by a majority of the nodes yet")
            return decode_payload(content, self.spec, with_logits)

        replies = list(replies)
        if self.spec.feature_shape is None and with_logits:  # the majority fixes it, not the first
            shape = self.gate.vote_feature_shape(replies)
            if shape is not None:
                self.spec = replace(self.spec, feature_shape=shape)
                log(INFO, "FedGKT: feature maps of shape %s (held by most nodes)", list(shape))
        result = self.gate.admit(
            server_round,
            "train" if with_logits else "evaluate",
            replies,
            self._sent_train if with_logits else self._sent_eval,
            decode,
            TRAIN_METRICS if with_logits else EVALUATE_METRICS,
            None if consume is None else lambda a, p: consume(a.node, p, a.metrics),
        )
        self.node_history.extend(result.records)
        self.ignored = result.ignored
        self.node_uids.update({a.node: a.uid for a in result.accepted if a.uid})
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
        self.trained_nodes.add(node)
        if payload.has_features:
            self.server.put(node, payload, server_round)
            self.feature_round[node] = server_round
        else:
            self.server.store.set_logits(node, payload.logits)
            self.server.stored_round[node] = server_round

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
        if self.store_max_age > 0:
            for node in self.server.evict(server_round - self.store_max_age + 1):
                why = f"no reply for {self.store_max_age} rounds"
                self.forget_node(node, server_round, why, "dropped")

    def _lost_nodes(self, server_round: int, stage: str) -> int:
        sent = self._sent_train if stage == "train" else self._sent_eval
        return record_lost_nodes(self.node_history, sent, server_round, stage)

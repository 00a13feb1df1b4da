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
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info, sample_nodes
from flwr.supercore import log

from flwr_gkt.core.checkpoint import (
    CheckpointError,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.core.server import GKTServer, ServerRoundResult
from flwr_gkt.core.training import Plateau, lr_factor
from flwr_gkt.wire import (
    ARRAYS_KEY,
    CONFIG_KEY,
    NODE_TOKEN,
    NODE_UID,
    NUM_EXAMPLES,
    Payload,
    PayloadError,
    PayloadSpec,
    decode_logits,
    decode_payload,
    encode_server_logits,
    record_nbytes,
    scalar,
    settings_record,
)
from flwr_gkt.wire.gate import EVALUATE_METRICS, TRAIN_METRICS, ReplyGate

__all__ = ["FedGKT", "edge_train_metrics", "progress"]

_MB = 1024 * 1024


def progress(server_round: int, num_rounds: int, elapsed: float) -> str:
    """Format a progress note for long runs.

    Parameters
    ----------
    server_round : int
        The round that just ended.
    num_rounds : int
        Total number of rounds; ``0`` or less when unknown (no estimate of the
        time left is given then).
    elapsed : float
        Seconds since the run started.

    Returns
    -------
    str
        For example ``"round 3/10, 42s elapsed, ~98s left"``; the time left is
        extrapolated from the mean time per round so far.
    """
    if num_rounds <= 0:
        return f"round {server_round}, {elapsed:.0f}s elapsed"
    left = elapsed / max(server_round, 1) * max(num_rounds - server_round, 0)
    return f"round {server_round}/{num_rounds}, {elapsed:.0f}s elapsed, ~{left:.0f}s left"


def edge_train_metrics(replies: Iterable[tuple[float, MetricRecord]]) -> dict[str, float]:
    """Summarise the edge side of a round's train replies.

    Parameters
    ----------
    replies : Iterable[tuple[float, MetricRecord]]
        ``(num_examples, metrics)`` of each accepted reply.

    Returns
    -------
    dict[str, float]
        ``edge-train-loss`` / ``edge-train-accuracy`` weighted by the examples
        (absent when no examples were reported), ``edge-seconds-max`` and
        ``edge-seconds-mean``.
    """
    replies = list(replies)
    row: dict[str, float] = {}
    n_edge = sum(size for size, _ in replies)
    for key in ("edge-train-loss", "edge-train-accuracy"):
        if n_edge:
            row[key] = sum(scalar(m, key) * size for size, m in replies if key in m) / n_edge
    seconds = [scalar(m, "edge-seconds", 0.0) for _, m in replies]
    row["edge-seconds-max"] = max(seconds, default=0.0)
    row["edge-seconds-mean"] = sum(seconds) / max(len(seconds), 1)
    return row


def edge_config_record(cfg: EdgeRoundConfig, **extra: Any) -> ConfigRecord:
    """Build the ConfigRecord of edge settings sent with each train instruction.

    Parameters
    ----------
    cfg : EdgeRoundConfig
        The edge settings; each field ``a_b`` becomes the key ``a-b`` and the
        KD mode is sent as its string value.
    **extra : Any
        Further entries, added as given (they override the settings' keys).

    Returns
    -------
    ConfigRecord
        The record sent to the nodes.
    """
    return settings_record(cfg, **extra)


class FedGKT(Strategy):
    """Group Knowledge Transfer (He et al., NeurIPS 2020) for Flower.

    Parameters
    ----------
    server : GKTServer
        Server model, optimizer and feature store; trained in ``aggregate_train``.
    num_classes : int
        Number of classes (validates logits and labels).
    feature_shape : tuple[int, int, int], optional
        Expected ``(C, H, W)`` of a feature map. When ``None``, the shape a
        strict majority of a round's train replies carry fixes it (replies
        are rejected until there is one); never the first reply alone.
    edge_config : EdgeRoundConfig, optional
        Settings sent to the nodes each round (epochs ``E_c``, optimizer, lr,
        temperature, alpha, KD mode, batch size). Entries of the ``train_config``
        given to :meth:`start` override them.
    fraction_train, fraction_evaluate : float
        Fraction of connected nodes sampled for training / evaluation.
    min_train_nodes, min_evaluate_nodes, min_available_nodes : int
        Lower bounds for sampling, as in Flower's ``FedAvg``.
    feature_dtype : str
        Codec the nodes use for features on the wire: ``float32``, ``float16``
        or ``int8`` (per-channel affine quantization, see :mod:`flwr_gkt.wire`).
    logit_dtype : str
        Dtype of logits on the wire, both directions (``float32``/``float16``).
    max_samples : int, optional
        Largest number of samples one reply may carry.
    min_train_replies : int
        Fewest accepted train replies for the server model to train in a round;
        with fewer (nodes lost, rejected), the round ends without server training
        and the previous server logits stay in place.
    store_max_age : int
        Rounds a node's stored features stay in use without a fresh reply
        (``0``: forever). Drops the data of nodes that left, or that rejoined
        under a new node id.
    node_wait_timeout : float
        Seconds to wait for ``min_available_nodes`` connected nodes before a
        round; after that the round goes on with the nodes that are connected
        (at least one), with a warning. ``0`` waits forever (Flower's behaviour).
    lr_schedule : str
        ``constant`` or ``cosine``: per-round learning-rate multiplier applied to
        the server and the edge learning rates (see
        :func:`flwr_gkt.core.training.lr_factor`); needs the number of rounds, taken
        from :meth:`start`. ``plateau`` (the reference's): the edge learning
        rate stays constant, the server's is reduced by ``plateau`` when the
        round's test accuracy stops improving.
    plateau : Plateau, optional
        The reduce-on-plateau schedule of ``lr_schedule="plateau"`` (default:
        PyTorch's factor 0.1, patience 10).
    feature_upload_every : int
        Replay (EcoFed): a node uploads its features only every this many
        rounds; in the rounds between, it sends its logits ``Z_c`` alone and
        the server goes on training on the features it stored. ``1``: every
        round (FedGKT); ``0``: once (frozen extractor: features never change).
        A node whose features the server does not hold is always asked for them.
    seed : int
        Seed sent to the nodes for their data shuffling.
    max_payload_bytes : int, optional
        Largest serialized size of one reply's arrays; larger replies are
        rejected before they are decoded.
    outlier_threshold : float
        Robust check of each round's payloads against each other (see
        :mod:`flwr_gkt.core.robust`): a reply whose feature or logit scale is more
        than this many robust deviations from the round's median is rejected;
        needs 3 or more replies. ``0`` turns the check off.
    logit_clip : float
        Client logits are clipped to ``[-logit_clip, logit_clip]`` before the
        server distils from them; ``0``: not clipped.
    checkpoint_path : str or Path, optional
        Where to write a checkpoint after every completed round (atomically,
        see :mod:`flwr_gkt.core.checkpoint`); :meth:`resume` reads it back.
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
        #: Nodes whose edge model has trained (an accepted train reply): the
        #: only ones asked to evaluate -- a node never sampled for training
        #: would send features of an untrained extractor.
        self.trained_nodes: set[int] = set()
        self.num_rounds = 0
        #: One dict per round: metrics, bytes and times (also written to CSV).
        self.history: list[dict[str, float]] = []
        #: One dict per node and stage per round: node id, accepted or why not,
        #: samples, bytes, edge metrics -- which node did what, lost nodes included.
        self.node_history: list[dict[str, Any]] = []
        self._sent_train: list[Message] = []
        #: Whether the latest train instruction to each node asked for features.
        self._features_asked: dict[int, bool] = {}
        self._sent_eval: list[Message] = []
        self._round_start = 0.0
        self._run_start = time.perf_counter()
        self._bytes_sent = 0
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        #: The trust boundary every reply passes (see :mod:`flwr_gkt.wire.gate`).
        self.gate = ReplyGate(max_payload_bytes, outlier_threshold, logit_clip)
        #: Stable identity (``node-uid``) each node id sent with its replies.
        self.node_uids: dict[int, str] = {}
        #: Secret token given to each node with its first instruction; a resumed
        #: run hands a node's state back only to the node holding it.
        self.node_tokens: dict[int, str] = {}
        #: Replies of the latest ``_accept`` ignored as ``late`` or ``duplicate``.
        self.ignored: Counter[str] = Counter()
        #: Last round that ran to its end (training and evaluation).
        self.completed_round = 0

    # ------------------------------------------------------------------ helpers
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run rounds ``completed_round + 1 .. num_rounds`` (see :meth:`Strategy.start`).

        The same loop as Flower's (train, evaluate, centralized evaluation), but
        it starts after the last completed round -- ``1`` unless :meth:`resume`
        loaded a checkpoint -- and writes a checkpoint at the end of every round
        when ``checkpoint_path`` is set. A resumed run first finds the
        checkpointed nodes again (:meth:`reidentify_nodes`) and starts from the
        restored server model's weights instead of ``initial_arrays``.

        Parameters
        ----------
        grid : Grid
            The Grid used to send messages to and receive replies from the nodes.
        initial_arrays : ArrayRecord
            Initial server model weights (see :meth:`initial_arrays`); nodes
            never receive them, they are what ``evaluate_fn`` gets in round 0.
        num_rounds : int
            Total number of rounds, the resumed ones included; also sets the
            length of the learning-rate schedule.
        timeout : float
            Seconds to wait for the replies of each train / evaluate stage.
        train_config : ConfigRecord, optional
            Entries added to every train instruction, over the edge settings.
            If unset, an empty ConfigRecord is used.
        evaluate_config : ConfigRecord, optional
            Entries added to every evaluate instruction. If unset, an empty
            ConfigRecord is used.
        evaluate_fn : Callable[[int, ArrayRecord], MetricRecord | None], optional
            Centralized evaluation of the server model weights; called before
            the first round (not on a resumed run) and after each round.

        Returns
        -------
        Result
            The final server model weights and the train, evaluate and
            centralized-evaluation metrics of the rounds run by this call.
        """
        self.num_rounds = num_rounds
        self._run_start = time.perf_counter()
        log(INFO, "Starting %s strategy:", self.__class__.__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        arrays = initial_arrays
        first = self.completed_round + 1
        if first > 1:
            log(INFO, "FedGKT: resuming after round %d of %d", self.completed_round, num_rounds)
            arrays = ArrayRecord(self.server.model.state_dict())
            self.reidentify_nodes(grid, timeout)
        elif evaluate_fn and (res := evaluate_fn(0, initial_arrays)) is not None:
            result.evaluate_metrics_serverapp[0] = res
        for server_round in range(first, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            replies = grid.send_and_receive(
                messages=self.configure_train(server_round, arrays, train_config, grid),
                timeout=timeout,
            )
            agg_arrays, train_metrics = self.aggregate_train(server_round, replies)
            del replies
            if agg_arrays is not None:
                result.arrays = arrays = agg_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[server_round] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(server_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            eval_metrics = self.aggregate_evaluate(server_round, replies)
            del replies
            if eval_metrics is not None:
                result.evaluate_metrics_clientapp[server_round] = eval_metrics
            if evaluate_fn and (res := evaluate_fn(server_round, arrays)) is not None:
                result.evaluate_metrics_serverapp[server_round] = res
            self.completed_round = server_round
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, self.state_dict())
        log(INFO, "Strategy execution finished in %.2fs", time.perf_counter() - self._run_start)
        return result

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Return everything a resumed run needs.

        Returns
        -------
        dict[str, Any]
            The last completed round, the server's state (model, optimizer,
            per-node server logits), the feature shape, the learning-rate
            schedule's position, the RNG states, the round and node histories
            and the nodes' ``node-uid`` (see :meth:`load_state_dict`). The
            stored features are not included: nodes send them again.
        """
        return {
            "format": 1,
            "round": self.completed_round,
            "num-rounds": self.num_rounds,
            "server": self.server.state_dict(),
            "feature-shape": list(self.spec.feature_shape) if self.spec.feature_shape else None,
            "scheduler": {
                "lr-schedule": self.lr_schedule,
                "round": self.completed_round,
                "num-rounds": self.num_rounds,
                "next-lr-factor": self._lr_factor(self.completed_round + 1),
                "plateau": self.plateau.state_dict() if self.plateau else None,
            },
            "rng": rng_state(),
            "history": self.history,
            "node-history": self.node_history,
            "node-uids": dict(self.node_uids),
            "node-tokens": dict(self.node_tokens),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned.

        The feature store stays empty: every node is asked for its features
        again in its next train round.

        Parameters
        ----------
        state : dict[str, Any]
            A state returned by :meth:`state_dict` (e.g. read back by
            :func:`flwr_gkt.core.checkpoint.load_checkpoint`).

        Raises
        ------
        CheckpointError
            If the state has an unknown format or was written with another
            learning-rate schedule.
        """
        if state.get("format") != 1:
            raise CheckpointError(f"unknown checkpoint format {state.get('format')!r}")
        if state["scheduler"]["lr-schedule"] != self.lr_schedule:
            raise CheckpointError(
                f"checkpoint was written with lr-schedule "
                f"{state['scheduler']['lr-schedule']!r}, this run uses {self.lr_schedule!r}"
            )
        self.server.load_state_dict(state["server"])
        if self.plateau is not None and state["scheduler"].get("plateau"):
            self.plateau.load_state_dict(state["scheduler"]["plateau"])
        if state["feature-shape"] is not None:
            self.spec = replace(self.spec, feature_shape=tuple(state["feature-shape"]))
        set_rng_state(state["rng"])
        self.history = list(state["history"])
        self.node_history = list(state["node-history"])
        self.completed_round = int(state["round"])
        self.node_uids = {int(n): str(u) for n, u in state.get("node-uids", {}).items()}
        self.node_tokens = {int(n): str(t) for n, t in state.get("node-tokens", {}).items()}
        self.gate.uid_owner = {uid: node for node, uid in self.node_uids.items()}
        self.feature_round.clear()  # the store is empty: every node sends its features again

    def reidentify_nodes(self, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
        """Find the checkpointed nodes again under their current node ids.

        Node ids are not stable across restarts (a Ray simulation draws new
        ones; a SuperNode that re-registers may get a new one). Every connected
        node is asked for its ``node-uid`` (a ``query`` message, see
        :func:`flwr_gkt.flower.client_app.handle_query`); a node whose uid the
        checkpoint knows under another id takes over that id's per-node state
        (server logits ``Z_s``). Nodes that do not answer, and uids that are
        not unique, keep nothing.

        Parameters
        ----------
        grid : Grid
            The Grid used to list the connected nodes and query them.
        timeout : float
            Upper bound, in seconds, on each of the two waits: for
            ``min_available_nodes`` nodes to connect (otherwise at most
            ``max(node_wait_timeout, 60)``), and for the query replies
            (otherwise at most 60).

        Returns
        -------
        dict[int, int]
            ``{old node id: new node id}`` of the nodes found under a new id;
            empty when the checkpoint knows no ``node-uid``.
        """
        if not self.node_uids:
            return {}
        deadline = time.monotonic() + min(timeout, max(self.node_wait_timeout, 60.0))
        while (
            len(ids := sorted(grid.get_node_ids())) < self.min_available_nodes
            and time.monotonic() < deadline
        ):
            time.sleep(1.0)
        query = ConfigRecord({"query": NODE_UID})
        messages = [
            Message(RecordDict({CONFIG_KEY: query}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in ids
        ]
        found: dict[str, list[tuple[int, str | None]]] = {}
        for claim in self.gate.identities(
            grid.send_and_receive(messages, timeout=min(timeout, 60.0))
        ):
            found.setdefault(claim.uid, []).append((claim.node, claim.token))
        known: dict[str, list[int]] = {}
        for node, uid in self.node_uids.items():
            known.setdefault(uid, []).append(node)
        mapping, ambiguous, refused = {}, 0, 0
        for uid, olds in known.items():
            news = found.get(uid, [])
            if len(olds) == 1 and len(news) == 1:
                new, token = news[0]
                # a bare uid claim is not enough: the node must hold the token it was given
                if self.node_tokens.get(olds[0]) not in (None, token):
                    refused += 1
                    log(
                        WARNING,
                        "FedGKT: node %d claims node-uid %s without its token: it gets no state",
                        new,
                        uid,
                    )
                    continue
                mapping[olds[0]] = new
            elif news:
                ambiguous += 1
        moved = {old: new for old, new in mapping.items() if old != new}
        if moved:
            server = self.server
            server.logits = {moved.get(n, n): t for n, t in server.logits.items()}
            server.stored_round = {moved.get(n, n): r for n, r in server.stored_round.items()}
            self.node_uids = {moved.get(n, n): u for n, u in self.node_uids.items()}
            self.node_tokens = {moved.get(n, n): t for n, t in self.node_tokens.items()}
        self.gate.uid_owner = {uid: node for node, uid in self.node_uids.items()}
        log(
            INFO,
            "FedGKT: %d of %d checkpointed nodes found (%d under a new node id), %d uid(s) "
            "ambiguous, %d claim(s) without the node's token refused",
            len(mapping),
            len(self.node_uids),
            len(moved),
            ambiguous,
            refused,
        )
        return moved

    def resume(self, path: str | Path | None = None) -> int:
        """Load the checkpoint at ``path`` and return its round.

        Call it before :meth:`start`, which then goes on after that round.

        Parameters
        ----------
        path : str or Path, optional
            The checkpoint file; defaults to ``checkpoint_path``.

        Returns
        -------
        int
            The last completed round of the checkpoint; ``0`` when there is
            none (or no path): the run starts from the beginning.

        Raises
        ------
        CheckpointError
            If the checkpoint cannot be read or does not fit this strategy
            (see :meth:`load_state_dict`).
        """
        path = Path(path) if path else self.checkpoint_path
        state = load_checkpoint(path) if path else None
        if state is None:
            log(INFO, "FedGKT: no checkpoint at %s, starting from round 1", path)
            return 0
        self.load_state_dict(state)
        log(
            INFO,
            "FedGKT: resumed from %s after round %d (%d nodes with server logits)",
            path,
            self.completed_round,
            len(self.server.logits),
        )
        return self.completed_round

    def _lr_factor(self, server_round: int) -> float:
        return lr_factor(self.lr_schedule, server_round, max(self.num_rounds, server_round))

    def _server_lr_factor(self, server_round: int) -> float:
        """Return the server learning-rate multiplier: the plateau's, else the schedule's."""
        return self.plateau.factor if self.plateau else self._lr_factor(server_round)

    def _has_trained(self, node: int) -> bool:
        """Whether ``node``'s edge model has trained (resumed nodes: it has ``Z_s``)."""
        return node in self.trained_nodes or node in self.server.logits

    def _eval_nodes(self, grid: Grid) -> list[int]:
        """Sample the evaluation nodes among the connected nodes that have trained."""
        if self.fraction_evaluate == 0.0:
            return []
        connected = self._sample(grid, 1.0, self.min_evaluate_nodes)
        trained = [n for n in connected if self._has_trained(n)]
        if len(trained) < len(connected):
            log(
                INFO,
                "FedGKT: %d connected node(s) not evaluated: their edge model has not trained yet",
                len(connected) - len(trained),
            )
        want = max(int(len(trained) * self.fraction_evaluate), self.min_evaluate_nodes)
        if want >= len(trained):
            return trained
        rng = random.Random(self.seed * 7919 + len(self.history))
        return sorted(rng.sample(trained, want))

    def initial_arrays(self) -> ArrayRecord:
        """Return the server model's current weights, to pass to :meth:`start`.

        Returns
        -------
        ArrayRecord
            The server model's ``state_dict``.
        """
        return ArrayRecord(self.server.model.state_dict())

    def summary(self) -> None:
        """Log the strategy's configuration."""
        log(
            INFO,
            "\t├──> FedGKT: server model %s on %s",
            type(self.server.model).__name__,
            self.server.device,
        )
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
        wanted = self.min_available_nodes
        if self.node_wait_timeout > 0:
            deadline = time.monotonic() + self.node_wait_timeout
            while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
                time.sleep(min(1.0, self.node_wait_timeout))
            connected = len(list(grid.get_node_ids()))
            if connected < wanted:
                log(
                    WARNING,
                    "FedGKT: %d node(s) connected after %.0fs, fewer than the %d wanted; "
                    "going on with them",
                    connected,
                    self.node_wait_timeout,
                    wanted,
                )
                wanted = max(connected, 1)
                min_nodes = min(min_nodes, wanted)
        num_nodes = int(len(list(grid.get_node_ids())) * fraction)
        node_ids, _ = sample_nodes(grid, wanted, max(num_nodes, min_nodes))
        return sorted(node_ids)

    def _accept(
        self,
        server_round: int,
        replies: Iterable[Message],
        with_logits: bool,
        consume: Callable[[int, Payload, Mapping[str, float]], None] | None = None,
    ) -> tuple[list[tuple[int, Payload | None, dict[str, float]]], int, int]:
        """Pass a stage's replies through the gate; return accepted ones, bytes and rejects.

        Everything a node sent is checked by :class:`flwr_gkt.wire.gate.ReplyGate`
        (attribution, errors, size of all records, metric schema, node-uid,
        wire validation, outlier check); this method only books the result:
        node-history rows, ignored counts, node uids. With ``consume`` each
        accepted payload is handed over at once and the list holds ``None``
        in its place (one decoded reply at a time).
        """
        stage = "train" if with_logits else "evaluate"

        def decode(node: int, content: RecordDict) -> Payload:
            if with_logits and not self._features_asked.get(node, True):
                if node not in self.server.store:
                    raise PayloadError("logits-only reply but no features stored for this node")
                return Payload.logits_only(
                    decode_logits(content, self.spec, self.server.store.num_samples(node))
                )
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
            stage,
            replies,
            self._sent_train if with_logits else self._sent_eval,
            decode,
            TRAIN_METRICS if with_logits else EVALUATE_METRICS,
            None if consume is None else lambda a, p: consume(a.node, p, a.metrics),
        )
        self.node_history.extend(result.records)
        self.ignored = result.ignored
        for admitted in result.accepted:
            if admitted.uid:
                self.node_uids[admitted.node] = admitted.uid
        accepted = [(a.node, a.payload, a.metrics) for a in result.accepted]
        return accepted, result.nbytes, result.rejected

    def _wants_features(self, node: int, server_round: int) -> bool:
        """Whether ``node`` uploads features this round (replay, see ``feature_upload_every``)."""
        if node not in self.server.store or node not in self.feature_round:
            return True
        every = self.feature_upload_every
        if every == 1:
            return True
        return every > 0 and server_round - self.feature_round[node] >= every

    def _store(self, node: int, payload: Payload, server_round: int) -> None:
        """Store an accepted train reply: new features, or new logits for stored ones."""
        self.trained_nodes.add(node)
        if payload.has_features:
            self.server.put(node, payload, server_round)
            self.feature_round[node] = server_round
        else:
            self.server.store.set_logits(node, payload.logits)
            self.server.stored_round[node] = server_round

    def forget_node(self, node: int) -> None:
        """Drop everything stored for ``node`` (its features, ``Z_s``, statistics)."""
        self.server.drop(node)
        self.feature_round.pop(node, None)
        self.gate.forget(node)

    def _book_evictions(self, server_round: int) -> int:
        """Record the payloads the server's training guard evicted; return how many."""
        evicted, self.server.evicted = self.server.evicted, []
        for node in evicted:
            self.feature_round.pop(node, None)
            self.gate.forget(node)
            self.node_history.append(
                {
                    "round": server_round,
                    "stage": "train",
                    "node-id": node,
                    "status": "evicted",
                    "reason": "its stored samples made the server loss non-finite or extreme",
                }
            )
        return len(evicted)

    def _lost_nodes(self, server_round: int, stage: str) -> int:
        """Record and log nodes that were sent an instruction but have no record this round."""
        answered = set()
        for record in reversed(self.node_history):  # this round's records are the newest
            if record["round"] != server_round:
                break
            if record["stage"] == stage and record.get("status") not in ("late", "duplicate"):
                answered.add(record["node-id"])
        sent = self._sent_train if stage == "train" else self._sent_eval
        lost = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
        for node in lost:
            self.node_history.append(
                {
                    "round": server_round,
                    "stage": stage,
                    "node-id": node,
                    "status": "lost",
                    "reason": "no reply before the round timeout",
                }
            )
            log(
                WARNING,
                "FedGKT round %d: node %d did not reply to the %s instruction (lost)",
                server_round,
                node,
                stage,
            )
        return len(lost)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Send each sampled node the round config and its own server logits.

        The config holds the edge settings (learning rate scaled by the
        schedule), the wire dtypes and the seed, then the entries of
        ``config``, then ``server-round``. A node that needs not upload its
        features this round (replay, see ``feature_upload_every``) also gets
        ``send-features = False``. The node's server logits ``Z_s`` travel
        only when the KD mode has the edge distil from them and the server
        holds some for that node.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        arrays : ArrayRecord
            The server model's weights; not sent (the edge and server models
            differ).
        config : ConfigRecord
            Entries added to every instruction, over the edge settings.
        grid : Grid
            The Grid used to sample the nodes.

        Returns
        -------
        Iterable[Message]
            One ``train`` message per sampled node.
        """
        self._round_start = time.perf_counter()
        node_ids = self._sample(grid, self.fraction_train, self.min_train_nodes)
        log(INFO, "configure_train: sampled %d nodes", len(node_ids))
        round_config = edge_config_record(
            self.edge_config,
            **{
                "feature-dtype": self.feature_dtype,
                "logit-dtype": self.logit_dtype,
                "seed": self.seed,
            },
        )
        round_config["lr"] = self.edge_config.lr * self._lr_factor(server_round)
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
            # Z_s travels only when the edge distils from it (not in KD modes without it).
            logits = (
                self.server.server_logits(node) if self.edge_config.kd_mode.edge_distills else None
            )
            if logits is not None:
                content[ARRAYS_KEY] = encode_server_logits(logits, self.logit_dtype)
            messages.append(
                Message(content=content, dst_node_id=node, message_type=MessageType.TRAIN)
            )
        self._bytes_sent = sum(record_nbytes(m.content) for m in messages)
        self._sent_train = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate and store replies, then train the server model on all stored features.

        Each reply is validated (a bad one is rejected and logged, see
        ``_accept``) and stored as soon as it is accepted; nodes that did not
        reply are recorded as lost, and with ``store_max_age`` the features of
        nodes silent for too long are dropped. With at least
        ``min_train_replies`` accepted replies the server model trains for
        ``E_s`` epochs and computes the new ``Z_s`` of each node; otherwise it
        does not train this round. The round's metrics are appended to
        :attr:`history`.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        replies : Iterable[Message]
            The nodes' replies to :meth:`configure_train`'s instructions.

        Returns
        -------
        tuple[ArrayRecord | None, MetricRecord | None]
            The server model's weights (``None`` when it trained on no
            example this round) and the round's metrics: node counts, server
            and edge loss / accuracy, store size, seconds and bytes.
        """
        replies = list(replies)
        with_features = 0

        def store(node: int, payload: Payload, _: MetricRecord) -> None:
            nonlocal with_features
            with_features += payload.has_features
            self._store(node, payload, server_round)

        accepted, nbytes, rejected = self._accept(
            server_round, replies, with_logits=True, consume=store
        )
        ignored = dict(self.ignored)
        del replies
        lost = self._lost_nodes(server_round, "train")
        if self.store_max_age > 0:
            for node in self.server.evict(server_round - self.store_max_age + 1):
                self.feature_round.pop(node, None)
                self.gate.forget(node)
                log(
                    WARNING,
                    "FedGKT round %d: features of node %d dropped (no reply for %d rounds)",
                    server_round,
                    node,
                    self.store_max_age,
                )
        if len(accepted) >= self.min_train_replies:
            result = self.server.train_round(lr_scale=self._server_lr_factor(server_round))
            evicted = self._book_evictions(server_round)
        else:
            log(
                WARNING,
                "FedGKT round %d: %d accepted train replies, fewer than the minimum %d: "
                "the server model is not trained this round",
                server_round,
                len(accepted),
                self.min_train_replies,
            )
            result, evicted = ServerRoundResult(0.0, 0.0, 0, 0, 0.0), 0
        row: dict[str, float] = {
            "round": server_round,
            "nodes-replied": len(accepted),
            "nodes-rejected": rejected,
            "nodes-lost": lost,
            "nodes-evicted": evicted,
            "replies-late": ignored.get("late", 0),
            "replies-duplicate": ignored.get("duplicate", 0),
            "nodes-sent-features": with_features,
            "store-memory-mb": self.server.store.memory_bytes / _MB,
            "store-disk-mb": self.server.store.disk_bytes / _MB,
            "server-train-loss": result.loss,
            "server-train-accuracy": result.accuracy,
            "server-train-examples": result.num_examples,
            "server-lr-factor": self._server_lr_factor(server_round),
            "server-seconds": result.seconds,
            "bytes-up-train": nbytes,
            "bytes-down-train": self._bytes_sent,
        }
        row.update(edge_train_metrics([(scalar(m, NUM_EXAMPLES), m) for *_, m in accepted]))
        self.history.append(row)
        log(
            INFO,
            "FedGKT round %d train: %d nodes (%d rejected), server loss %.4f acc %.4f on %d samples "
            "(%.1fs), edge loss %.4f acc %.4f, up %.2f MB, down %.2f MB",
            server_round,
            len(accepted),
            rejected,
            result.loss,
            result.accuracy,
            result.num_examples,
            result.seconds,
            row.get("edge-train-loss", float("nan")),
            row.get("edge-train-accuracy", float("nan")),
            nbytes / _MB,
            self._bytes_sent / _MB,
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
        """Ask sampled nodes for the features of their local test split.

        Only nodes whose edge model has trained are sampled (see
        :attr:`trained_nodes`).

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        arrays : ArrayRecord
            The server model's weights; not sent.
        config : ConfigRecord
            Entries added to every instruction, over the batch size and the
            feature dtype.
        grid : Grid
            The Grid used to sample the nodes.

        Returns
        -------
        Iterable[Message]
            One ``evaluate`` message per sampled node.
        """
        node_ids = self._eval_nodes(grid)
        eval_config = ConfigRecord(
            {"batch-size": self.edge_config.batch_size, "feature-dtype": self.feature_dtype}
        )
        eval_config.update(config)
        eval_config["server-round"] = server_round
        self._sent_eval = [
            Message(
                content=RecordDict({CONFIG_KEY: eval_config}),
                dst_node_id=node,
                message_type=MessageType.EVALUATE,
            )
            for node in node_ids
        ]
        return self._sent_eval

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Classify the nodes' test features with the server model.

        Replies are validated as in :meth:`aggregate_train` and evaluated one
        at a time. The metrics are also merged into the round's row of
        :attr:`history`.

        Parameters
        ----------
        server_round : int
            The current round, starting from 1.
        replies : Iterable[Message]
            The nodes' replies to :meth:`configure_evaluate`'s instructions.

        Returns
        -------
        MetricRecord | None
            ``accuracy`` / ``loss`` (edge extractor + server model) and
            ``edge-accuracy`` / ``edge-loss`` (edge model alone), weighted by
            examples, with ``num-examples``, node counts, bytes and the round's
            seconds; ``None`` when no reply was accepted.
        """
        replies = list(replies)
        loss_sum, correct, n, edge_correct, edge_loss = 0.0, 0, 0, 0.0, 0.0

        def evaluate(node: int, payload: Payload, metrics: MetricRecord) -> None:
            nonlocal loss_sum, correct, n, edge_correct, edge_loss
            l_sum, c = self.server.evaluate(payload.features, payload.labels)
            loss_sum, correct, n = loss_sum + l_sum, correct + c, n + len(payload)
            edge_correct += scalar(metrics, "edge-accuracy", 0.0) * len(payload)
            edge_loss += scalar(metrics, "edge-loss", 0.0) * len(payload)

        accepted, nbytes, rejected = self._accept(
            server_round, replies, with_logits=False, consume=evaluate
        )
        del replies
        self._lost_nodes(server_round, "evaluate")
        if not accepted:
            return None
        metrics = {
            "accuracy": correct / n,
            "loss": loss_sum / n,
            "edge-accuracy": edge_correct / n,
            "edge-loss": edge_loss / n,
            NUM_EXAMPLES: n,
            "eval-nodes": len(accepted),
            "eval-rejected": rejected,
            "eval-replies-ignored": sum(self.ignored.values()),
            "bytes-up-eval": nbytes,
            "round-seconds": time.perf_counter() - self._round_start,
        }
        row = (
            self.history[-1] if self.history and self.history[-1]["round"] == server_round else None
        )
        if row is None:
            row = {"round": server_round}
            self.history.append(row)
        row.update({k: float(v) for k, v in metrics.items()})
        if self.plateau is not None:  # the reference steps its scheduler with the test accuracy
            self.plateau.step(float(metrics["accuracy"]))
        log(
            INFO,
            "FedGKT round %d eval: accuracy %.4f (edge+server), edge-only %.4f, loss %.4f on %d "
            "test samples from %d nodes, eval up %.2f MB, round %.1fs [%s]",
            server_round,
            metrics["accuracy"],
            metrics["edge-accuracy"],
            metrics["loss"],
            n,
            len(accepted),
            nbytes / _MB,
            metrics["round-seconds"],
            progress(server_round, self.num_rounds, time.perf_counter() - self._run_start),
        )
        return MetricRecord(
            {k: float(v) if k != NUM_EXAMPLES else int(v) for k, v in metrics.items()}
        )

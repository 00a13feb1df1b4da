"""Helpers of the FedGKT strategies, kept out of the class (as Flower's ``strategy_utils``).

Node sampling with a bounded wait, lost-node bookkeeping, the per-round rows
and log lines, the round callback and the edge settings record; and
:class:`WaveStrategy`, the base of the strategies that run their own rounds of
message waves (FedAgg, split learning), with :func:`send_wave`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from logging import INFO, WARNING
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes
from flwr.supercore import log
from torch import nn

from flwr_gkt.core.edge import EdgeRoundConfig
from flwr_gkt.wire import NUM_EXAMPLES, scalar, settings_record
from flwr_gkt.wire.gate import Admitted, GateResult, ReplyGate

if TYPE_CHECKING:
    from flwr_gkt.core.server import ServerRoundResult
    from flwr_gkt.flower.strategy import FedGKT

__all__ = [
    "RoundCallback",
    "WaveStrategy",
    "call_on_round",
    "edge_config_record",
    "edge_train_metrics",
    "evaluate_row",
    "log_evaluate_round",
    "log_summary",
    "log_train_round",
    "merge_row",
    "progress",
    "record_lost_nodes",
    "sample_connected",
    "sample_trained",
    "send_wave",
    "server_row",
]

_MB = 1024 * 1024

#: Called once per completed round with the round's history row (a line of
#: ``metrics.csv``) and the round's node-history records (lines of
#: ``nodes.csv``; empty for strategies that keep none), e.g.
#: :class:`flwr_gkt.flower.tensorboard.TensorBoardWriter`.
RoundCallback: TypeAlias = Callable[[Mapping[str, float], Sequence[Mapping[str, Any]]], None]


def call_on_round(
    on_round: RoundCallback | None,
    history: Sequence[Mapping[str, float]],
    node_history: Sequence[Mapping[str, Any]],
    server_round: int,
) -> None:
    """Hand round ``server_round``'s history row and node records to ``on_round``.

    Nothing happens without a callback or without a row of that round. The
    callback is a side channel: an exception it raises is logged as a
    warning and the run goes on.

    Parameters
    ----------
    on_round : RoundCallback | None
        The callback.
    history : Sequence[Mapping[str, float]]
        The strategy's per-round rows (the round's is looked up from the end).
    node_history : Sequence[Mapping[str, Any]]
        The strategy's node records; those with ``round == server_round`` are passed.
    server_round : int
        The completed round.
    """
    if on_round is None:
        return
    row = next((r for r in reversed(history) if r.get("round") == server_round), None)
    if row is None:
        return
    records = [r for r in node_history if r.get("round") == server_round]
    try:
        on_round(row, records)
    except Exception as error:  # a metrics sink must not end a training run
        log(WARNING, "round %d: the round callback failed: %r", server_round, error)


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


def edge_train_metrics(replies: Iterable[tuple[float, Mapping[str, Any]]]) -> dict[str, float]:
    """Summarise the edge side of a round's train replies.

    Parameters
    ----------
    replies : Iterable[tuple[float, Mapping[str, Any]]]
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


def log_summary(strategy: FedGKT) -> None:
    """Log a FedGKT strategy's configuration (models, KD, edge settings, sampling).

    Parameters
    ----------
    strategy : FedGKT
        The strategy.
    """
    log(
        INFO,
        "\t├──> FedGKT: server model %s on %s",
        type(strategy.server.model).__name__,
        strategy.server.device,
    )
    log(
        INFO,
        "\t│\t├── server: E_s=%d, batch %d, T=%.1f, alpha=%.2f, KD mode %s",
        strategy.server.epochs,
        strategy.server.batch_size,
        strategy.server.temperature,
        strategy.server.alpha,
        strategy.server.kd_mode.value,
    )
    log(INFO, "\t│\t└── edge: %s", strategy.edge_config)
    log(
        INFO,
        "\t└──> Sampling: fraction train %.2f | evaluate %.2f, min nodes %d/%d/%d",
        strategy.fraction_train,
        strategy.fraction_evaluate,
        strategy.min_train_nodes,
        strategy.min_evaluate_nodes,
        strategy.min_available_nodes,
    )


def sample_connected(
    grid: Grid, fraction: float, min_nodes: int, min_available: int, wait_timeout: float
) -> list[int]:
    """Sample ``fraction`` of the connected nodes (at least ``min_nodes``), sorted.

    Waits for ``min_available`` connected nodes as Flower's ``sample_nodes``
    does, but with ``wait_timeout`` > 0 only that long: then it goes on with
    the nodes that are connected (at least one), with a warning.

    Parameters
    ----------
    grid : Grid
        The Grid to list and sample the nodes.
    fraction : float
        Share of the connected nodes to sample (``0``: none).
    min_nodes : int
        Fewest nodes to sample.
    min_available : int
        Connected nodes to wait for.
    wait_timeout : float
        Seconds to wait for them (``0``: forever).

    Returns
    -------
    list[int]
        The sampled node ids.
    """
    if fraction == 0.0:
        return []
    wanted = min_available
    if wait_timeout > 0:
        deadline = time.monotonic() + wait_timeout
        while len(list(grid.get_node_ids())) < wanted and time.monotonic() < deadline:
            time.sleep(min(1.0, wait_timeout))
        connected = len(list(grid.get_node_ids()))
        if connected < wanted:
            log(
                WARNING,
                "FedGKT: %d node(s) connected after %.0fs, fewer than the %d wanted; "
                "going on with them",
                connected,
                wait_timeout,
                wanted,
            )
            wanted = max(connected, 1)
            min_nodes = min(min_nodes, wanted)
    num_nodes = int(len(list(grid.get_node_ids())) * fraction)
    node_ids, _ = sample_nodes(grid, wanted, max(num_nodes, min_nodes))
    return sorted(node_ids)


def record_lost_nodes(
    node_history: list[dict[str, Any]], sent: list[Message], server_round: int, stage: str
) -> int:
    """Record and log the nodes that were sent an instruction but have no record this round.

    Parameters
    ----------
    node_history : list[dict[str, Any]]
        The strategy's node history; a ``lost`` row is appended per lost node.
    sent : list[Message]
        The stage's instructions.
    server_round : int
        The current round.
    stage : str
        ``train`` or ``evaluate``.

    Returns
    -------
    int
        The number of lost nodes.
    """
    answered = set()
    for record in reversed(node_history):  # this round's records are the newest
        if record["round"] != server_round:
            break
        if record["stage"] == stage and record.get("status") not in ("late", "duplicate"):
            answered.add(record["node-id"])
    lost = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
    for node in lost:
        node_history.append(
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


def merge_row(
    history: list[dict[str, float]], server_round: int, values: Mapping[str, float]
) -> None:
    """Merge ``values`` into the history row of ``server_round`` (appended if absent).

    Parameters
    ----------
    history : list[dict[str, float]]
        The strategy's per-round history.
    server_round : int
        The round.
    values : Mapping[str, float]
        The values to merge (as floats).
    """
    if not history or history[-1]["round"] != server_round:
        history.append({"round": server_round})
    history[-1].update({k: float(v) for k, v in values.items()})


def log_train_round(server_round: int, row: Mapping[str, float]) -> None:
    """Log a train round's one-line summary from its history row.

    Parameters
    ----------
    server_round : int
        The round.
    row : Mapping[str, float]
        Its history row (``aggregate_train``'s keys).
    """
    log(
        INFO,
        "FedGKT round %d train: %d nodes (%d rejected), server loss %.4f acc %.4f on %d samples "
        "(%.1fs), edge loss %.4f acc %.4f, up %.2f MB, down %.2f MB",
        server_round,
        row["nodes-replied"],
        row["nodes-rejected"],
        row["server-train-loss"],
        row["server-train-accuracy"],
        row["server-train-examples"],
        row["server-seconds"],
        row.get("edge-train-loss", float("nan")),
        row.get("edge-train-accuracy", float("nan")),
        row["bytes-up-train"] / _MB,
        row["bytes-down-train"] / _MB,
    )


def log_evaluate_round(server_round: int, metrics: Mapping[str, float], note: str) -> None:
    """Log an evaluation's one-line summary.

    Parameters
    ----------
    server_round : int
        The round.
    metrics : Mapping[str, float]
        ``aggregate_evaluate``'s metrics.
    note : str
        The progress note (:func:`progress`).
    """
    log(
        INFO,
        "FedGKT round %d eval: accuracy %.4f (edge+server), edge-only %.4f, loss %.4f on %d "
        "test samples from %d nodes, eval up %.2f MB, round %.1fs [%s]",
        server_round,
        metrics["accuracy"],
        metrics["edge-accuracy"],
        metrics["loss"],
        metrics["num-examples"],
        metrics["eval-nodes"],
        metrics["bytes-up-eval"] / _MB,
        metrics["round-seconds"],
        note,
    )


def sample_trained(
    connected: list[int], trained: list[int], fraction: float, min_nodes: int, rng: random.Random
) -> list[int]:
    """Sample ``fraction`` of the ``trained`` nodes (at least ``min_nodes``), sorted.

    The connected nodes that have not trained are left out with one log line:
    their edge extractor would send features of an untrained model.

    Parameters
    ----------
    connected : list[int]
        The connected nodes.
    trained : list[int]
        Those of them whose edge model has trained.
    fraction : float
        Share of ``trained`` to sample.
    min_nodes : int
        Fewest nodes to sample (all of ``trained`` when it has fewer).
    rng : random.Random
        The sampling generator.

    Returns
    -------
    list[int]
        The sampled node ids.
    """
    if len(trained) < len(connected):
        log(
            INFO,
            "FedGKT: %d connected node(s) not evaluated: their edge model has not trained yet",
            len(connected) - len(trained),
        )
    want = max(int(len(trained) * fraction), min_nodes)
    if want >= len(trained):
        return trained
    return sorted(rng.sample(trained, want))


def server_row(
    strategy: FedGKT, server_round: int, result: ServerRoundResult, nbytes: int, bytes_down: int
) -> dict[str, float]:
    """Return the server-side columns of a train round's history row.

    Parameters
    ----------
    strategy : FedGKT
        The strategy (its server's store, learning-rate factor).
    server_round : int
        The round.
    result : ServerRoundResult
        The round's server training.
    nbytes : int
        Bytes the train replies carried.
    bytes_down : int
        Bytes the train instructions carried.

    Returns
    -------
    dict[str, float]
        Store size, server loss / accuracy / examples / lr factor / seconds and
        the round's train bytes up and down.
    """
    store = strategy.server.store
    return {
        "store-memory-mb": store.memory_bytes / _MB,
        "store-disk-mb": store.disk_bytes / _MB,
        "server-train-loss": result.loss,
        "server-train-accuracy": result.accuracy,
        "server-train-examples": result.num_examples,
        "server-lr-factor": strategy.server_lr_factor(server_round),
        "server-seconds": result.seconds,
        "bytes-up-train": nbytes,
        "bytes-down-train": bytes_down,
    }


def evaluate_row(
    sums: Mapping[str, float], nodes: int, rejected: int, ignored: int, nbytes: int
) -> dict[str, float]:
    """Return an evaluation round's metrics from its example-weighted sums.

    Parameters
    ----------
    sums : Mapping[str, float]
        ``loss``, ``correct``, ``edge-loss`` and ``edge-correct`` summed over
        the examples, and ``n`` the examples.
    nodes, rejected, ignored : int
        Accepted, rejected and ignored evaluate replies.
    nbytes : int
        Bytes the evaluate replies carried.

    Returns
    -------
    dict[str, float]
        ``accuracy``, ``loss``, ``edge-accuracy``, ``edge-loss``,
        ``num-examples``, the counts and ``bytes-up-eval``.
    """
    n = sums["n"]
    return {
        "accuracy": sums["correct"] / n,
        "loss": sums["loss"] / n,
        "edge-accuracy": sums["edge-correct"] / n,
        "edge-loss": sums["edge-loss"] / n,
        "num-examples": int(n),
        "eval-nodes": nodes,
        "eval-rejected": rejected,
        "eval-replies-ignored": ignored,
        "bytes-up-eval": nbytes,
    }


def send_wave(
    grid: Grid, messages: list[Message], timeout: float, poll_interval: float | None = None
) -> list[Message]:
    """Push one wave of messages and pull its replies until all are in or ``timeout`` passes.

    Parameters
    ----------
    grid : Grid
        The Flower grid.
    messages : list[Message]
        The wave.
    timeout : float
        Seconds to wait for the replies.
    poll_interval : float, optional
        Seconds between pulls while replies are outstanding (doubling up to
        1 s while nothing arrives); ``None``: ``Grid.send_and_receive``, whose
        deployment Grid sleeps 3 s between pulls.

    Returns
    -------
    list[Message]
        The replies, in arrival order.
    """
    if poll_interval is None:
        return list(grid.send_and_receive(messages, timeout=timeout))
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    delay = poll_interval
    while pending:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if not pending or time.monotonic() >= deadline:
            break
        if got:
            delay = poll_interval
        else:
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
    return replies


#: How a wave's messages are keyed: by node id, or by another name of the node.
NodeKey = TypeVar("NodeKey", int, str)


class WaveStrategy(Strategy):
    """The base of a strategy that runs its own rounds of message waves in :meth:`start`.

    Flower's round-by-round hooks raise ``NotImplementedError``; :meth:`start`
    runs :meth:`run_rounds` and returns :attr:`model`'s weights and
    :attr:`history`; :meth:`_exchange_wave` sends one wave through
    :attr:`gate`. A subclass sets the class attributes and :attr:`model`,
    :attr:`gate`, :attr:`history` and :attr:`node_history`, and implements
    :meth:`run_rounds` and :meth:`summary`.
    """

    #: The strategy's name in log lines and errors.
    name: ClassVar[str]
    #: What one round is made of (the round hooks' error).
    round_kind: ClassVar[str]
    #: What the strategy takes from its constructor (the error of :meth:`start`).
    constructor_gives: ClassVar[str]
    #: Seconds between pulls while a wave's replies are outstanding (:func:`send_wave`).
    poll_interval: float | None = None
    model: nn.Module
    gate: ReplyGate
    history: list[dict[str, float]]
    node_history: list[dict[str, Any]]

    def _own_rounds(self) -> NotImplementedError:
        return NotImplementedError(
            f"{self.name} runs its own rounds ({self.round_kind}): call start()"
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Raise ``NotImplementedError``: the strategy runs its own rounds in :meth:`start`."""
        raise self._own_rounds()

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Raise ``NotImplementedError``: the strategy runs its own rounds in :meth:`start`."""
        raise self._own_rounds()

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Raise ``NotImplementedError``: the strategy runs its own rounds in :meth:`start`."""
        raise self._own_rounds()

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Raise ``NotImplementedError``: the strategy runs its own rounds in :meth:`start`."""
        raise self._own_rounds()

    def run_rounds(self, grid: Grid, num_rounds: int, timeout: float) -> None:
        """Run ``num_rounds`` rounds, appending a row per round to :attr:`history`.

        Parameters
        ----------
        grid : Grid
            The Flower grid of the run.
        num_rounds : int
            Number of rounds.
        timeout : float
            Seconds to wait for each wave's replies.
        """
        raise NotImplementedError

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds on ``grid`` (:meth:`run_rounds`).

        Parameters
        ----------
        grid : Grid
            The Flower grid of the run.
        initial_arrays : ArrayRecord | None
            Must be ``None`` (the models come from the constructor).
        num_rounds : int
            Number of rounds.
        timeout : float
            Seconds to wait for each wave's replies.
        train_config, evaluate_config : ConfigRecord | None
            Must be ``None`` (the settings come from the constructor).
        evaluate_fn : Callable[[int, ArrayRecord], MetricRecord | None] | None
            Must be ``None`` (the strategy evaluates its model itself).

        Returns
        -------
        Result
            ``arrays``: :attr:`model`'s weights; ``train_metrics_clientapp``:
            each round's history row (also in :attr:`history`).

        Raises
        ------
        ValueError
            If ``initial_arrays``, ``train_config``, ``evaluate_config`` or
            ``evaluate_fn`` is not ``None``.
        """
        if any(x is not None for x in (initial_arrays, train_config, evaluate_config, evaluate_fn)):
            raise ValueError(
                f"{self.name} {self.constructor_gives} from the constructor: "
                "initial_arrays, train_config, evaluate_config and evaluate_fn must be None"
            )
        log(INFO, "Starting %s strategy:", self.name)
        self.summary()
        self.run_rounds(grid, num_rounds, timeout)
        return Result(
            arrays=ArrayRecord(self.model.state_dict()),
            train_metrics_clientapp={
                int(row["round"]): MetricRecord({k: float(v) for k, v in row.items()})
                for row in self.history
            },
        )

    def _exchange_wave(
        self,
        grid: Grid,
        messages: Mapping[NodeKey, Message],
        timeout: float,
        server_round: int,
        stage: str,
        decode: Callable[[NodeKey, RecordDict], Any] | None,
        known: frozenset[str],
        required: frozenset[str] = frozenset({NUM_EXAMPLES}),
        node_column: str = "node-id",
    ) -> tuple[dict[NodeKey, Admitted], GateResult]:
        """Send one wave; return the replies the gate accepted (by key) and its result.

        Every reply passes :meth:`ReplyGate.admit` (attribution, errors, size,
        metric schema ``known`` and ``required``, then ``decode(key,
        content)``) and its row goes to :attr:`node_history`; a node sent a
        message without an attributed reply gets a ``lost`` row and a log line.

        ``messages`` are keyed by node id (``node_column`` ``node-id``) or by
        another name of the node, written to ``node_column`` of each row.
        """
        key_of = {m.metadata.dst_node_id: key for key, m in messages.items()}
        sent = list(messages.values())
        replies = send_wave(grid, sent, timeout, self.poll_interval)
        result = self.gate.admit(
            server_round,
            stage,
            replies,
            sent,
            None if decode is None else lambda node, content: decode(key_of[node], content),
            known,
            required=required,
        )
        if node_column != "node-id":
            for row in result.records:
                row[node_column] = key_of.get(row["node-id"], "")
        self.node_history.extend(result.records)
        answered = {key_of[row["node-id"]] for row in result.records if row["node-id"] in key_of}
        for key in sorted(set(messages) - answered):
            self.node_history.append(
                {"round": server_round, "stage": stage, node_column: key, "status": "lost"}
            )
            log(
                WARNING,
                "%s round %d: %s: no reply from %s%s",
                self.name,
                server_round,
                stage,
                "node " if node_column == "node-id" else "",
                key,
            )
        return {key_of[a.node]: a for a in result.accepted}, result

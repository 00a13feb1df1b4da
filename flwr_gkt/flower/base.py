"""The round loop of the FedGKT family and the state its strategies share.

:class:`RoundStrategy` is the base of every strategy of the package: its
:meth:`~RoundStrategy.start` is the one round loop (resume, centralized
evaluation, one :meth:`~RoundStrategy.run_round` per round, checkpoint, round
callback, :meth:`~RoundStrategy.finish`). :class:`RoundLog` keeps what a run
reports (history rows, node records, timers); :class:`WaveStrategy` is the
base of the strategies whose rounds are several message waves (FedAgg, split
learning).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log
from torch import nn

from flwr_gkt.core.checkpoint import load_checkpoint, save_checkpoint
from flwr_gkt.flower.strategy_utils import MB, RoundCallback, call_on_round, progress, send_wave
from flwr_gkt.wire import NUM_EXAMPLES
from flwr_gkt.wire.gate import Admitted, GateResult, ReplyGate

__all__ = ["EvaluateFn", "RoundLog", "RoundStrategy", "RunContext", "WaveStrategy"]

#: Centralized evaluation of the server model's weights (as in :meth:`Strategy.start`).
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class RoundLog:
    """What a run reports: per-round rows, per-node records, the round callback and timers.

    Parameters
    ----------
    on_round : RoundCallback, optional
        Called once per completed round with its :attr:`history` row and its
        :attr:`node_history` records.
    """

    def __init__(self, on_round: RoundCallback | None = None) -> None:
        self.on_round = on_round
        #: One dict per round: metrics, bytes and times (also written to CSV).
        self.history: list[dict[str, float]] = []
        #: One dict per node and stage per round: accepted or why not, samples,
        #: bytes, metrics -- lost nodes included.
        self.node_history: list[dict[str, Any]] = []
        self.num_rounds = 0
        self.run_start = time.perf_counter()
        self.round_start = 0.0
        #: When the latest stage's instructions were handed to the Grid.
        self.sent_at = 0.0

    def start_run(self, num_rounds: int) -> None:
        """Start the run's clock; ``num_rounds`` sets the progress notes' total."""
        self.num_rounds = num_rounds
        self.run_start = time.perf_counter()

    def waited(self) -> float:
        """Seconds since the latest instructions were handed over."""
        return time.perf_counter() - self.sent_at

    def progress(self, server_round: int) -> str:
        """Return the progress note of ``server_round`` (see :func:`.strategy_utils.progress`)."""
        return progress(server_round, self.num_rounds, time.perf_counter() - self.run_start)

    def merge_row(self, server_round: int, values: Mapping[str, float]) -> None:
        """Merge ``values`` (as floats) into the row of ``server_round``, appended if absent."""
        if not self.history or self.history[-1]["round"] != server_round:
            self.history.append({"round": server_round})
        self.history[-1].update({k: float(v) for k, v in values.items()})

    def round_done(self, server_round: int) -> None:
        """Hand a completed round's row and node records to :attr:`on_round`, if set."""
        call_on_round(self.on_round, self.history, self.node_history, server_round)

    def record_lost(self, sent: Iterable[Message], server_round: int, stage: str) -> int:
        """Record and log the nodes sent an instruction of ``stage`` without a record; count them."""
        answered = set()
        for record in reversed(self.node_history):  # this round's records are the newest
            if record["round"] != server_round:
                break
            if record["stage"] == stage and record.get("status") not in ("late", "duplicate"):
                answered.add(record["node-id"])
        lost = [m.metadata.dst_node_id for m in sent if m.metadata.dst_node_id not in answered]
        for node in lost:
            self.lost(server_round, stage, node, "no reply before the round timeout")
        return len(lost)

    def lost(self, server_round: int, stage: str, node: int, reason: str) -> None:
        """Book ``node`` as lost in ``stage`` of ``server_round``, with a log line."""
        row = {"round": server_round, "stage": stage, "node-id": node, "status": "lost"}
        self.node_history.append({**row, "reason": reason})
        log(
            WARNING,
            "FedGKT round %d: node %d did not reply to the %s instruction (lost)",
            server_round,
            node,
            stage,
        )

    def log_train(self, server_round: int, row: Mapping[str, float]) -> None:
        """Log a train round's one-line summary from its history row."""
        log(
            INFO,
            "FedGKT round %d train: %d nodes (%d rejected), server loss %.4f acc %.4f on %d "
            "samples (%.1fs), edge loss %.4f acc %.4f, up %.2f MB, down %.2f MB",
            server_round,
            row["nodes-replied"],
            row["nodes-rejected"],
            row["server-train-loss"],
            row["server-train-accuracy"],
            row["server-train-examples"],
            row["server-seconds"],
            row.get("edge-train-loss", float("nan")),
            row.get("edge-train-accuracy", float("nan")),
            row["bytes-up-train"] / MB,
            row["bytes-down-train"] / MB,
        )

    def log_evaluate(self, server_round: int, metrics: Mapping[str, float]) -> None:
        """Log an evaluation's one-line summary, with the run's progress."""
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
            metrics["bytes-up-eval"] / MB,
            metrics["round-seconds"],
            self.progress(server_round),
        )

    @staticmethod
    def evaluate_row(
        sums: Mapping[str, float], nodes: int, rejected: int, ignored: int, nbytes: int
    ) -> dict[str, float]:
        """Return an evaluation's metrics from its example-weighted sums.

        ``sums``: ``loss``, ``correct``, ``edge-loss`` and ``edge-correct``
        summed over the examples, ``n`` the examples; ``nodes``, ``rejected``,
        ``ignored``: the evaluate replies accepted, rejected and ignored;
        ``nbytes``: the bytes they carried.
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

    def state_dict(self) -> dict[str, Any]:
        """Return the rows and records, as a checkpoint holds them."""
        return {"history": self.history, "node-history": self.node_history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.history = list(state["history"])
        self.node_history = list(state["node-history"])


@dataclass
class RunContext:
    """The arguments of one :meth:`RoundStrategy.start` and what it returns."""

    grid: Grid
    timeout: float
    train_config: ConfigRecord
    evaluate_config: ConfigRecord
    evaluate_fn: EvaluateFn | None
    #: The server model's latest weights (what ``evaluate_fn`` gets).
    arrays: ArrayRecord | None
    result: Result = field(default_factory=Result)


class RoundStrategy(Strategy):
    """The base of the package's strategies: :meth:`start` is their one round loop.

    A subclass implements :meth:`run_round` (one round) and may override
    :meth:`begin`, :meth:`finish`, :meth:`reidentify_nodes` and, to be
    checkpointed, :meth:`state_dict` / :meth:`load_state_dict`.
    """

    #: Where a checkpoint is written after every completed round (``None``: never).
    checkpoint_path: Path | None = None
    #: Last round that ran to its end.
    completed_round = 0
    #: Total number of rounds of the current run.
    num_rounds = 0

    def __init__(self, on_round: RoundCallback | None = None) -> None:
        #: History rows, node records, the round callback and the run's timers.
        self.rounds = RoundLog(on_round)

    @property
    def history(self) -> list[dict[str, float]]:
        """One dict per round (see :attr:`RoundLog.history`)."""
        return self.rounds.history

    @property
    def node_history(self) -> list[dict[str, Any]]:
        """One dict per node, stage and round (see :attr:`RoundLog.node_history`)."""
        return self.rounds.node_history

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: EvaluateFn | None = None,
    ) -> Result:
        """Run rounds ``completed_round + 1 .. num_rounds`` on ``grid``; return Flower's ``Result``.

        Flower's loop (:meth:`flwr.serverapp.strategy.Strategy.start`, same
        arguments) with a resume: after :meth:`resume` the checkpointed nodes
        are found again (:meth:`reidentify_nodes`) and the run goes on after
        the checkpoint's round; otherwise ``evaluate_fn`` first sees
        ``initial_arrays`` (which the nodes never receive). Each round is
        :meth:`run_round`, then ``evaluate_fn``, a checkpoint when
        :attr:`checkpoint_path` is set and :meth:`round_done`; :meth:`finish`
        ends the run. ``num_rounds`` counts the resumed rounds too (and sets
        the learning-rate schedule's length); ``timeout`` is the wait in
        seconds for each stage's (or wave's) replies.
        """
        self.num_rounds = num_rounds
        self.rounds.start_run(num_rounds)
        log(INFO, "Starting %s strategy:", type(self).__name__)
        self.check_arguments(initial_arrays, train_config, evaluate_config, evaluate_fn)
        self.summary()
        run = RunContext(
            grid,
            timeout,
            ConfigRecord() if train_config is None else train_config,
            ConfigRecord() if evaluate_config is None else evaluate_config,
            evaluate_fn,
            initial_arrays,
        )
        first = self.completed_round + 1
        if first > 1:
            log(
                INFO,
                "%s: resuming after round %d of %d",
                type(self).__name__,
                first - 1,
                num_rounds,
            )
            self.reidentify_nodes(grid, timeout)
        elif evaluate_fn and initial_arrays is not None:
            if (res := evaluate_fn(0, initial_arrays)) is not None:
                run.result.evaluate_metrics_serverapp[0] = res
        run = self.begin(run)
        for server_round in range(first, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            if not self.run_round(server_round, run):
                break
            self.end_round(server_round, run)
        self.finish(run)
        log(
            INFO,
            "Strategy execution finished in %.2fs",
            time.perf_counter() - self.rounds.run_start,
        )
        return run.result

    def check_arguments(
        self,
        initial_arrays: ArrayRecord | None,
        train_config: ConfigRecord | None,
        evaluate_config: ConfigRecord | None,
        evaluate_fn: EvaluateFn | None,
    ) -> None:
        """Check :meth:`start`'s arguments; log them as Flower does."""
        if initial_arrays is not None:
            log_strategy_start_info(self.num_rounds, initial_arrays, train_config, evaluate_config)

    def begin(self, run: RunContext) -> RunContext:
        """Prepare the run before its first round; return its context (the same by default)."""
        return run

    def run_round(self, server_round: int, run: RunContext) -> bool:
        """Run round ``server_round``; ``False`` ends the run early."""
        raise NotImplementedError

    def end_round(self, server_round: int, run: RunContext) -> None:
        """Close a round: centralized evaluation, :attr:`completed_round`, checkpoint, callback."""
        if run.evaluate_fn and run.arrays is not None:
            if (res := run.evaluate_fn(server_round, run.arrays)) is not None:
                run.result.evaluate_metrics_serverapp[server_round] = res
        self.completed_round = server_round
        if self.checkpoint_path is not None:
            save_checkpoint(self.checkpoint_path, self.checkpoint_state(run))
        self.round_done(server_round)

    def finish(self, run: RunContext) -> None:
        """End the run after its last round (nothing by default)."""

    def round_done(self, server_round: int) -> None:
        """Hand a completed round's row and node records to the round callback, if set."""
        self.rounds.round_done(server_round)

    def reidentify_nodes(self, grid: Grid, timeout: float = 60.0) -> dict[int, int]:
        """Find the checkpointed nodes again under their current ids (none by default)."""
        return {}

    def summary(self) -> None:
        """Log the strategy's configuration."""

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Return everything a resumed run needs."""
        raise NotImplementedError(f"{type(self).__name__} keeps no checkpoint")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        raise NotImplementedError(f"{type(self).__name__} keeps no checkpoint")

    def checkpoint_state(self, run: RunContext) -> dict[str, Any]:
        """Return the state written at the end of a round (:meth:`state_dict`)."""
        return self.state_dict()

    def resume(self, path: str | Path | None = None) -> int:
        """Load the checkpoint at ``path`` (default :attr:`checkpoint_path`); return its round.

        Call it before :meth:`start`, which then goes on after that round.
        ``0`` when there is no checkpoint (or no path): the run starts from
        the beginning.

        Raises
        ------
        CheckpointError
            If the checkpoint cannot be read or does not fit this strategy.
        """
        path = Path(path) if path else self.checkpoint_path
        state = load_checkpoint(path) if path else None
        if state is None:
            log(INFO, "%s: no checkpoint at %s, starting from round 1", type(self).__name__, path)
            return 0
        self.load_state_dict(state)
        log(
            INFO,
            "%s: resumed from %s after round %d",
            type(self).__name__,
            path,
            self.completed_round,
        )
        return self.completed_round


#: How a wave's messages are keyed: by node id, or by another name of the node.
NodeKey = TypeVar("NodeKey", int, str)


class WaveStrategy(RoundStrategy):
    """The base of a strategy whose rounds are several message waves of its own.

    Flower's round-by-round hooks raise ``NotImplementedError``; :meth:`start`
    takes its settings from the constructor and returns :attr:`model`'s
    weights and :attr:`history`; :meth:`_exchange_wave` sends one wave through
    :attr:`gate`. A subclass sets the class attributes, :attr:`model` and
    :attr:`gate`, and implements :meth:`run_round` and :meth:`summary`.
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

    def check_arguments(
        self,
        initial_arrays: ArrayRecord | None,
        train_config: ConfigRecord | None,
        evaluate_config: ConfigRecord | None,
        evaluate_fn: EvaluateFn | None,
    ) -> None:
        """Raise ``ValueError`` unless every argument is ``None`` (they come from the constructor)."""
        if any(x is not None for x in (initial_arrays, train_config, evaluate_config, evaluate_fn)):
            raise ValueError(
                f"{self.name} {self.constructor_gives} from the constructor: "
                "initial_arrays, train_config, evaluate_config and evaluate_fn must be None"
            )
        self.completed_round = 0  # every run starts from round 1

    def finish(self, run: RunContext) -> None:
        """Return :attr:`model`'s weights and each round's history row."""
        run.result.arrays = ArrayRecord(self.model.state_dict())
        run.result.train_metrics_clientapp = {
            int(row["round"]): MetricRecord({k: float(v) for k, v in row.items()})
            for row in self.history
        }

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
